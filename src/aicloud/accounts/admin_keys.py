"""Admin keys: roles over one organization, or over the whole installation."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from aicloud.accounts.base import (
    AccountError,
    AdminScope,
    NotFound,
    Role,
    aware,
    check_name,
    hash_secret,
    new_id,
    new_secret,
    now,
)
from aicloud.store.tables import AdminKey, Organization

ADMIN_PREFIX = "sk-aic-admin-"
ADMIN_SHAPE = re.compile(r"^sk-aic-admin-[A-Za-z0-9_-]{43}$")


@dataclass(slots=True, frozen=True)
class AdminKeyView:
    id: str
    organization_id: str | None
    role: str
    name: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None

    @classmethod
    def of(cls, key: AdminKey) -> AdminKeyView:
        return cls(key.id, key.organization_id, key.role, key.name, key.prefix,
                   aware(key.created_at), aware(key.revoked_at))


class AdminKeyService:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def create(self, scope: AdminScope, role: str, organization_id: str | None = None,
                     name: str = "") -> tuple[AdminKeyView, str]:
        """Owners mint keys, never above their own reach: an organization's owner can only
        create keys for that organization."""
        scope.require(Role.OWNER)
        wanted = Role.parse(role)
        org_id = organization_id if scope.installation_wide else scope.organization_id
        if organization_id is not None and organization_id != org_id:
            raise NotFound("organization", organization_id)
        secret, prefix, digest = new_secret(ADMIN_PREFIX)
        async with self._sessions.begin() as session:
            if org_id is not None and await session.get(Organization, org_id) is None:
                raise NotFound("organization", org_id)
            key = AdminKey(id=new_id("akey"), organization_id=org_id, role=wanted.label,
                           name=check_name(name, "key") if name else "", prefix=prefix,
                           secret_hash=digest, created_at=now())
            session.add(key)
        return AdminKeyView.of(key), secret

    async def list(self, scope: AdminScope) -> list[AdminKeyView]:
        scope.require(Role.OWNER)
        query = select(AdminKey).order_by(AdminKey.created_at)
        if not scope.installation_wide:
            query = query.where(AdminKey.organization_id == scope.organization_id)
        async with self._sessions() as session:
            return [AdminKeyView.of(k) for k in await session.scalars(query)]

    async def revoke(self, scope: AdminScope, key_id: str) -> AdminKeyView:
        scope.require(Role.OWNER)
        async with self._sessions.begin() as session:
            key = await session.get(AdminKey, key_id) if isinstance(key_id, str) else None
            if key is None or not (scope.installation_wide
                                   or key.organization_id == scope.organization_id):
                raise NotFound("admin key", str(key_id))
            if key.id == scope.key_id:
                raise AccountError("an admin key cannot revoke itself")
            key.revoked_at = key.revoked_at or now()
            return AdminKeyView.of(key)

    async def authenticate(self, secret: str) -> AdminScope | None:
        if not ADMIN_SHAPE.match(secret):
            return None
        async with self._sessions() as session:
            key = await session.scalar(select(AdminKey).where(
                AdminKey.secret_hash == hash_secret(secret), AdminKey.revoked_at.is_(None)))
        if key is None:
            return None
        return AdminScope(key.id, Role.parse(key.role), key.organization_id)
