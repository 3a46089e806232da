"""Schema, keys and the usage ledger against real SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from sqlalchemy import create_engine, func, inspect, select

from aicloud.accounts.base import AccountError, AdminScope, NotFound
from aicloud.accounts.keys import KeyService
from aicloud.accounts.orgs import OrgService
from aicloud.billing.usage import UsageEntry, UsageLedger
from aicloud.store import db, migrate
from aicloud.store.direct import Direct, vacuum_churn_tables
from aicloud.store.tables import MonthlySpend, UsageRecord


@pytest.fixture
def url(db_url: str) -> str:
    return db_url


def run(coro):
    return asyncio.run(coro)


async def with_sessions(url: str, action):
    """The ORM's sessions and the request path's direct connections, as a server has."""
    engine = db.create_engine_async(url)
    direct = Direct(url)
    try:
        return await action(db.session_factory(engine), direct)
    finally:
        await asyncio.to_thread(direct.close)
        await engine.dispose()


def test_migrations_create_the_schema_idempotently(url: str) -> None:
    migrate.upgrade(url)
    migrate.upgrade(url)
    engine = create_engine(db.sync_url(url))
    tables = set(inspect(engine).get_table_names())
    engine.dispose()
    assert {"organizations", "projects", "api_keys", "usage", "alembic_version", "admin_keys",
            "prices", "reservations", "credits", "monthly_spend"} <= tables


def test_keys_store_only_hashes_and_authenticate(url: str) -> None:
    migrate.upgrade(url)

    async def scenario(sessions, direct):
        keys = KeyService(sessions, direct, OrgService(sessions))
        view, secret = await keys.create_for_project_name("team-a", "ci")
        principal = await keys.authenticate(secret)
        assert principal is not None and principal.project_name == "team-a"
        assert principal.api_key_id == view.id
        assert await keys.authenticate(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
        assert await keys.authenticate("' OR 1=1 --") is None
        assert await keys.authenticate("sk-aic-\x00" + "a" * 42) is None
        _, other = await keys.create_for_project_name("team-a")
        assert (await keys.authenticate(other)).project_id == principal.project_id
        await keys.revoke(AdminScope.installation(), view.id)
        assert await keys.authenticate(secret) is None
        with pytest.raises(NotFound):
            await keys.revoke(AdminScope.installation(), "key_missing")
        return secret

    secret = run(with_sessions(url, scenario))
    engine = create_engine(db.sync_url(url))
    with engine.connect() as conn:
        dump = " ".join(str(row) for row in conn.exec_driver_sql("SELECT * FROM api_keys"))
    engine.dispose()
    assert secret not in dump and secret[7:] not in dump


@pytest.mark.parametrize("name", ["", "x" * 101, "a'; DROP TABLE projects; --", "nul\x00byte"])
def test_bad_project_names_are_refused(url: str, name: str) -> None:
    migrate.upgrade(url)
    with pytest.raises(AccountError):
        run(with_sessions(url, lambda s, d: KeyService(s, d, OrgService(s))
                          .create_for_project_name(name)))


def test_usage_rows_are_idempotent_by_request_id(url: str) -> None:
    migrate.upgrade(url)
    now = datetime.now(UTC)
    entry = UsageEntry("req-1", "org_1", "key_1", "proj_1", "m", 10, 2, 5, 7, "completed",
                       now, now)

    async def scenario(sessions, direct):
        ledger = UsageLedger(direct)
        await asyncio.gather(*(ledger.record(entry) for _ in range(5)))
        await ledger.record(UsageEntry("req-2", "org_1", "key_1", "proj_1", "m", 1, 0, 1, 0,
                                       "cancelled", now, now))
        async with sessions() as session:
            count = await session.scalar(select(func.count()).select_from(UsageRecord))
            row = await session.scalar(select(UsageRecord).where(
                UsageRecord.request_id == "req-1"))
            spend = {s.scope: s.spent_pico for s in await session.scalars(
                select(MonthlySpend).where(MonthlySpend.month == now.strftime("%Y-%m")))}
        return count, row, spend

    count, row, spend = run(with_sessions(url, scenario))
    assert count == 2
    assert spend == {"project:proj_1": 7, "organization:org_1": 7}  # counted once
    assert (row.prompt_tokens, row.cached_tokens, row.completion_tokens) == (10, 2, 5)


def test_churn_tables_are_vacuumed_when_postgres_does_not(url: str) -> None:
    """Holds are inserted and deleted by every request: with PostgreSQL's autovacuum off,
    the server's housekeeping vacuums them itself; SQLite needs nothing."""
    migrate.upgrade(url)

    async def scenario(sessions, direct):
        autovacuum = await direct.run(lambda c: c.one("SHOW autovacuum")[0]
                                      if c.dialect == "postgresql" else None)
        vacuumed = await direct.run(vacuum_churn_tables)
        last = await direct.run(lambda c: c.one(
            "SELECT last_vacuum FROM pg_stat_user_tables WHERE relname = 'reservations'")[0]
            if c.dialect == "postgresql" else None)
        return autovacuum, vacuumed, last

    autovacuum, vacuumed, last = run(with_sessions(url, scenario))
    assert vacuumed == (autovacuum == "off")
    assert (last is not None) == vacuumed
