"""The progress journal against real SQLite and PostgreSQL: a dead server's running
requests become one `interrupted` usage row each, its holds are released, a live server's
rows are left alone, and one tick writes every running request in one statement."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import create_engine, text

from aicloud.billing.budgets import BudgetExceeded
from aicloud.billing.journal import Journal, new_instance_id
from aicloud.billing.money import Rates
from aicloud.config import Settings
from aicloud.services import Cloud, open_cloud
from aicloud.store import db, migrate
from tests.billing.test_ledger import USD, assert_counters_match_rows, entry, tenant

T = TypeVar("T")
DOLLAR_PER_TOKEN = Rates(0, 0, USD)  # micro-USD per million tokens: $1 per output token


def with_clouds(url: str, home: Path, action: Callable[..., Awaitable[T]],
                processes: int) -> T:
    """Clouds with their own connections and instance ids, as server processes have."""
    migrate.upgrade(url)

    async def go() -> T:
        clouds = [open_cloud(Settings(database_url=url, home=home)) for _ in range(processes)]
        try:
            return await action(*clouds)
        finally:
            for cloud in clouds:
                await cloud.close()

    return asyncio.run(go())


def rows(url: str, sql: str) -> list[Any]:
    engine = create_engine(db.sync_url(url))
    with engine.connect() as conn:
        found = list(conn.execute(text(sql)).all())
    engine.dispose()
    return found


def test_a_dead_servers_requests_are_billed_once_and_its_holds_released(
        db_url: str, tmp_path: Path) -> None:
    async def scenario(a: Cloud, b: Cloud) -> None:
        p = await tenant(a, project_budget=100 * USD)
        assert await a.journal.start(None, "127.0.0.1", 0) == 0
        started = datetime.now(UTC)
        runs = []
        for i in range(4):
            hold = await a.budgets.reserve(p, f"r{i}", 20 * USD)
            runs.append(a.journal.track(f"r{i}", p, "m", 7, DOLLAR_PER_TOKEN, hold, started))
        runs[0].completion_tokens, runs[1].completion_tokens = 5, 3
        runs[2].completion_tokens = 4
        await a.journal.tick()
        runs[0].completion_tokens = 9  # written by the ticks below
        # r3 never produces a token: no journal row, only its hold
        with pytest.raises(BudgetExceeded):  # 80 held: 40 more does not fit
            await b.budgets.reserve(p, "x", 40 * USD)

        # b is a live server too, with the usual timeout: a is fresh, so it is left alone
        assert await b.journal.start(None, "127.0.0.1", 0) == 0
        assert len(rows(db_url, "SELECT * FROM progress_journal")) == 3
        # a and b keep beating: even a 1 s timeout does not take them for dead
        hasty = Journal(b.direct, b.ledger, new_instance_id(), stale_after=1.0)
        for _ in range(4):
            await asyncio.sleep(0.4)
            await asyncio.gather(a.journal.tick(beat=True), b.journal.tick(beat=True))
            assert await hasty.settle_dead() == 0
        runs[0].completion_tokens = 12  # after a's last tick: the part a crash loses
        # r2 ends normally: its row and hold settle; its journal row would go next tick
        await a.ledger.record(entry(p, "r2", 6 * USD, prompt=7, completion=6), runs[2].hold)
        a.journal.finish(runs[2])
        # a dies (no more heartbeats); after the timeout any server settles it
        await asyncio.sleep(1.2)
        await b.journal.tick(beat=True)
        assert await hasty.settle_dead() == 3
        await b.budgets.reserve(p, "x", 40 * USD)  # a's holds are gone at once
        assert await hasty.settle_dead() == 0
        assert await b.journal.settle_dead() == 0

    with_clouds(db_url, tmp_path, scenario, processes=2)
    usage = {r[0]: tuple(r[1:]) for r in rows(
        db_url, "SELECT request_id, status, prompt_tokens, completion_tokens, cost_pico "
        "FROM usage")}
    assert usage == {"r0": ("interrupted", 7, 9, 9 * USD), "r1": ("interrupted", 7, 3, 3 * USD),
                     "r2": ("completed", 7, 6, 6 * USD)}
    assert rows(db_url, "SELECT request_id FROM reservations") == [("x",)]
    assert rows(db_url, "SELECT * FROM progress_journal") == []
    assert len(rows(db_url, "SELECT id FROM server_instances")) == 1  # b, still running
    assert_counters_match_rows(db_url)


def test_a_clean_shutdown_settles_its_own_requests(db_url: str, tmp_path: Path) -> None:
    async def scenario(a: Cloud) -> None:
        p = await tenant(a, project_budget=100 * USD)
        await a.journal.start(tmp_path, "127.0.0.1", 1)
        hold = await a.budgets.reserve(p, "cut", 20 * USD)
        a.journal.track("cut", p, "m", 7, DOLLAR_PER_TOKEN, hold,
                        datetime.now(UTC)).completion_tokens = 2
        await a.journal.close()  # the count was never ticked: close writes it first

    with_clouds(db_url, tmp_path, scenario, processes=1)
    assert rows(db_url, "SELECT request_id, status, completion_tokens FROM usage") == [
        ("cut", "interrupted", 2)]
    assert rows(db_url, "SELECT * FROM reservations") == []
    assert rows(db_url, "SELECT * FROM server_instances") == []
    assert_counters_match_rows(db_url)


def test_one_tick_writes_every_running_request(db_url: str, tmp_path: Path) -> None:
    """32 running requests: the tick is one statement (PostgreSQL) or one transaction
    (SQLite) whatever their number; its cost is printed for docs/operations.md."""
    async def scenario(a: Cloud) -> list[float]:
        p = await tenant(a)
        await a.journal.start(None, "127.0.0.1", 0)
        runs = [a.journal.track(f"r{i}", p, "m", 30, DOLLAR_PER_TOKEN, None,
                                datetime.now(UTC)) for i in range(32)]
        took = []
        for step in range(1, 41):
            for run in runs:
                run.completion_tokens = step
            began = time.perf_counter()
            await a.journal.tick()
            took.append(time.perf_counter() - began)
        for run in runs[:16]:
            a.journal.finish(run)
        await a.journal.tick()
        return took

    took = with_clouds(db_url, tmp_path, scenario, processes=1)
    left = rows(db_url, "SELECT request_id, completion_tokens FROM progress_journal")
    assert sorted(left) == sorted((f"r{i}", 40) for i in range(16, 32))
    print(f"\n{db_url.split(':')[0]}: one tick with 32 running requests: "
          f"median {statistics.median(took) * 1e3:.2f} ms, max {max(took) * 1e3:.2f} ms")


def test_a_server_taken_for_dead_registers_again(db_url: str, tmp_path: Path) -> None:
    """A server whose heartbeats could not reach the database for the timeout is settled
    by another; its next tick notices, registers again and journals its requests anew,
    so they are not lost a second time."""
    async def scenario(a: Cloud, b: Cloud) -> None:
        p = await tenant(a)
        await a.journal.start(None, "127.0.0.1", 0)
        run = a.journal.track("slow", p, "m", 7, DOLLAR_PER_TOKEN, None, datetime.now(UTC))
        run.completion_tokens = 3
        await a.journal.tick()
        await asyncio.sleep(0.3)
        assert await Journal(b.direct, b.ledger, new_instance_id(),
                             stale_after=0.2).settle_dead() == 1
        run.completion_tokens = 4
        await a.journal.tick()  # the heartbeat finds no row: registered again, rewritten
        await a.journal.tick()

    with_clouds(db_url, tmp_path, scenario, processes=2)
    assert len(rows(db_url, "SELECT id FROM server_instances")) == 1
    assert rows(db_url, "SELECT request_id, completion_tokens FROM progress_journal") == [
        ("slow", 4)]
    assert rows(db_url, "SELECT request_id, status, completion_tokens FROM usage") == [
        ("slow", "interrupted", 3)]
