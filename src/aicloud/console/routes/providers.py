"""Partner providers: listed with their settings and, once this server has sent them a
request, their breaker state; added, updated and removed by installation-wide admins. A
provider's key and header values are write-only: typed into a form, sealed by the store,
never rendered back (not even after a refused form). Every action calls the service its
`/admin/v1` route calls (providers/admin.py), and forms are checked by the API's schemas."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from starlette.datastructures import FormData

from aicloud.accounts.base import AccountError, Role
from aicloud.api.provider_metrics import links_of
from aicloud.api.routes.admin.providers import ProviderCreate, ProviderUpdate
from aicloud.console.forms import FieldError, errors_of, filled, text, validated, values
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
from aicloud.providers.admin import SETTINGS, ProviderAdmin
from aicloud.providers.breaker import BreakerState

router = APIRouter(prefix="/console", route_class=ConsoleRoute)

SECRETS = ("api_key", "headers")  # never shown again, not even in a refused form
BREAKER = {BreakerState.CLOSED: "closed", BreakerState.HALF_OPEN: "half-open",
           BreakerState.OPEN: "open"}


@dataclass(slots=True, frozen=True)
class LinkState:
    """What this server holds for a provider it has sent requests to."""

    breaker: str
    in_flight: int
    failures: int


def providers_of(request: Request) -> ProviderAdmin:
    return ProviderAdmin(cloud_of(request).providers)


def _links(request: Request) -> dict[str, LinkState]:
    return {link.name: LinkState(BREAKER[link.breaker.state], link.metrics.in_flight,
                                 link.breaker.failures)
            for link in links_of(pool_of(request).items())}


def headers_of(form: FormData) -> dict[str, str] | None:
    """`Name: value` lines as a dict; None when the field is empty."""
    raw = text(form, "headers")
    if not raw:
        return None
    out = {}
    for line in raw.splitlines():
        name, sep, value = line.partition(":")
        if not line.strip():
            continue
        if not sep or not name.strip():
            raise FieldError("write one header a line, as Name: value", "headers")
        out[name.strip()] = value.strip()
    return out


def _body(form: FormData, *names: str) -> dict[str, Any]:
    body: dict[str, Any] = filled(form, *names, *SETTINGS)
    headers = headers_of(form)
    if headers is not None:
        body["headers"] = headers
    return body


def _may_edit(signed: SignedInDep) -> bool:
    return signed.scope.role >= Role.ADMIN and signed.scope.installation_wide


async def _list_page(request: Request, signed: SignedInDep, form: Form | None = None,
                     status: int = 200) -> HTMLResponse:
    return await render(request, "providers.html", status,
                        providers=await providers_of(request).views(signed.scope),
                        links=_links(request), form=form or Form(), may_edit=_may_edit(signed))


@nav_page(router, "/providers", "Providers", 47, installation=True)
async def providers(request: Request, signed: SignedInDep) -> HTMLResponse:
    return await _list_page(request, signed)


@router.post("/providers", response_class=HTMLResponse)
async def add_provider(request: Request, signed: ActingDep) -> Response:
    signed.scope.require(Role.ADMIN, installation=True)
    form = await request.form()
    try:
        body = validated(ProviderCreate, _body(form, "name", "base_url", "api_key",
                                               "api_key_env"))
        await providers_of(request).add(
            signed.scope, body.name, body.base_url, api_key=body.api_key,
            api_key_env=body.api_key_env, headers=body.headers, settings=body.settings())
    except AccountError as exc:
        return await _list_page(request, signed, Form(values(form, SECRETS),
                                                      errors_of(exc, "api_key")), 400)
    return see_other("/console/providers")


async def _provider_page(request: Request, signed: SignedInDep, name: str,
                         form: Form | None = None, status: int = 200) -> HTMLResponse:
    return await render(request, "provider.html", status,
                        provider=await providers_of(request).view(signed.scope, name),
                        link=_links(request).get(name), form=form or Form(),
                        may_edit=_may_edit(signed))


@router.get("/providers/{name}", response_class=HTMLResponse)
async def provider(request: Request, name: str, signed: SignedInDep) -> HTMLResponse:
    return await _provider_page(request, signed, name)


@router.post("/providers/{name}", response_class=HTMLResponse)
async def update_provider(request: Request, name: str, signed: ActingDep) -> Response:
    signed.scope.require(Role.ADMIN, installation=True)
    form = await request.form()
    try:
        body = validated(ProviderUpdate, _body(form, "base_url", "api_key", "api_key_env"))
        headers = {} if "clear_headers" in form else body.headers
        await providers_of(request).update(
            signed.scope, name, base_url=body.base_url, api_key=body.api_key,
            api_key_env=body.api_key_env, headers=headers, settings=body.settings())
    except AccountError as exc:
        return await _provider_page(request, signed, name, Form(
            values(form, SECRETS), errors_of(exc, "base_url")), 400)
    return see_other(f"/console/providers/{name}")


@router.post("/providers/{name}/remove", response_class=HTMLResponse)
async def remove_provider(request: Request, name: str, signed: ActingDep) -> Response:
    await providers_of(request).remove(signed.scope, name)
    return see_other("/console/providers")
