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
from aicloud.engines.base import Engine
from aicloud.scheduling.admission import unwrap

router = APIRouter()

WHEREABOUTS = ("node_id", "node_ip", "pid")


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
    whereabouts = await _from_admin(request)
    views = {mid: engine_view(engine, whereabouts=whereabouts) for mid, engine in pool.items()}
    degraded = any(r["state"] == "dead" for v in views.values()
                   for r in v.get("placement", {}).get("replicas", []))
    return {"status": "degraded" if degraded else "ok", "models": views}
