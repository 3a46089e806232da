"""Console sessions against real SQLite and PostgreSQL: only a hash of the token is kept,
expiry and revocation are decided by the server, sign-out removes the row."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TypeVar

from sqlalchemy import create_engine, text

from aicloud.accounts.base import AdminScope, Role, hash_secret
from aicloud.accounts.console_sessions import ConsoleSessions, csrf_token_of, same_secret
from aicloud.config import Settings
from aicloud.services import Cloud, open_cloud
from aicloud.store import db, migrate

T = TypeVar("T")
ROOT = AdminScope.installation()


def with_sessions(url: str, action: Callable[[Cloud, ConsoleSessions], Awaitable[T]],
                  lifetime: timedelta = timedelta(hours=1)) -> T:
    migrate.upgrade(url)

    async def go() -> T:
        cloud = open_cloud(Settings(database_url=url))
        try:
            sessions = ConsoleSessions(db.session_factory(cloud.database), cloud.admin_keys,
                                       lifetime)
            return await action(cloud, sessions)
        finally:
            await cloud.close()

    return asyncio.run(go())


def stored(url: str) -> list[tuple[str, str]]:
    with create_engine(db.sync_url(url)).connect() as conn:
        return [tuple(r) for r in conn.execute(text(
            "SELECT token_hash, admin_key_id FROM console_sessions"))]


def test_a_session_acts_as_its_admin_key_and_only_its_hash_is_stored(db_url: str) -> None:
    async def go(cloud: Cloud, sessions: ConsoleSessions) -> None:
        org = await cloud.orgs.create_org(ROOT, "acme")
        view, secret = await cloud.admin_keys.create(ROOT, "viewer", org.id)
        opened = await sessions.open(secret)
        assert opened is not None
        token, signed = opened
        assert signed.scope == AdminScope(view.id, Role.VIEWER, org.id)
        assert stored(db_url) == [(hash_secret(token), view.id)]
        again = await sessions.resolve(token)
        assert again is not None and again.scope == signed.scope
        assert again.csrf_token == signed.csrf_token == csrf_token_of(token)
        assert token not in signed.csrf_token and hash_secret(token) != signed.csrf_token
        assert await sessions.open("sk-aic-admin-" + "x" * 43) is None
        assert await sessions.resolve(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
        assert await sessions.resolve("'; DROP TABLE console_sessions; --") is None

    with_sessions(db_url, go)


def test_sign_out_and_revoking_the_admin_key_end_sessions(db_url: str) -> None:
    async def go(cloud: Cloud, sessions: ConsoleSessions) -> None:
        view, secret = await cloud.admin_keys.create(ROOT, "admin")
        first = await sessions.open(secret)
        second = await sessions.open(secret)
        assert first is not None and second is not None
        await sessions.close(first[0])
        assert await sessions.resolve(first[0]) is None
        assert await sessions.resolve(second[0]) is not None
        await cloud.admin_keys.revoke(ROOT, view.id)
        assert await sessions.resolve(second[0]) is None
        assert await sessions.open(secret) is None

    with_sessions(db_url, go)


def test_expiry_is_the_servers_and_expired_rows_are_swept(db_url: str) -> None:
    async def go(cloud: Cloud, sessions: ConsoleSessions) -> None:
        _, secret = await cloud.admin_keys.create(ROOT, "owner")
        opened = await sessions.open(secret)
        assert opened is not None
        await asyncio.sleep(1.2)
        assert await sessions.resolve(opened[0]) is None
        assert len(stored(db_url)) == 1
        fresh = await sessions.open(secret)  # a sign-in sweeps the expired rows
        assert fresh is not None
        assert stored(db_url) == [(hash_secret(fresh[0]), fresh[1].scope.key_id)]

    with_sessions(db_url, go, lifetime=timedelta(seconds=1))


def test_csrf_comparison() -> None:
    assert same_secret("abc", "abc")
    assert not same_secret(None, "abc")
    assert not same_secret("abd", "abc")
    assert not same_secret("", "abc")
