"""Organizations and their projects. Every read is filtered by the caller's scope, so a
foreign id looks exactly like a missing one."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from aicloud.accounts.base import (
    AccountError,
    AdminScope,
    NotFound,
    Role,
    aware,
    check_limit,
    check_name,
    new_id,
    now,
)
from aicloud.store.tables import Organization, Project

DEFAULT_ORG = "default"


@dataclass(slots=True, frozen=True)
class OrgView:
    id: str
    name: str
    budget_pico: int | None
    created_at: datetime

    @classmethod
    def of(cls, org: Organization) -> OrgView:
        return cls(org.id, org.name, org.budget_pico, aware(org.created_at))


@dataclass(slots=True, frozen=True)
class ProjectView:
    id: str
    organization_id: str
    name: str
    rpm_limit: int | None
    tpm_limit: int | None
    budget_pico: int | None
    weight: float
    created_at: datetime

    @classmethod
    def of(cls, p: Project) -> ProjectView:
        return cls(p.id, p.organization_id, p.name, p.rpm_limit, p.tpm_limit, p.budget_pico,
                   p.weight, aware(p.created_at))


def _check_budget(value: int | None) -> int | None:
    if value is not None and (not isinstance(value, int) or value < 0):
        raise AccountError("budget must be a non-negative amount or null", "budget_usd")
    return value


def _check_weight(value: float) -> float:
    if not isinstance(value, int | float) or not math.isfinite(value) or not 0.01 <= value <= 100:
        raise AccountError("weight must be between 0.01 and 100", "weight")
    return float(value)


PROJECT_FIELDS: dict[str, Callable[[Any], Any]] = {
    "name": lambda v: check_name(v, "project"),
    "rpm_limit": lambda v: check_limit(v, "rpm_limit"),
    "tpm_limit": lambda v: check_limit(v, "tpm_limit"),
    "budget_pico": _check_budget,
    "weight": _check_weight,
}
ORG_FIELDS: dict[str, Callable[[Any], Any]] = {
    "name": lambda v: check_name(v, "organization"),
    "budget_pico": _check_budget,
}


def _apply(row: Any, changes: dict[str, Any], fields: dict[str, Any]) -> None:
    for key, value in changes.items():
        if key not in fields:
            raise AccountError(f"'{key}' cannot be changed", key)
        setattr(row, key, fields[key](value))


class OrgService:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    # -- organizations ----------------------------------------------------------------------

    async def create_org(self, scope: AdminScope, name: str,
                         budget_pico: int | None = None) -> OrgView:
        scope.require(Role.ADMIN, installation=True)
        org = Organization(id=new_id("org"), name=check_name(name, "organization"),
                           budget_pico=_check_budget(budget_pico), created_at=now())
        await self._add(org, f"an organization named '{name}' already exists")
        return OrgView.of(org)

    async def list_orgs(self, scope: AdminScope) -> list[OrgView]:
        query = select(Organization).order_by(Organization.created_at)
        if not scope.installation_wide:
            query = query.where(Organization.id == scope.organization_id)
        async with self._sessions() as session:
            return [OrgView.of(o) for o in await session.scalars(query)]

    async def get_org(self, scope: AdminScope, org_id: str) -> OrgView:
        async with self._sessions() as session:
            return OrgView.of(await self.org(session, scope, org_id))

    async def update_org(self, scope: AdminScope, org_id: str,
                         changes: dict[str, Any]) -> OrgView:
        scope.require(Role.OWNER if "budget_pico" in changes else Role.ADMIN)
        async with self._sessions.begin() as session:
            org = await self.org(session, scope, org_id)
            if "budget_pico" in changes and not scope.installation_wide:
                raise AccountError("an organization's budget is set by the installation",
                                   "budget_usd")
            _apply(org, changes, ORG_FIELDS)
            await self._flush(session, "that organization name is taken")
            return OrgView.of(org)

    async def org(self, session: AsyncSession, scope: AdminScope, org_id: str) -> Organization:
        org = await session.get(Organization, org_id) if isinstance(org_id, str) else None
        if org is None or not scope.sees(org.id):
            raise NotFound("organization", str(org_id))
        return org

    # -- projects -------------------------------------------------------------------------

    async def create_project(self, scope: AdminScope, organization_id: str | None, name: str,
                             settings: dict[str, Any] | None = None) -> ProjectView:
        scope.require(Role.ADMIN)
        org_id = organization_id or scope.organization_id
        if org_id is None:
            raise AccountError("organization_id is required", "organization_id")
        async with self._sessions.begin() as session:
            await self.org(session, scope, org_id)
            project = Project(id=new_id("proj"), organization_id=org_id,
                              name=check_name(name, "project"), created_at=now(), weight=1.0)
            _apply(project, settings or {}, PROJECT_FIELDS)
            session.add(project)
            await self._flush(session, f"the organization already has a project '{name}'")
            return ProjectView.of(project)

    async def list_projects(self, scope: AdminScope,
                            organization_id: str | None = None) -> list[ProjectView]:
        query = select(Project).order_by(Project.created_at)
        if organization_id is not None:
            query = query.where(Project.organization_id == organization_id)
        if not scope.installation_wide:
            query = query.where(Project.organization_id == scope.organization_id)
        async with self._sessions() as session:
            return [ProjectView.of(p) for p in await session.scalars(query)]

    async def get_project(self, scope: AdminScope, project_id: str) -> ProjectView:
        async with self._sessions() as session:
            return ProjectView.of(await self.project(session, scope, project_id))

    async def update_project(self, scope: AdminScope, project_id: str,
                             changes: dict[str, Any]) -> ProjectView:
        scope.require(Role.ADMIN)
        async with self._sessions.begin() as session:
            project = await self.project(session, scope, project_id)
            _apply(project, changes, PROJECT_FIELDS)
            await self._flush(session, "the organization already has a project with that name")
            return ProjectView.of(project)

    async def project(self, session: AsyncSession, scope: AdminScope, project_id: str) -> Project:
        project = await session.get(Project, project_id) if isinstance(project_id, str) else None
        if project is None or not scope.sees(project.organization_id):
            raise NotFound("project", str(project_id))
        return project

    async def project_by_name(self, name: str) -> Project:
        """The CLI's `--project NAME`: a project of the default organization, made if new."""
        check_name(name, "project")
        async with self._sessions.begin() as session:
            org = await session.scalar(select(Organization).where(
                Organization.name == DEFAULT_ORG))
            if org is None:
                org = Organization(id=new_id("org"), name=DEFAULT_ORG, created_at=now())
                session.add(org)
                await session.flush()
            found = await session.scalar(select(Project).where(
                Project.organization_id == org.id, Project.name == name))
            if found:
                return found
            project = Project(id=new_id("proj"), organization_id=org.id, name=name,
                              created_at=now(), weight=1.0)
            session.add(project)
            return project

    # -- helpers ----------------------------------------------------------------------------

    async def _add(self, row: Any, conflict: str) -> None:
        async with self._sessions.begin() as session:
            session.add(row)
            await self._flush(session, conflict)

    @staticmethod
    async def _flush(session: AsyncSession, conflict: str) -> None:
        try:
            await session.flush()
        except IntegrityError:
            raise AccountError(conflict, "name") from None
