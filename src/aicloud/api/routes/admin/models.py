"""Admin routes for the models this server runs: load, placement, replica counts."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Request
from pydantic import Field

from aicloud.accounts.base import AccountError, NotFound, Role
from aicloud.api.deps import CloudDep, CurrentAdmin, PoolDep, parse_body
from aicloud.api.routes.admin.schemas import Strict, documented, listing
from aicloud.api.routes.health import engine_view
from aicloud.api.routes.metrics import tenants_of, visible_tenants
from aicloud.cluster.replica_set import ReplicaSet
from aicloud.engines.base import EngineError
from aicloud.models.pool import UnknownModel
from aicloud.scheduling.admission import unwrap

router = APIRouter()

Count = int | None


class ReplicaUpdate(Strict):
    replicas: Count = Field(default=None, ge=1, le=256)
    min_replicas: Count = Field(default=None, ge=1, le=256)
    max_replicas: Count = Field(default=None, ge=1, le=256)


@router.get("/models")
async def list_models(scope: CurrentAdmin, cloud: CloudDep, pool: PoolDep) -> dict[str, Any]:
    """Each model's load, its tenants' scheduling state (waiting, running, served tokens,
    virtual counter) and, on Ray, its placement."""
    visible = await visible_tenants(scope, cloud)
    return listing([{"object": "model", "id": mid, "engine": engine.info().kind,
                     **engine_view(engine),
                     "tenants": [asdict(t) for t in tenants_of(engine, visible)]}
                    for mid, engine in pool.items()])


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
