"""Liveness and engine load, cheap: it never waits on a model. No key needed (probes of
Kubernetes, vLLM-style `/health` checkers and load balancers send none); where replicas
run (node addresses, process ids) is shown only to an admin key."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Request

from aicloud.api.deps import PoolDep, current_admin
from aicloud.api.errors import APIError
from aicloud.cluster.replica_set import ReplicaSet
from aicloud.engines.base import Engine, EngineStats
from aicloud.models.pool import ModelState
from aicloud.scheduling.admission import unwrap

router = APIRouter()

WHEREABOUTS = ("node_id", "node_ip", "pid")
IDLE = EngineStats(0, 0, 0.0, 0, 0)  # the load of a model that is not loaded


def engine_view(engine: Engine, *, whereabouts: bool = True) -> dict[str, Any]:
    """Load, and for models on Ray, how each replica is doing and (`whereabouts`) where
    it runs."""
    view: dict[str, Any] = asdict(engine.stats())
    if isinstance(replicas := unwrap(engine), ReplicaSet):
        placement = replicas.placement()
        placement["waiting"] = view["waiting"]  # the admission line's too
        if not whereabouts:
            placement["replicas"] = [{k: v for k, v in r.items() if k not in WHEREABOUTS}
                                     for r in placement["replicas"]]
        view["placement"] = placement
    return view


async def _from_admin(request: Request) -> bool:
    """Whether the request carries a valid admin key. Any other credentials (an API key
    a client sends everywhere, a revoked admin key) get the public view, never a 401: a
    probe must not fail over who is asking."""
    if "authorization" not in request.headers:
        return False
    try:
        await current_admin(request)
    except APIError:
        return False
    return True


@router.get("/healthz")
@router.get("/health")
async def healthz(request: Request, pool: PoolDep) -> dict[str, Any]:
    """Every catalog model with its pool state (unloaded, loading, ready, draining,
    failed) and, when loaded, its load; why a model failed only with an admin key (the
    reason may name files). A failed model or a dead replica makes the status
    `degraded`: the others still serve, so the answer is still a 200."""
    admin = await _from_admin(request)
    engines = dict(pool.items())
    views: dict[str, dict[str, Any]] = {}
    for model in pool.views():
        engine = engines.get(model.id)
        view = engine_view(engine, whereabouts=admin) if engine is not None else asdict(IDLE)
        views[model.id] = {"state": model.state.value, **view}
        if admin and model.error:
            views[model.id]["error"] = model.error
    degraded = any(v["state"] == ModelState.FAILED for v in views.values()) or any(
        r["state"] == "dead" for v in views.values()
        for r in v.get("placement", {}).get("replicas", []))
    return {"status": "degraded" if degraded else "ok", "models": views}
