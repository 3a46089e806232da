"""API keys: listed by prefix, created and rotated (the secret shown once, on the answer to
that POST and never again), revoked, limited to models, given an expiry and limits."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from starlette.datastructures import FormData

from aicloud.accounts.base import AccountError, Role
from aicloud.accounts.keys import KeyView
from aicloud.console.forms import (
    FieldError,
    errors_of,
    model_list,
    optional_int,
    optional_moment,
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
    pool_of,
    render,
    see_other,
)

router = APIRouter(prefix="/console", route_class=ConsoleRoute)

SECRET_HEADERS = {"cache-control": "no-store"}


def key_settings(form: FormData) -> dict[str, Any]:
    return {"name": text(form, "name"), "allowed_models": model_list(form, "allowed_models"),
            "expires_at": optional_moment(form, "expires_at"),
            "rpm_limit": optional_int(form, "rpm_limit"),
            "tpm_limit": optional_int(form, "tpm_limit")}


async def _keys_page(request: Request, signed: SignedInDep, form: Form | None = None,
                     created: tuple[KeyView, str] | None = None, status: int = 200
                     ) -> HTMLResponse:
    cloud, scope = cloud_of(request), signed.scope
    project_id = request.query_params.get("project_id") or None
    if project_id is not None:
        await cloud.orgs.get_project(scope, project_id)  # a foreign project is a 404
    keys = await cloud.keys.list_keys(scope, project_id)
    keys.sort(key=lambda k: (k.status != "active", k.prefix))
    return await render(
        request, "keys.html", status, SECRET_HEADERS if created else None, keys=keys,
        projects=await cloud.orgs.list_projects(scope), project_id=project_id,
        models=[c.id for c in pool_of(request).cards()], form=form or Form(),
        created=created, may_edit=scope.role >= Role.ADMIN)


@nav_page(router, "/keys", "Keys", 30)
async def keys(request: Request, signed: SignedInDep) -> HTMLResponse:
    return await _keys_page(request, signed)


@router.post("/keys", response_class=HTMLResponse)
async def create_key(request: Request, signed: ActingDep) -> Response:
    form = await request.form()
    try:
        if not (project_id := text(form, "project_id")):
            raise FieldError("choose a project", "project_id")
        created = await cloud_of(request).keys.create_key(signed.scope, project_id,
                                                          key_settings(form))
    except AccountError as exc:
        return await _keys_page(request, signed, Form(values(form), errors_of(exc, "name")),
                                status=400)
    return await _keys_page(request, signed, created=created, status=201)


async def _key_page(request: Request, signed: SignedInDep, key_id: str,
                    form: Form | None = None, status: int = 200) -> HTMLResponse:
    key = await cloud_of(request).keys.get_key(signed.scope, key_id)
    return await render(request, "key.html", status, key=key, form=form or Form(),
                        models=[c.id for c in pool_of(request).cards()],
                        may_edit=signed.scope.role >= Role.ADMIN)


@router.get("/keys/{key_id}", response_class=HTMLResponse)
async def key(request: Request, key_id: str, signed: SignedInDep) -> HTMLResponse:
    return await _key_page(request, signed, key_id)


@router.post("/keys/{key_id}", response_class=HTMLResponse)
async def update_key(request: Request, key_id: str, signed: ActingDep) -> Response:
    form = await request.form()
    try:
        await cloud_of(request).keys.update_key(signed.scope, key_id, key_settings(form))
    except AccountError as exc:
        return await _key_page(request, signed, key_id,
                               Form(values(form), errors_of(exc, "name")), 400)
    return see_other(f"/console/keys/{key_id}")


@router.post("/keys/{key_id}/revoke", response_class=HTMLResponse)
async def revoke_key(request: Request, key_id: str, signed: ActingDep) -> Response:
    await cloud_of(request).keys.revoke(signed.scope, key_id)
    return see_other("/console/keys")


@router.post("/keys/{key_id}/rotate", response_class=HTMLResponse)
async def rotate_key(request: Request, key_id: str, signed: ActingDep) -> Response:
    created = await cloud_of(request).keys.rotate(signed.scope, key_id)
    return await _keys_page(request, signed, created=created)
