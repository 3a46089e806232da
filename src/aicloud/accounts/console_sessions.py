"""Admin console sessions: a random token in the browser's cookie, only its hash here.

A session is worth what its admin key is worth: every lookup re-reads the key, so revoking
the key ends its sessions at once, and expiry is decided by the server's clock, not by the
cookie's lifetime.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from aicloud.accounts.admin_keys import AdminKeyService
from aicloud.accounts.base import AdminScope, Role, aware, hash_secret, now
from aicloud.store.tables import AdminKey, ConsoleSession

TOKEN_SHAPE = re.compile(r"^[A-Za-z0-9_-]{43}$")


def csrf_token_of(token: str) -> str:
    """The session's CSRF token, derived from the cookie's token: never stored, and not
    derivable from the stored hash, so a copy of the database forges neither."""
    return hashlib.sha256(f"console-csrf\x1f{token}".encode()).hexdigest()


def same_secret(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


@dataclass(slots=True, frozen=True)
class SignedIn:
    """A live console session: who it acts as, and the token its forms must carry."""

    scope: AdminScope
    csrf_token: str
    expires_at: datetime


class ConsoleSessions:
    def __init__(self, sessions: async_sessionmaker[AsyncSession],
                 admin_keys: AdminKeyService, lifetime: timedelta) -> None:
        self._sessions = sessions
        self._admin_keys = admin_keys
        self.lifetime = lifetime

    async def open(self, admin_secret: str) -> tuple[str, SignedIn] | None:
        """Sign in with an admin key: (cookie token, session), or None for a bad key.
        Expired sessions are swept here, so the table stays as small as its live rows."""
        scope = await self._admin_keys.authenticate(admin_secret)
        if scope is None:
            return None
        token = secrets.token_urlsafe(32)
        started = now()
        async with self._sessions.begin() as session:
            await session.execute(delete(ConsoleSession).where(
                ConsoleSession.expires_at <= started))
            session.add(ConsoleSession(token_hash=hash_secret(token), admin_key_id=scope.key_id,
                                       created_at=started, expires_at=started + self.lifetime))
        return token, SignedIn(scope, csrf_token_of(token), started + self.lifetime)

    async def resolve(self, token: str | None) -> SignedIn | None:
        """The live session behind a cookie, or None (unknown, expired, key revoked)."""
        if token is None or not TOKEN_SHAPE.match(token):
            return None
        async with self._sessions() as session:
            row = (await session.execute(
                select(AdminKey.id, AdminKey.role, AdminKey.organization_id,
                       ConsoleSession.expires_at)
                .join(AdminKey, AdminKey.id == ConsoleSession.admin_key_id)
                .where(ConsoleSession.token_hash == hash_secret(token),
                       AdminKey.revoked_at.is_(None)))).one_or_none()
        if row is None:
            return None
        expires_at = aware(row.expires_at)
        if expires_at <= now():
            return None
        scope = AdminScope(row.id, Role.parse(row.role), row.organization_id)
        return SignedIn(scope, csrf_token_of(token), expires_at)

    async def close(self, token: str) -> None:
        """Sign out: the row goes, so the cookie is worthless even if it was copied."""
        if TOKEN_SHAPE.match(token):
            async with self._sessions.begin() as session:
                await session.execute(delete(ConsoleSession).where(
                    ConsoleSession.token_hash == hash_secret(token)))
