"""The overview: each model's load and tenants, and recent failures; refreshed live by
polling a server-rendered fragment (no client-side templating, so nothing to escape twice)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from aicloud.api.routes.metrics import tenants_of, visible_tenants
from aicloud.api.telemetry import Telemetry
from aicloud.billing.reports import UsageFilter, UsageRow
from aicloud.console.web import (
    ConsoleRoute,
    SignedInDep,
    cloud_of,
    nav_page,
    pool_of,
    render,
)
from aicloud.engines.base import EngineError

router = APIRouter(prefix="/console", route_class=ConsoleRoute)

FAILED = ("error", "interrupted", "overloaded", "throttled")
REFRESH_MS = 2000


@dataclass(slots=True, frozen=True)
class TenantView:
    name: str
    waiting: int
    running: int
    served_tokens: int
    share: float  # of the tokens this model served to the tenants shown
    weight: float


@dataclass(slots=True, frozen=True)
class ModelView:
    id: str
    kind: str
    state: str
    running: int
    waiting: int
    tokens_per_second: float
    kv_used: int
    kv_total: int
    tenants: list[TenantView]


@dataclass(slots=True, frozen=True)
class Overview:
    models: list[ModelView]
    failures: list[UsageRow]
    refused: list[tuple[str, str, int]]  # model, reason, count since start
    names: dict[str, str]


def _tenants(loads: list[TenantView]) -> list[TenantView]:
    total = sum(t.served_tokens for t in loads) or 1
    return [TenantView(t.name, t.waiting, t.running, t.served_tokens, t.served_tokens / total,
                       t.weight) for t in loads]


async def overview(request: Request, signed: SignedInDep) -> Overview:
    cloud, scope = cloud_of(request), signed.scope
    visible = await visible_tenants(scope, cloud)
    projects = await cloud.orgs.list_projects(scope)
    names = {p.id: p.name for p in projects}
    names.update({o.id: o.name for o in await cloud.orgs.list_orgs(scope)})
    models = []
    for mid, engine in pool_of(request).items():
        try:
            kind, state = engine.info().kind, "loaded"
        except EngineError:
            kind, state = "—", "starting"
        stats = engine.stats()
        loads = [TenantView(names.get(t.tenant, t.tenant), t.waiting, t.running,
                            t.served_input_tokens + t.served_output_tokens, 0.0, t.weight)
                 for t in tenants_of(engine, visible)]
        models.append(ModelView(mid, kind, state, stats.running, stats.waiting,
                                round(stats.tokens_per_second, 1), stats.kv_cells_used,
                                stats.kv_cells_total, _tenants(loads)))
    failures = await cloud.reports.rows(scope, UsageFilter(), 10, FAILED)
    telemetry: Telemetry = request.app.state.telemetry
    refused: Counter[tuple[str, str]] = telemetry.refused
    return Overview(models, failures, [(m, r, n) for (m, r), n in sorted(refused.items())],
                    names)


@nav_page(router, "/", "Overview", 10)
async def overview_page(request: Request, signed: SignedInDep) -> HTMLResponse:
    return await render(request, "overview.html", view=await overview(request, signed),
                        refresh_ms=REFRESH_MS)


@router.get("/overview/live", response_class=HTMLResponse)
async def overview_live(request: Request, signed: SignedInDep) -> HTMLResponse:
    """The overview's live part alone, which the page's script swaps in every 2 s."""
    return await render(request, "_overview_live.html", view=await overview(request, signed))
