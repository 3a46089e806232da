"""Projects and their API keys. Only a SHA-256 of each secret is stored: the secrets are
random 256-bit strings, so a fast hash is as strong as a slow one and keeps auth cheap."""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from aicloud.store.tables import ApiKey, Organization, Project

KEY_PREFIX = "sk-aic-"
KEY_SHAPE = re.compile(r"^sk-aic-[A-Za-z0-9_-]{43}$")
NAME_SHAPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,99}$")
DEFAULT_ORG = "default"


class AccountError(ValueError):
    pass


@dataclass(slots=True, frozen=True)
class Principal:
    """Who is calling: what every later layer (limits, scheduling, billing) keys on."""

    organization_id: str
    project_id: str
    project_name: str
    api_key_id: str


@dataclass(slots=True, frozen=True)
class KeyView:
    id: str
    project: str
    name: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None


def new_id(kind: str) -> str:
    return f"{kind}_{secrets.token_hex(12)}"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def check_name(name: str, what: str) -> str:
    if not NAME_SHAPE.match(name):
        raise AccountError(
            f"invalid {what} name {name!r}: 1-100 letters, digits, spaces, '.', '_' or '-'"
        )
    return name


def now() -> datetime:
    return datetime.now(UTC)


class KeyService:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def create_key(self, project: str, name: str = "") -> tuple[KeyView, str]:
        """Create the project if needed and a key for it; the secret is returned only here."""
        check_name(project, "project")
        if name:
            check_name(name, "key")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        async with self._sessions.begin() as session:
            proj = await self._project(session, project)
            key = ApiKey(id=new_id("key"), project_id=proj.id, name=name,
                         prefix=secret[: len(KEY_PREFIX) + 4], secret_hash=hash_secret(secret),
                         created_at=now())
            session.add(key)
        return KeyView(key.id, project, name, key.prefix, key.created_at, None), secret

    async def _project(self, session: AsyncSession, name: str) -> Project:
        found = await session.scalar(select(Project).where(Project.name == name))
        if found:
            return found
        org = await session.scalar(select(Organization).where(Organization.name == DEFAULT_ORG))
        if org is None:
            org = Organization(id=new_id("org"), name=DEFAULT_ORG, created_at=now())
            session.add(org)
        proj = Project(id=new_id("proj"), organization_id=org.id, name=name, created_at=now())
        session.add(proj)
        await session.flush()
        return proj

    async def list_keys(self) -> list[KeyView]:
        async with self._sessions() as session:
            rows = await session.execute(
                select(ApiKey, Project.name).join(Project).order_by(ApiKey.created_at)
            )
            return [KeyView(k.id, p, k.name, k.prefix, k.created_at, k.revoked_at)
                    for k, p in rows]

    async def revoke(self, key_id: str) -> bool:
        async with self._sessions.begin() as session:
            key = await session.get(ApiKey, key_id)
            if key is None:
                return False
            key.revoked_at = key.revoked_at or now()
            return True

    async def authenticate(self, secret: str) -> Principal | None:
        """Malformed secrets never reach the database."""
        if not KEY_SHAPE.match(secret):
            return None
        async with self._sessions() as session:
            row = (await session.execute(
                select(ApiKey, Project)
                .join(Project)
                .where(ApiKey.secret_hash == hash_secret(secret), ApiKey.revoked_at.is_(None))
            )).first()
        if row is None:
            return None
        key, proj = row
        return Principal(proj.organization_id, proj.id, proj.name, key.id)

