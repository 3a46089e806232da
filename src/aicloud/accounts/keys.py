"""API keys: scoped to one project, with an optional model allow-list, expiry and limits.

Only a SHA-256 of each secret is stored: the secrets are random 256-bit strings, so a fast
hash is as strong as a slow one and keeps authentication to one indexed lookup.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from aicloud.accounts.base import (
    AccountError,
    AdminScope,
    NotFound,
    Role,
    aware,
    check_limit,
    check_moment,
    check_name,
    hash_secret,
    new_id,
    new_secret,
    now,
)
from aicloud.accounts.orgs import OrgService
from aicloud.store.direct import Conn, Direct
from aicloud.store.tables import ApiKey, Project

KEY_PREFIX = "sk-aic-"
KEY_SHAPE = re.compile(r"^sk-aic-[A-Za-z0-9_-]{43}$")
MODEL_ID_SHAPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


@dataclass(slots=True, frozen=True)
class Principal:
    """Who is calling, and everything later layers (limits, budgets, scheduling, billing)
    need to know about them, read in the same lookup that checks the key."""

    organization_id: str
    project_id: str
    project_name: str
    api_key_id: str
    allowed_models: tuple[str, ...] | None = None
    key_rpm: int | None = None
    key_tpm: int | None = None
    project_rpm: int | None = None
    project_tpm: int | None = None
    project_budget_pico: int | None = None
    org_budget_pico: int | None = None
    weight: float = 1.0

    def may_use(self, model: str) -> bool:
        return self.allowed_models is None or model in self.allowed_models

    @property
    def has_budget(self) -> bool:
        return self.project_budget_pico is not None or self.org_budget_pico is not None


@dataclass(slots=True, frozen=True)
class KeyView:
    id: str
    project_id: str
    project: str
    name: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None
    expires_at: datetime | None = None
    allowed_models: tuple[str, ...] | None = None
    rpm_limit: int | None = None
    tpm_limit: int | None = None

    @classmethod
    def of(cls, key: ApiKey, project: str) -> KeyView:
        models = tuple(key.allowed_models) if key.allowed_models is not None else None
        return cls(key.id, key.project_id, project, key.name, key.prefix,
                   aware(key.created_at), aware(key.revoked_at), aware(key.expires_at),
                   models, key.rpm_limit, key.tpm_limit)

    @property
    def status(self) -> str:
        if self.revoked_at:
            return "revoked"
        if self.expires_at and self.expires_at <= now():
            return "expired"
        return "active"


def _check_models(models: list[str] | tuple[str, ...] | None) -> list[str] | None:
    if models is None:
        return None
    if not isinstance(models, list | tuple) or len(models) > 256 or not all(
            isinstance(m, str) and MODEL_ID_SHAPE.match(m) for m in models):
        raise AccountError("allowed_models must be a list of up to 256 model ids or null",
                           "allowed_models")
    return sorted(set(models))


def _check_expiry(moment: datetime | None) -> datetime | None:
    moment = check_moment(moment, "expires_at")
    if moment is not None and moment <= now():
        raise AccountError("expires_at must be in the future", "expires_at")
    return moment


KEY_FIELDS: dict[str, Callable[[Any], Any]] = {
    "name": lambda v: check_name(v, "key") if v else "",
    "allowed_models": _check_models,
    "expires_at": _check_expiry,
    "rpm_limit": lambda v: check_limit(v, "rpm_limit"),
    "tpm_limit": lambda v: check_limit(v, "tpm_limit"),
}


AUTHENTICATE = """
SELECT p.organization_id, p.id, p.name, k.id, k.allowed_models, k.rpm_limit, k.tpm_limit,
       p.rpm_limit, p.tpm_limit, p.budget_pico, o.budget_pico, p.weight, k.expires_at
FROM api_keys k JOIN projects p ON k.project_id = p.id
JOIN organizations o ON p.organization_id = o.id
WHERE k.secret_hash = :hash AND k.revoked_at IS NULL
"""


# the same, by key id: a batch runs with the key that created it, read again as it runs
BY_KEY_ID = AUTHENTICATE.replace("k.secret_hash = :hash", "k.id = :hash")


def _principal(conn: Conn, secret_hash: str, query: str = AUTHENTICATE) -> Principal | None:
    """Read on every request, never cached: a revoked key is refused by the very next
    request, whichever process revoked it."""
    row = conn.one(query, {"hash": secret_hash})
    if row is None:
        return None
    (org_id, project_id, project_name, key_id, models, key_rpm, key_tpm, project_rpm,
     project_tpm, project_budget, org_budget, weight, expires_at) = row
    expiry = conn.read_time(expires_at)
    if expiry is not None and expiry <= now():
        return None
    allowed = conn.read_json(models)
    return Principal(org_id, project_id, project_name, key_id,
                     tuple(allowed) if allowed is not None else None, key_rpm, key_tpm,
                     project_rpm, project_tpm, project_budget, org_budget, float(weight))


class KeyService:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], direct: Direct,
                 orgs: OrgService) -> None:
        self._sessions = sessions
        self._direct = direct
        self._orgs = orgs

    async def create_key(self, scope: AdminScope, project_id: str,
                         settings: dict[str, Any] | None = None) -> tuple[KeyView, str]:
        """The secret is returned only here (and by `rotate`)."""
        scope.require(Role.ADMIN)
        secret, prefix, digest = new_secret(KEY_PREFIX)
        async with self._sessions.begin() as session:
            project = await self._orgs.project(session, scope, project_id)
            key = ApiKey(id=new_id("key"), project_id=project.id, name="", prefix=prefix,
                         secret_hash=digest, created_at=now())
            self._apply(key, settings or {})
            session.add(key)
        return KeyView.of(key, project.name), secret

    async def create_for_project_name(self, project: str, name: str = "") -> tuple[KeyView, str]:
        proj = await self._orgs.project_by_name(project)
        return await self.create_key(AdminScope.installation(), proj.id, {"name": name})

    async def list_keys(self, scope: AdminScope, project_id: str | None = None) -> list[KeyView]:
        query = select(ApiKey, Project.name).join(Project).order_by(ApiKey.created_at)
        if project_id is not None:
            query = query.where(ApiKey.project_id == project_id)
        if not scope.installation_wide:
            query = query.where(Project.organization_id == scope.organization_id)
        async with self._sessions() as session:
            return [KeyView.of(k, p) for k, p in await session.execute(query)]

    async def get_key(self, scope: AdminScope, key_id: str) -> KeyView:
        async with self._sessions() as session:
            key, project = await self._key(session, scope, key_id)
            return KeyView.of(key, project.name)

    async def update_key(self, scope: AdminScope, key_id: str,
                         changes: dict[str, Any]) -> KeyView:
        scope.require(Role.ADMIN)
        async with self._sessions.begin() as session:
            key, project = await self._key(session, scope, key_id)
            self._apply(key, changes)
            return KeyView.of(key, project.name)

    async def revoke(self, scope: AdminScope, key_id: str) -> KeyView:
        scope.require(Role.ADMIN)
        async with self._sessions.begin() as session:
            key, project = await self._key(session, scope, key_id)
            key.revoked_at = key.revoked_at or now()
            return KeyView.of(key, project.name)

    async def rotate(self, scope: AdminScope, key_id: str) -> tuple[KeyView, str]:
        """A new secret for the same key (same id, limits and usage history); the old
        secret stops working at once."""
        scope.require(Role.ADMIN)
        secret, prefix, digest = new_secret(KEY_PREFIX)
        async with self._sessions.begin() as session:
            key, project = await self._key(session, scope, key_id)
            if key.revoked_at:
                raise AccountError("a revoked key cannot be rotated")
            key.prefix, key.secret_hash = prefix, digest
            return KeyView.of(key, project.name), secret

    async def authenticate(self, secret: str) -> Principal | None:
        """Malformed secrets never reach the database."""
        if not KEY_SHAPE.match(secret):
            return None
        secret_hash = hash_secret(secret)
        return await self._direct.run(lambda conn: _principal(conn, secret_hash))

    async def principal_of_key(self, key_id: str) -> Principal | None:
        """The key's Principal as `authenticate` would give it (None once revoked or
        expired), for work it started that runs without it (a batch)."""
        return await self._direct.run(lambda conn: _principal(conn, key_id, BY_KEY_ID))

    async def _key(self, session: AsyncSession, scope: AdminScope,
                   key_id: str) -> tuple[ApiKey, Project]:
        key = await session.get(ApiKey, key_id) if isinstance(key_id, str) else None
        project = await session.get(Project, key.project_id) if key else None
        if key is None or project is None or not scope.sees(project.organization_id):
            raise NotFound("key", str(key_id))
        return key, project

    @staticmethod
    def _apply(key: ApiKey, changes: dict[str, Any]) -> None:
        for field, value in changes.items():
            if field not in KEY_FIELDS:
                raise AccountError(f"'{field}' cannot be changed", field)
            setattr(key, field, KEY_FIELDS[field](value))
