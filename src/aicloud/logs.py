"""Logging that cannot leak keys: anything shaped like one of our secrets is masked in
every record, including uvicorn's access lines (a key pasted into a URL ends up there)."""

from __future__ import annotations

import copy
import logging
import re
from typing import Any

SECRET = re.compile(r"sk-aic-(?:admin-)?[A-Za-z0-9_-]{6,}")
MASK = "sk-aic-***"


def redact(text: str) -> str:
    return SECRET.sub(MASK, text)


class RedactSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: redact(v) if isinstance(v, str) else v
                           for k, v in record.args.items()}
        return True


def setup(level: str) -> dict[str, Any]:
    """Configure our own logging and return uvicorn's log config with the same filter."""
    from uvicorn.config import LOGGING_CONFIG

    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactSecrets())
    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["redact"] = {"()": RedactSecrets}
    for handler in config["handlers"].values():
        handler.setdefault("filters", []).append("redact")
    return config
