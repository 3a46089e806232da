"""Logging that cannot leak keys: anything shaped like one of our secrets, and the
password of any URL, is masked in every record, including uvicorn's access lines (a key
pasted into a URL ends up there).

Masking the arguments alone is not enough: database drivers log at DEBUG with their
parameters inside tuples and dicts, and exceptions carry their own text. So the filter
masks what the record will print: the formatted message and the exception's text.
"""

from __future__ import annotations

import copy
import logging
import re
from typing import Any

SECRET = re.compile(r"sk-aic-(?:admin-)?[A-Za-z0-9_-]{6,}")
MASK = "sk-aic-***"
# scheme://user:password@host: keep the user, drop the password
URL_PASSWORD = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)[^@\s]+@")
# libpq keyword strings (`password=...`), as psycopg prints a connection's conninfo
KEYWORD_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('[^']*'|\S+)", re.IGNORECASE)


def redact(text: str) -> str:
    text = SECRET.sub(MASK, text)
    text = URL_PASSWORD.sub(r"\1***@", text)
    return KEYWORD_PASSWORD.sub(r"\1***", text)


class RedactSecrets(logging.Filter):
    """Masks a record in place before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            masked = redact(record.getMessage())
        except Exception:  # a bad format string: logging reports it later, as it would
            return True
        # string arguments one by one where that is enough: uvicorn's access formatter
        # reads the arguments, not the message
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: redact(v) if isinstance(v, str) else v
                           for k, v in record.args.items()}
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if record.getMessage() != masked:  # inside another object, or split across two
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def setup(level: str) -> dict[str, Any]:
    """Configure our own logging and return uvicorn's log config with the same filter."""
    from uvicorn.config import LOGGING_CONFIG

    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactSecrets())
    if logging.getLogger().level > logging.DEBUG:
        # one line per migration step on every first start says nothing an operator acts on
        logging.getLogger("alembic").setLevel(logging.WARNING)
    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["redact"] = {"()": RedactSecrets}
    for handler in config["handlers"].values():
        handler.setdefault("filters", []).append("redact")
    return config
