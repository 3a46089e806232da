"""The model catalog: each model's state in this server's pool (refreshed live), load,
unload, pin, unpin and remove, adding a model, and pulls with their progress. Every action
calls the service its `/admin/v1` route calls (models/admin.py) with the session's scope,
and forms are checked by the API's own body schemas: the console allows, refuses and
hides exactly what the API does."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from starlette.datastructures import FormData

from aicloud.accounts.base import AccountError, Forbidden, Role
from aicloud.api.routes.admin.model_schemas import ModelCreate
from aicloud.api.routes.admin.pulls import PullCreate
from aicloud.console.forms import FieldError, errors_of, filled, model_list, validated, values
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
from aicloud.engines.base import EngineError, EngineUnavailable
from aicloud.models import admin
from aicloud.models.admin import ModelAdmin, PullConflict
from aicloud.models.catalog import CatalogError
from aicloud.models.pulls import PullError, Pulls

router = APIRouter(prefix="/console", route_class=ConsoleRoute)

REFRESH_MS = 2000
MODEL_FIELDS = ("id", "engine", "source", "provider", "upstream_model", "keep_alive")
PULL_FIELDS = ("source", "id", "sha256", "keep_alive")
PULL = "pull_"  # the pull form's field names start with it (the add form has an id too)


def models_of(request: Request) -> ModelAdmin:
    cloud = cloud_of(request)
    return ModelAdmin(cloud.catalog, pool_of(request), cloud.prices)


def pulls_of(request: Request) -> Pulls:
    pulls: Pulls = request.app.state.pulls
    return pulls


async def _live(request: Request, signed: SignedInDep) -> dict[str, Any]:
    """What the live part shows: the models, and the pulls to keys that may list them."""
    scope = signed.scope
    try:
        pulls = list(reversed(admin.list_pulls(scope, pulls_of(request))))
    except Forbidden:
        pulls = None
    orgs = {o.id: o.name for o in await cloud_of(request).orgs.list_orgs(scope)}
    return {"described": await models_of(request).described(scope), "pulls": pulls,
            "org_names": orgs, "private": scope.installation_wide,
            "may_act": scope.role >= Role.ADMIN and scope.installation_wide}


async def _page(request: Request, signed: SignedInDep, add_form: Form | None = None,
                pull_form: Form | None = None, notice: str | None = None,
                status: int = 200) -> HTMLResponse:
    return await render(request, "models.html", status, **await _live(request, signed),
                        add_form=add_form or Form(), pull_form=pull_form or Form(),
                        notice=notice, refresh_ms=REFRESH_MS,
                        providers=await _provider_names(request, signed))


async def _provider_names(request: Request, signed: SignedInDep) -> list[str]:
    """For the add form's hint (installation-wide keys only, as providers are)."""
    if not signed.scope.installation_wide:
        return []
    return [p.name for p in await cloud_of(request).providers.views()]


@nav_page(router, "/models", "Models", 45)
async def models(request: Request, signed: SignedInDep) -> HTMLResponse:
    return await _page(request, signed)


@router.get("/models/live", response_class=HTMLResponse)
async def models_live(request: Request, signed: SignedInDep) -> HTMLResponse:
    """The page's live part alone (states, pulls), swapped in by its script every 2 s."""
    return await render(request, "_models_live.html", **await _live(request, signed))


def _model_body(form: FormData) -> dict[str, Any]:
    """The add form as the admin API's JSON body."""
    body: dict[str, Any] = filled(form, *MODEL_FIELDS)
    body["aliases"] = model_list(form, "aliases") or []
    body["organizations"] = model_list(form, "organizations")
    body["pinned"] = "pinned" in form
    body["options"] = filled(form, "weights", "context", "sequences")
    return body


@router.post("/models", response_class=HTMLResponse)
async def add_model(request: Request, signed: ActingDep) -> Response:
    signed.scope.require(Role.ADMIN, installation=True)  # before reading the form, as the API
    form = await request.form()
    try:
        body = validated(ModelCreate, _model_body(form))
        try:
            entry = body.entry()
        except CatalogError as exc:
            raise FieldError(str(exc), admin.culprit(exc)) from None
        await models_of(request).add(signed.scope, entry)
    except AccountError as exc:
        return await _page(request, signed, add_form=Form(values(form), errors_of(exc, "id")),
                           status=400)
    return see_other("/console/models")


async def _act(request: Request, signed: ActingDep, model: str, action: str) -> Response:
    models, scope = models_of(request), signed.scope
    try:
        if action == "load":
            await models.load(scope, model)
        elif action == "unload":
            await models.unload(scope, model)
        elif action in ("pin", "unpin"):
            await models.set_pinned(scope, model, action == "pin")
        else:
            await models.remove(scope, model)
    except (EngineError, EngineUnavailable) as exc:  # the load failed, or found no room yet
        return await _page(request, signed, notice=f"{model}: {exc}", status=503)
    return see_other("/console/models")


@router.post("/models/{model}/{action}", response_class=HTMLResponse)
async def model_action(request: Request, model: str, action: str,
                       signed: ActingDep) -> Response:
    if action not in ("load", "unload", "pin", "unpin", "remove"):
        return await _page(request, signed, notice=f"no action {action[:16]!r}", status=404)
    return await _act(request, signed, model, action)


# -- pulls ------------------------------------------------------------------------------------

def _pull_body(form: FormData) -> dict[str, Any]:
    body: dict[str, Any] = filled(form, *PULL_FIELDS, prefix=PULL)
    body["aliases"] = model_list(form, PULL + "aliases") or []
    body["pinned"] = PULL + "pinned" in form
    body["options"] = filled(form, "weights", prefix=PULL)
    return body


def _pull_field(exc: Exception) -> str:
    """The pull form's field a refusal is about."""
    text = str(exc)
    if isinstance(exc, PullConflict) or "name" in text:
        return PULL + "id"
    if isinstance(exc, CatalogError):
        return PULL + admin.culprit(exc)
    return PULL + ("sha256" if "sha256" in text else "source")


@router.post("/models/pulls", response_class=HTMLResponse)
async def start_pull(request: Request, signed: ActingDep) -> Response:
    signed.scope.require(Role.ADMIN, installation=True)
    form = await request.form()
    try:
        body = validated(PullCreate, _pull_body(form), PULL)
        await admin.start_pull(
            signed.scope, pulls_of(request), body.source, body.id, body.sha256,
            aliases=tuple(body.aliases), pinned=body.pinned, keep_alive=body.keep_alive,
            options=body.options)
    except (PullError, CatalogError) as exc:
        return await _page(request, signed, pull_form=Form(values(form), {
            _pull_field(exc): str(exc)}), status=409 if isinstance(exc, PullConflict) else 400)
    except AccountError as exc:
        return await _page(request, signed, pull_form=Form(values(form), errors_of(
            exc, PULL + "source")), status=400)
    return see_other("/console/models#pulls-h")


@router.post("/models/pulls/{pull_id}/cancel", response_class=HTMLResponse)
async def cancel_pull(request: Request, pull_id: str, signed: ActingDep) -> Response:
    admin.cancel_pull(signed.scope, pulls_of(request), pull_id)
    return see_other("/console/models#pulls-h")
