"""Admin routes for the model catalog and the pool: add, list, show, remove, load,
unload, pin and unpin models; on Ray, a model's replica counts."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from pydantic import Field

from aicloud.accounts.base import AccountError, AdminScope, NotFound, Role
from aicloud.api.deps import CloudDep, CurrentAdmin, PoolDep, parse_body
from aicloud.api.routes.admin.model_schemas import ModelCreate, ModelJson, ModelList, model_json
from aicloud.api.routes.admin.schemas import Strict, documented
from aicloud.api.routes.health import engine_view
from aicloud.api.routes.metrics import tenants_of, visible_tenants
from aicloud.cluster.replica_set import ReplicaSet
from aicloud.engines.base import EngineError
from aicloud.models.catalog import CatalogEntry, CatalogError, UnknownCatalogModel
from aicloud.models.engines import check_source
from aicloud.models.pool import ModelPool, UnknownModel
from aicloud.scheduling.admission import unwrap
from aicloud.services import Cloud

router = APIRouter()

Count = int | None


class ReplicaUpdate(Strict):
    replicas: Count = Field(default=None, ge=1, le=256)
    min_replicas: Count = Field(default=None, ge=1, le=256)
    max_replicas: Count = Field(default=None, ge=1, le=256)


def _visible(scope: AdminScope, entry: CatalogEntry) -> bool:
    """An organization's admin key sees the models its organization may use."""
    return scope.organization_id is None or entry.allows(scope.organization_id)


async def _models(scope: AdminScope, cloud: Cloud, pool: ModelPool,
                  only: str | None = None) -> list[ModelJson]:
    tenants = await visible_tenants(scope, cloud)
    engines = dict(pool.items())
    await pool.refresh()
    out = []
    for entry, view in pool.described():
        if (only is not None and only not in entry.names) or not _visible(scope, entry):
            continue
        engine = engines.get(entry.id)
        out.append(model_json(
            entry, view, private=scope.installation_wide,
            load=engine_view(engine) if engine is not None else None,
            tenants=tenants_of(engine, tenants) if engine is not None else None))
    return out


async def _one(scope: AdminScope, cloud: Cloud, pool: ModelPool, model: str) -> ModelJson:
    found = await _models(scope, cloud, pool, model)
    if not found:
        raise NotFound("model", model)
    return found[0]


@router.get("/models", response_model=ModelList)
async def list_models(scope: CurrentAdmin, cloud: CloudDep, pool: PoolDep) -> ModelList:
    """The catalog, each model with its state in this server (unloaded, loading, ready,
    draining, failed and why), its memory, its load and its tenants' scheduling state
    (waiting, running, served tokens, virtual counter), and on Ray its placement."""
    return ModelList(data=await _models(scope, cloud, pool))


@router.post("/models", status_code=201, response_model=ModelJson, **documented(ModelCreate))
async def add_model(request: Request, scope: CurrentAdmin, cloud: CloudDep,
                    pool: PoolDep) -> ModelJson:
    """Add a model to the catalog (and set its prices); it loads on its first request,
    or at once when pinned. A local source must be a readable GGUF (or, for vLLM, a
    Hugging Face folder) on this server."""
    scope.require(Role.ADMIN, installation=True)
    body = await parse_body(request, ModelCreate)
    try:
        entry = await asyncio.to_thread(check_source, body.entry())
        await cloud.catalog.add(entry)
    except (CatalogError, EngineError) as exc:
        raise AccountError(str(exc), _culprit(exc)) from None
    if body.prices is not None:
        await cloud.prices.set_price(scope, entry.id, body.prices.rates())
    await pool.refresh()
    return await _one(scope, cloud, pool, entry.id)


@router.get("/models/{model}", response_model=ModelJson)
async def show_model(model: str, scope: CurrentAdmin, cloud: CloudDep,
                     pool: PoolDep) -> ModelJson:
    return await _one(scope, cloud, pool, model)


@router.delete("/models/{model}", response_model=ModelJson)
async def remove_model(model: str, scope: CurrentAdmin, cloud: CloudDep,
                       pool: PoolDep) -> ModelJson:
    """Remove a model from the catalog: new requests get a 404 at once, running ones
    finish, then it is unloaded."""
    scope.require(Role.ADMIN, installation=True)
    shown = await _one(scope, cloud, pool, model)
    try:
        await cloud.catalog.remove(shown.id)
    except UnknownCatalogModel:
        raise NotFound("model", model) from None
    await pool.refresh()
    return shown


@router.post("/models/{model}/load", response_model=ModelJson)
async def load_model(model: str, scope: CurrentAdmin, cloud: CloudDep,
                     pool: PoolDep) -> ModelJson:
    """Load now (evicting idle models if need be); a failed model tries again. Answers
    once it is loaded, or with why it could not be (the model is then `failed`, or a 503
    when busy models leave no room yet)."""
    scope.require(Role.ADMIN, installation=True)
    entry = await _entry(scope, cloud, pool, model)
    try:
        await pool.load(entry.id)
    except UnknownModel:
        raise NotFound("model", model) from None
    return await _one(scope, cloud, pool, entry.id)


@router.post("/models/{model}/unload", response_model=ModelJson)
async def unload_model(model: str, scope: CurrentAdmin, cloud: CloudDep,
                       pool: PoolDep) -> ModelJson:
    """Unload once its running requests finish (a pinned model too: it is loaded again
    within a second; unpin it to keep it unloaded)."""
    scope.require(Role.ADMIN, installation=True)
    entry = await _entry(scope, cloud, pool, model)
    await pool.unload(entry.id)
    return await _one(scope, cloud, pool, entry.id)


@router.post("/models/{model}/pin", response_model=ModelJson)
async def pin_model(model: str, scope: CurrentAdmin, cloud: CloudDep,
                    pool: PoolDep) -> ModelJson:
    """Pinned: loaded now and never unloaded for room or idleness."""
    return await _set_pinned(scope, cloud, pool, model, True)


@router.post("/models/{model}/unpin", response_model=ModelJson)
async def unpin_model(model: str, scope: CurrentAdmin, cloud: CloudDep,
                      pool: PoolDep) -> ModelJson:
    return await _set_pinned(scope, cloud, pool, model, False)


async def _set_pinned(scope: AdminScope, cloud: Cloud, pool: ModelPool, model: str,
                      pinned: bool) -> ModelJson:
    scope.require(Role.ADMIN, installation=True)
    entry = await _entry(scope, cloud, pool, model)
    await cloud.catalog.update(entry.id, pinned=pinned)
    await pool.refresh()
    if pinned:
        await pool.load(entry.id)
    return await _one(scope, cloud, pool, entry.id)


async def _entry(scope: AdminScope, cloud: Cloud, pool: ModelPool,
                 model: str) -> CatalogEntry:
    entry = await pool.find(model)
    if entry is None or not _visible(scope, entry):
        raise NotFound("model", model)
    return entry


CULPRITS = (("alias", "aliases"), ("keep_alive", "keep_alive"), ("provider", "provider"),
            ("upstream", "upstream_model"), ("source", "source"))


def _culprit(exc: Exception) -> str:
    """The body field a refusal is about (a bad file is the source's fault)."""
    if isinstance(exc, EngineError):
        return "source"
    text = str(exc)
    return next((field for word, field in CULPRITS if word in text), "id")


@router.patch("/models/{model:path}", **documented(ReplicaUpdate))
async def scale_model(model: str, request: Request, scope: CurrentAdmin,
                      pool: PoolDep) -> dict[str, Any]:
    """Set `replicas` now, and the autoscaling bounds; returns once the new replicas serve
    (or the removed ones have finished what they were running)."""
    scope.require(Role.ADMIN, installation=True)
    body = await parse_body(request, ReplicaUpdate)
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
    return {"object": "model", "id": model, "engine": replicas.kind, **engine_view(engine)}
