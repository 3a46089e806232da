"""Admin routes for organizations, projects, API keys and admin keys."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from aicloud.api.deps import CloudDep, CurrentAdmin, parse_body
from aicloud.api.routes.admin.schemas import (
    AdminKeyCreate,
    KeyCreate,
    KeyUpdate,
    OrgCreate,
    OrgUpdate,
    ProjectCreate,
    ProjectUpdate,
    admin_key_json,
    documented,
    key_json,
    listing,
    org_json,
    project_json,
    spend_json,
)

router = APIRouter()


@router.get("/me")
async def me(scope: CurrentAdmin) -> dict[str, Any]:
    return {"object": "admin_key", "id": scope.key_id, "role": scope.role.label,
            "organization_id": scope.organization_id}


# -- organizations ------------------------------------------------------------------------

@router.post("/organizations", status_code=201, **documented(OrgCreate))
async def create_org(request: Request, scope: CurrentAdmin, cloud: CloudDep) -> dict[str, Any]:
    body = await parse_body(request, OrgCreate)
    changes = body.changes()
    return org_json(await cloud.orgs.create_org(scope, body.name, changes.get("budget_pico")))


@router.get("/organizations")
async def list_orgs(scope: CurrentAdmin, cloud: CloudDep) -> dict[str, Any]:
    return listing([org_json(o) for o in await cloud.orgs.list_orgs(scope)])


@router.get("/organizations/{org_id}")
async def get_org(org_id: str, scope: CurrentAdmin, cloud: CloudDep) -> dict[str, Any]:
    """The organization, with this month's spend, live holds and what is left."""
    org = await cloud.orgs.get_org(scope, org_id)
    spent, held = await cloud.budgets.month_to_date("organization_id", org.id)
    return {**org_json(org), "month_to_date": spend_json(spent, held, org.budget_pico)}


@router.patch("/organizations/{org_id}", **documented(OrgUpdate))
async def update_org(org_id: str, request: Request, scope: CurrentAdmin,
                     cloud: CloudDep) -> dict[str, Any]:
    body = await parse_body(request, OrgUpdate)
    return org_json(await cloud.orgs.update_org(scope, org_id, body.changes()))


# -- projects -----------------------------------------------------------------------------

@router.post("/projects", status_code=201, **documented(ProjectCreate))
async def create_project(request: Request, scope: CurrentAdmin,
                         cloud: CloudDep) -> dict[str, Any]:
    body = await parse_body(request, ProjectCreate)
    settings = body.changes()
    for field in ("name", "organization_id"):
        settings.pop(field, None)
    return project_json(await cloud.orgs.create_project(scope, body.organization_id, body.name,
                                                        settings))


@router.get("/projects")
async def list_projects(scope: CurrentAdmin, cloud: CloudDep,
                        organization_id: str | None = None) -> dict[str, Any]:
    if organization_id is not None:
        await cloud.orgs.get_org(scope, organization_id)
    return listing([project_json(p)
                    for p in await cloud.orgs.list_projects(scope, organization_id)])


@router.get("/projects/{project_id}")
async def get_project(project_id: str, scope: CurrentAdmin, cloud: CloudDep) -> dict[str, Any]:
    """The project, with this month's spend, live holds and what is left."""
    project = await cloud.orgs.get_project(scope, project_id)
    spent, held = await cloud.budgets.month_to_date("project_id", project.id)
    return {**project_json(project),
            "month_to_date": spend_json(spent, held, project.budget_pico)}


@router.patch("/projects/{project_id}", **documented(ProjectUpdate))
async def update_project(project_id: str, request: Request, scope: CurrentAdmin,
                         cloud: CloudDep) -> dict[str, Any]:
    body = await parse_body(request, ProjectUpdate)
    return project_json(await cloud.orgs.update_project(scope, project_id, body.changes()))


# -- API keys -----------------------------------------------------------------------------

@router.post("/keys", status_code=201, **documented(KeyCreate))
async def create_key(request: Request, scope: CurrentAdmin, cloud: CloudDep) -> dict[str, Any]:
    body = await parse_body(request, KeyCreate)
    view, secret = await cloud.keys.create_key(scope, body.project_id, body.changes())
    return key_json(view, secret)


@router.get("/keys")
async def list_keys(scope: CurrentAdmin, cloud: CloudDep,
                    project_id: str | None = None) -> dict[str, Any]:
    if project_id is not None:
        await cloud.orgs.get_project(scope, project_id)
    return listing([key_json(k) for k in await cloud.keys.list_keys(scope, project_id)])


@router.get("/keys/{key_id}")
async def get_key(key_id: str, scope: CurrentAdmin, cloud: CloudDep) -> dict[str, Any]:
    return key_json(await cloud.keys.get_key(scope, key_id))


@router.patch("/keys/{key_id}", **documented(KeyUpdate))
async def update_key(key_id: str, request: Request, scope: CurrentAdmin,
                     cloud: CloudDep) -> dict[str, Any]:
    body = await parse_body(request, KeyUpdate)
    return key_json(await cloud.keys.update_key(scope, key_id, body.changes()))


@router.post("/keys/{key_id}/revoke")
async def revoke_key(key_id: str, scope: CurrentAdmin, cloud: CloudDep) -> dict[str, Any]:
    return key_json(await cloud.keys.revoke(scope, key_id))


@router.post("/keys/{key_id}/rotate")
async def rotate_key(key_id: str, scope: CurrentAdmin, cloud: CloudDep) -> dict[str, Any]:
    view, secret = await cloud.keys.rotate(scope, key_id)
    return key_json(view, secret)


# -- admin keys ---------------------------------------------------------------------------

@router.post("/admin-keys", status_code=201, **documented(AdminKeyCreate))
async def create_admin_key(request: Request, scope: CurrentAdmin,
                           cloud: CloudDep) -> dict[str, Any]:
    body = await parse_body(request, AdminKeyCreate)
    view, secret = await cloud.admin_keys.create(scope, body.role, body.organization_id,
                                                 body.name)
    return admin_key_json(view, secret)


@router.get("/admin-keys")
async def list_admin_keys(scope: CurrentAdmin, cloud: CloudDep) -> dict[str, Any]:
    return listing([admin_key_json(k) for k in await cloud.admin_keys.list(scope)])


@router.post("/admin-keys/{key_id}/revoke")
async def revoke_admin_key(key_id: str, scope: CurrentAdmin, cloud: CloudDep) -> dict[str, Any]:
    return admin_key_json(await cloud.admin_keys.revoke(scope, key_id))
