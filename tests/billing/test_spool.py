"""Replaying spooled usage survives what a crash or a person leaves in the spool folder:
a torn line, a line the database refuses, a file whose name is not ours. Real SQLite and
PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from aicloud.billing.usage import QUARANTINE, UsageEntry, UsageLedger, _encode
from aicloud.store import db, migrate
from aicloud.store.direct import Direct

DEAD_PID = 999_999_999  # above any pid_max: that process is gone


def entry(n: int, **changes: object) -> UsageEntry:
    now = datetime.now(UTC)
    base = UsageEntry(f"req-{n}", "org_1", "key_1", "proj_1", "m", 10, 0, n, 0, "completed",
                      now, now)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def stored(url: str) -> dict[str, int]:
    engine = create_engine(db.sync_url(url))
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT request_id, completion_tokens FROM usage"))
        result = {r: n for r, n in rows}
    engine.dispose()
    return result


def replay(url: str, spool: Path, rounds: int = 1) -> list[int]:
    """Rows written by each round of one ledger's replay (housekeeping runs it every 5 s)."""
    async def go() -> list[int]:
        direct = Direct(url)
        ledger = UsageLedger(direct, spool)
        try:
            return [await ledger.replay() for _ in range(rounds)]
        finally:
            await asyncio.to_thread(direct.close)

    return asyncio.run(go())


def test_torn_and_refused_lines_are_quarantined_and_the_rest_replayed(
        db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    migrate.upgrade(db_url)
    torn = _encode(entry(3), None)[:57]  # a crash in the middle of an append
    refused = _encode(entry(4, prompt_tokens=2**70), None)  # out of every integer range
    dead = tmp_path / f"usage-spool-{DEAD_PID}.jsonl"
    dead.write_text(_encode(entry(1), None) + "\n" + torn + "\n" + refused
                    + _encode(entry(2), None) + '{"entry": {"request_id": 5}}\n' + torn)
    own = tmp_path / f"usage-spool-{os.getpid()}.jsonl"
    own.write_text(_encode(entry(6), None))
    odd = [tmp_path / "usage-spool-.jsonl", tmp_path / "usage-spool-backup.jsonl",
           tmp_path / "usage-spool-12x.jsonl"]
    for path in odd:
        path.write_text("not ours\n")
    with caplog.at_level(logging.WARNING, "aicloud.billing.usage"):
        assert replay(db_url, tmp_path, rounds=2) == [3, 0]  # the second finds nothing
    assert stored(db_url) == {"req-1": 1, "req-2": 2, "req-6": 6}
    assert not dead.exists() and not own.exists()  # fully handled: nothing left to replay
    assert all(path.read_text() == "not ours\n" for path in odd)  # left alone
    quarantined = (tmp_path / QUARANTINE).read_text().splitlines()
    assert quarantined == [torn, refused.strip(), '{"entry": {"request_id": 5}}', torn]
    assert json.loads(quarantined[1])["entry"]["prompt_tokens"] == 2**70  # kept whole
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 4 and all(QUARANTINE in m for m in errors)
    ignored = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(ignored) == 3  # each odd file reported once, not every round
