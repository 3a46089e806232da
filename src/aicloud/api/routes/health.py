"""Liveness and engine load, unauthenticated and cheap: it never waits on a model."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter

from aicloud.api.deps import PoolDep

router = APIRouter()


@router.get("/healthz")
async def healthz(pool: PoolDep) -> dict[str, Any]:
    return {"status": "ok",
            "models": {mid: asdict(engine.stats()) for mid, engine in pool.items()}}
