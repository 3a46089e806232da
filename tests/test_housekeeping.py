"""The housekeeping task keeps running whatever a round meets, and is restarted if it
ever stops: otherwise usage spooled during an outage would never be written."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from aicloud.billing.usage import _encode
from aicloud.config import Settings
from aicloud.services import open_cloud
from aicloud.store import migrate
from aicloud.tasks import supervised
from tests.billing.test_spool import entry, stored


def test_supervised_restarts_what_dies_or_stops(caplog: pytest.LogCaptureFixture) -> None:
    runs: list[int] = []
    third = asyncio.Event()

    async def flaky() -> None:
        runs.append(len(runs))
        if len(runs) == 1:
            raise RuntimeError("boom")
        if len(runs) == 2:
            return  # stopping is as wrong as dying
        third.set()
        await asyncio.sleep(3600)

    async def go() -> None:
        task = asyncio.create_task(supervised("chores", flaky, pause=0.01))
        await asyncio.wait_for(third.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.ERROR, "aicloud.tasks"):
        asyncio.run(go())
    assert runs == [0, 1, 2]
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["chores died; restarting it in 0 s", "chores stopped; restarting it"]
    assert caplog.records[0].exc_info is not None  # the traceback is in the log


def test_housekeeping_replays_past_a_torn_line_and_an_odd_file(
        db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The round that meets them goes on; later rounds too (the purge runs each time)."""
    migrate.upgrade(db_url)
    (tmp_path / "usage-spool-old.jsonl").write_text(_encode(entry(9), None))
    (tmp_path / f"usage-spool-{os.getpid()}.jsonl").write_text(
        _encode(entry(1), None)[:40] + "\n" + _encode(entry(2), None))

    async def go() -> int:
        cloud = open_cloud(Settings(database_url=db_url, home=tmp_path))
        purges = 0
        purge = cloud.budgets.purge_expired

        async def counted() -> int:
            nonlocal purges
            purges += 1
            if purges == 2:
                raise RuntimeError("a bug in one chore")  # must not end housekeeping
            return await purge()

        cloud.budgets.purge_expired = counted  # type: ignore[method-assign]
        task = asyncio.create_task(cloud.maintain(every=0.01))
        try:
            while purges < 4:
                await asyncio.sleep(0.01)
                assert not task.done(), task
        finally:
            task.cancel()
            await cloud.close()
        return purges

    with caplog.at_level(logging.WARNING):
        assert asyncio.run(go()) >= 4
    assert stored(db_url) == {"req-2": 2}
    assert any("a bug in one chore" in (r.exc_text or "") or r.exc_info
               for r in caplog.records if "hold purge failed" in r.getMessage())
