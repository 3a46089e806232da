"""Liveness and engine load, unauthenticated and cheap: it never waits on a model."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter

from aicloud.api.deps import PoolDep
from aicloud.cluster.replica_set import ReplicaSet
from aicloud.engines.base import Engine

router = APIRouter()


def engine_view(engine: Engine) -> dict[str, Any]:
    """Load, and for models on Ray, where each replica runs and how it is doing."""
    view: dict[str, Any] = asdict(engine.stats())
    if isinstance(engine, ReplicaSet):
        view["placement"] = engine.placement()
    return view


@router.get("/healthz")
async def healthz(pool: PoolDep) -> dict[str, Any]:
    views = {mid: engine_view(engine) for mid, engine in pool.items()}
    degraded = any(r["state"] == "dead" for v in views.values()
                   for r in v.get("placement", {}).get("replicas", []))
    return {"status": "degraded" if degraded else "ok", "models": views}
