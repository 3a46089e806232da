"""Masking works on what a record prints, wherever the secret sits in it."""

from __future__ import annotations

import io
import logging

import pytest

from aicloud.logs import RedactSecrets

KEY = "sk-aic-" + "K3y" * 12
ADMIN = "sk-aic-admin-" + "4dm1n" * 8


def printed(*args: object, exc: BaseException | None = None, msg: str = "%s") -> str:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(RedactSecrets())
    logger = logging.getLogger("test.logs")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.error(msg, *args, exc_info=exc)
    finally:
        logger.removeHandler(handler)
    return out.getvalue()


@pytest.mark.parametrize("args", [
    (KEY,),
    ((KEY, 3),),  # a DB driver's parameter tuple, as SQLAlchemy logs it at DEBUG
    ({"hash": "x", "secret": ADMIN},),
    ([b"x", {"nested": [KEY]}],),
    (KEY[:20], KEY[20:]),  # split across two arguments
])
def test_secrets_inside_any_argument_are_masked(args: tuple[object, ...]) -> None:
    line = printed(*args, msg="%s" * len(args))
    assert "K3yK3y" not in line and "4dm1n4dm1n" not in line
    assert "sk-aic-***" in line


def test_exception_text_and_url_passwords_are_masked() -> None:
    try:
        raise ValueError(f"bad key {KEY} for postgresql://app:s3cr3t-pw@db:5432/cloud")
    except ValueError as exc:
        line = printed("postgresql+psycopg://app:s3cr3t-pw@db/cloud", exc=exc,
                       msg="connecting to %s")
    assert "s3cr3t" not in line and "K3yK3y" not in line
    assert "postgresql://app:***@db:5432/cloud" in line and "Traceback" in line
    assert "host=db password=***" in printed("host=db password=hunter22")


def test_uvicorn_access_lines_keep_their_arguments() -> None:
    """uvicorn's access formatter unpacks the arguments: they must stay a tuple."""
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1,
                               '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5", "GET", f"/v1/models?key={KEY}", "1.1", 200),
                               None)
    assert RedactSecrets().filter(record)
    assert isinstance(record.args, tuple) and record.args[2] == "/v1/models?key=sk-aic-***"
