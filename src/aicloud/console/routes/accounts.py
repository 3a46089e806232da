"""Organizations and projects: budgets against this month's spend, limits, weights."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from starlette.datastructures import FormData

from aicloud.accounts.base import AccountError, AdminScope, Role
from aicloud.accounts.orgs import OrgView, ProjectView
from aicloud.console.forms import (
    changes_only,
    errors_of,
    number,
    optional_int,
    optional_usd,
    text,
    values,
)
from aicloud.console.web import (
    ActingDep,
    ConsoleRoute,
    Form,
    SignedInDep,
    cloud_of,
    nav_page,
    render,
    see_other,
)
from aicloud.services import Cloud

router = APIRouter(prefix="/console", route_class=ConsoleRoute)


@dataclass(slots=True, frozen=True)
class Spend:
    spent_pico: int
    held_pico: int
    budget_pico: int | None

    @property
    def used(self) -> float | None:
        """Spent and held over budget, for the gauge (None: no budget)."""
        if self.budget_pico is None:
            return None
        return min((self.spent_pico + self.held_pico) / max(self.budget_pico, 1), 1.0)


async def _spends(cloud: Cloud, column: str,
                  budgets: dict[str, int | None]) -> list[Spend]:
    """This month's spend of each id in `budgets` (ordered as given), in two reads."""
    found = await cloud.budgets.month_to_date_of(column, list(budgets))
    return [Spend(*found[i], budget) for i, budget in budgets.items()]


def _may(scope: AdminScope, role: Role, installation: bool = False) -> bool:
    """Whether to offer a form; the service decides all the same."""
    return scope.role >= role and (scope.installation_wide or not installation)


def project_settings(form: FormData) -> dict[str, Any]:
    sent = {"rpm_limit": optional_int(form, "rpm_limit"),
            "tpm_limit": optional_int(form, "tpm_limit"),
            "budget_pico": optional_usd(form, "budget_usd"),
            "weight": number(form, "weight", 1.0)}
    return changes_only(sent, form)


# -- organizations ------------------------------------------------------------------------------

async def _orgs_page(request: Request, signed: SignedInDep, form: Form,
                     status: int = 200) -> HTMLResponse:
    cloud = cloud_of(request)
    orgs = await cloud.orgs.list_orgs(signed.scope)
    spends = await _spends(cloud, "organization_id", {o.id: o.budget_pico for o in orgs})
    rows = list(zip(orgs, spends, strict=True))
    return await render(request, "organizations.html", status, rows=rows, form=form,
                        may_create=_may(signed.scope, Role.ADMIN, installation=True))


@nav_page(router, "/organizations", "Organizations", 20)
async def organizations(request: Request, signed: SignedInDep) -> HTMLResponse:
    return await _orgs_page(request, signed, Form())


@router.post("/organizations", response_class=HTMLResponse)
async def create_organization(request: Request, signed: ActingDep) -> Response:
    form = await request.form()
    try:
        org = await cloud_of(request).orgs.create_org(signed.scope, text(form, "name"),
                                                      optional_usd(form, "budget_usd"))
    except AccountError as exc:
        return await _orgs_page(request, signed, Form(values(form), errors_of(exc, "name")),
                                400)
    return see_other(f"/console/organizations/{org.id}")


async def _org_page(request: Request, signed: SignedInDep, org_id: str,
                    org_form: Form | None = None, project_form: Form | None = None,
                    status: int = 200) -> HTMLResponse:
    cloud, scope = cloud_of(request), signed.scope
    org: OrgView = await cloud.orgs.get_org(scope, org_id)
    projects = await cloud.orgs.list_projects(scope, org.id)
    [spend], spends = await asyncio.gather(
        _spends(cloud, "organization_id", {org.id: org.budget_pico}),
        _spends(cloud, "project_id", {p.id: p.budget_pico for p in projects}))
    return await render(
        request, "organization.html", status, org=org,
        rows=list(zip(projects, spends, strict=True)), spend=spend,
        org_form=org_form or Form(), project_form=project_form or Form(),
        may_edit=_may(scope, Role.ADMIN), may_budget=_may(scope, Role.OWNER, installation=True))


@router.get("/organizations/{org_id}", response_class=HTMLResponse)
async def organization(request: Request, org_id: str, signed: SignedInDep) -> HTMLResponse:
    return await _org_page(request, signed, org_id)


@router.post("/organizations/{org_id}", response_class=HTMLResponse)
async def update_organization(request: Request, org_id: str, signed: ActingDep) -> Response:
    form = await request.form()
    try:
        changes = changes_only({"name": text(form, "name"),
                                "budget_pico": optional_usd(form, "budget_usd")}, form)
        await cloud_of(request).orgs.update_org(signed.scope, org_id, changes)
    except AccountError as exc:
        return await _org_page(request, signed, org_id,
                               org_form=Form(values(form), errors_of(exc, "name")), status=400)
    return see_other(f"/console/organizations/{org_id}")


@router.post("/organizations/{org_id}/projects", response_class=HTMLResponse)
async def create_project(request: Request, org_id: str, signed: ActingDep) -> Response:
    form = await request.form()
    try:
        await cloud_of(request).orgs.create_project(signed.scope, org_id, text(form, "name"),
                                                    project_settings(form))
    except AccountError as exc:
        return await _org_page(request, signed, org_id, status=400,
                               project_form=Form(values(form), errors_of(exc, "name")))
    return see_other(f"/console/organizations/{org_id}")


# -- one project -------------------------------------------------------------------------------

async def _project_page(request: Request, signed: SignedInDep, project_id: str,
                        form: Form | None = None, status: int = 200) -> HTMLResponse:
    cloud = cloud_of(request)
    project: ProjectView = await cloud.orgs.get_project(signed.scope, project_id)
    return await render(request, "project.html", status, project=project, form=form or Form(),
                        spend=(await _spends(cloud, "project_id",
                                             {project.id: project.budget_pico}))[0],
                        may_edit=_may(signed.scope, Role.ADMIN))


@router.get("/projects/{project_id}", response_class=HTMLResponse)
async def project(request: Request, project_id: str, signed: SignedInDep) -> HTMLResponse:
    return await _project_page(request, signed, project_id)


@router.post("/projects/{project_id}", response_class=HTMLResponse)
async def update_project(request: Request, project_id: str, signed: ActingDep) -> Response:
    form = await request.form()
    try:
        changes = {"name": text(form, "name"), **project_settings(form)}
        await cloud_of(request).orgs.update_project(signed.scope, project_id, changes)
    except AccountError as exc:
        return await _project_page(request, signed, project_id,
                                   Form(values(form), errors_of(exc, "name")), 400)
    return see_other(f"/console/projects/{project_id}")
