"""Admin routes for the model catalog and the pool: add, list, show, remove, load,
unload, pin and unpin models; on Ray, a model's replica counts."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from aicloud.accounts.base import AccountError, AdminScope, NotFound, Role
from aicloud.api.deps import CloudDep, CurrentAdmin, PoolDep, parse_body
from aicloud.api.routes.admin.model_schemas import (
    ModelCreate,
    ModelJson,
    ModelList,
    ModelUpdate,
    model_json,
)
from aicloud.api.routes.admin.schemas import documented
from aicloud.api.routes.health import engine_view
from aicloud.api.routes.metrics import tenants_of, visible_tenants
from aicloud.cluster.replica_set import ReplicaSet
from aicloud.engines.base import EngineError
from aicloud.models.admin import ModelAdmin, culprit
from aicloud.models.catalog import CatalogError
from aicloud.models.pool import ModelPool, UnknownModel
from aicloud.scheduling.admission import unwrap
from aicloud.services import Cloud

router = APIRouter()


def model_admin(cloud: CloudDep, pool: PoolDep) -> ModelAdmin:
    return ModelAdmin(cloud.catalog, pool, cloud.prices)


ModelAdminDep = Annotated[ModelAdmin, Depends(model_admin)]


async def _models(scope: AdminScope, cloud: Cloud, pool: ModelPool, models: ModelAdmin,
                  only: str | None = None) -> list[ModelJson]:
    tenants = await visible_tenants(scope, cloud)
    engines = dict(pool.items())
    out = []
    for entry, view in await models.described(scope, only):
        engine = engines.get(entry.id)
        out.append(model_json(
            entry, view, private=scope.installation_wide,
            load=engine_view(engine) if engine is not None else None,
            tenants=tenants_of(engine, tenants) if engine is not None else None))
    return out


async def _one(scope: AdminScope, cloud: Cloud, pool: ModelPool, models: ModelAdmin,
               model: str) -> ModelJson:
    found = await _models(scope, cloud, pool, models, model)
    if not found:
        raise NotFound("model", model)
    return found[0]


@router.get("/models", response_model=ModelList)
async def list_models(scope: CurrentAdmin, cloud: CloudDep, pool: PoolDep,
                      models: ModelAdminDep) -> ModelList:
    """The catalog, each model with its state in this server (unloaded, loading, ready,
    draining, failed and why), its memory, its load and its tenants' scheduling state
    (waiting, running, served tokens, virtual counter), and on Ray its placement."""
    return ModelList(data=await _models(scope, cloud, pool, models))


@router.post("/models", status_code=201, response_model=ModelJson, **documented(ModelCreate))
async def add_model(request: Request, scope: CurrentAdmin, cloud: CloudDep, pool: PoolDep,
                    models: ModelAdminDep) -> ModelJson:
    """Add a model to the catalog (and set its prices); it loads on its first request,
    or at once when pinned. A local source must be a readable GGUF (or, for vLLM, a
    Hugging Face folder) on this server."""
    scope.require(Role.ADMIN, installation=True)
    body = await parse_body(request, ModelCreate)
    try:
        entry = body.entry()
    except CatalogError as exc:
        raise AccountError(str(exc), culprit(exc)) from None
    rates = body.prices.rates() if body.prices is not None else None
    entry = await models.add(scope, entry, rates)
    return await _one(scope, cloud, pool, models, entry.id)


@router.get("/models/{model}", response_model=ModelJson)
async def show_model(model: str, scope: CurrentAdmin, cloud: CloudDep, pool: PoolDep,
                     models: ModelAdminDep) -> ModelJson:
    return await _one(scope, cloud, pool, models, model)


@router.delete("/models/{model}", response_model=ModelJson)
async def remove_model(model: str, scope: CurrentAdmin, cloud: CloudDep, pool: PoolDep,
                       models: ModelAdminDep) -> ModelJson:
    """Remove a model from the catalog: new requests get a 404 at once, running ones
    finish, then it is unloaded."""
    scope.require(Role.ADMIN, installation=True)
    shown = await _one(scope, cloud, pool, models, model)
    await models.remove(scope, shown.id)
    return shown


@router.post("/models/{model}/load", response_model=ModelJson)
async def load_model(model: str, scope: CurrentAdmin, cloud: CloudDep, pool: PoolDep,
                     models: ModelAdminDep) -> ModelJson:
    """Load now (evicting idle models if need be); a failed model tries again. Answers
    once it is loaded, or with why it could not be (the model is then `failed`, or a 503
    when busy models leave no room yet)."""
    entry = await models.load(scope, model)
    return await _one(scope, cloud, pool, models, entry.id)


@router.post("/models/{model}/unload", response_model=ModelJson)
async def unload_model(model: str, scope: CurrentAdmin, cloud: CloudDep, pool: PoolDep,
                       models: ModelAdminDep) -> ModelJson:
    """Unload once its running requests finish (a pinned model too: it is loaded again
    within a second; unpin it to keep it unloaded)."""
    entry = await models.unload(scope, model)
    return await _one(scope, cloud, pool, models, entry.id)


@router.post("/models/{model}/pin", response_model=ModelJson)
async def pin_model(model: str, scope: CurrentAdmin, cloud: CloudDep, pool: PoolDep,
                    models: ModelAdminDep) -> ModelJson:
    """Pinned: loaded now and never unloaded for room or idleness."""
    entry = await models.set_pinned(scope, model, True)
    return await _one(scope, cloud, pool, models, entry.id)


@router.post("/models/{model}/unpin", response_model=ModelJson)
async def unpin_model(model: str, scope: CurrentAdmin, cloud: CloudDep, pool: PoolDep,
                      models: ModelAdminDep) -> ModelJson:
    entry = await models.set_pinned(scope, model, False)
    return await _one(scope, cloud, pool, models, entry.id)


@router.patch("/models/{model:path}", response_model=ModelJson,
              **documented(ModelUpdate))
async def update_model(model: str, request: Request, scope: CurrentAdmin, cloud: CloudDep,
                       pool: PoolDep, models: ModelAdminDep) -> ModelJson:
    """Change a catalog model's fields and prices; on Ray, set `replicas` now and the
    autoscaling bounds (answers once the new replicas serve, or the removed ones have
    finished what they were running)."""
    scope.require(Role.ADMIN, installation=True)
    body = await parse_body(request, ModelUpdate)
    try:
        changes = body.catalog_changes()
    except ValueError as exc:
        raise AccountError(f"{exc} cannot be null", str(exc)) from None
    rates = body.prices.rates() if body.prices is not None else None
    entry = await models.update(scope, model, changes, rates)
    if body.scales():
        await _scale(pool, entry.id, body)
    return await _one(scope, cloud, pool, models, entry.id)


async def _scale(pool: ModelPool, model: str, body: ModelUpdate) -> None:
    try:
        engine = pool.get(model)
    except UnknownModel:
        raise NotFound("model", model) from None
    replicas = unwrap(engine)
    if not isinstance(replicas, ReplicaSet):
        raise AccountError("replicas can only be changed for models served on Ray "
                           "(aicloud serve --ray ...)", "replicas")
    try:
        await replicas.scale_to(body.replicas, body.min_replicas, body.max_replicas)
    except EngineError as exc:
        raise AccountError(exc.message, exc.param) from None
