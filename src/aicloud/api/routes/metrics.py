"""Prometheus metrics: engine load, per-tenant scheduling state, latency histograms.

Tenant ids are customer data, so `/metrics` wants an admin key (Prometheus sends it with
`authorization: {credentials: ...}`) unless AICLOUD_METRICS_PUBLIC is set, and shows an
organization's key only that organization's tenants, as `/admin/v1/models` does.
"""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from aicloud.accounts.base import AdminScope
from aicloud.api.deps import CloudDep, PoolDep, current_admin
from aicloud.api.provider_metrics import provider_lines
from aicloud.api.telemetry import Histogram, Telemetry
from aicloud.engines.base import Engine, TenantLoad
from aicloud.models.pool import ModelPool, ModelState
from aicloud.services import Cloud

router = APIRouter()

GAUGES = (
    ("aicloud_tenant_waiting", "Requests of the tenant waiting for a slot", "waiting"),
    ("aicloud_tenant_running", "Sequences of the tenant being decoded", "running"),
    ("aicloud_tenant_virtual_counter", "The tenant's virtual token counter (VTC)", "counter"),
    ("aicloud_tenant_weight", "The tenant's fair-share weight", "weight"),
)


def _labels(**labels: str) -> str:
    def escape(v: str) -> str:
        return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels.items()) + "}"


async def visible_tenants(scope: AdminScope, cloud: Cloud) -> set[str] | None:
    """Tenant ids (project, key or organization ids) an admin key may see; None: all."""
    if scope.installation_wide:
        return None
    projects = await cloud.orgs.list_projects(scope)
    keys = await cloud.keys.list_keys(scope)
    return {scope.organization_id or "", *(p.id for p in projects), *(k.id for k in keys)}


def tenants_of(engine: Engine, visible: set[str] | None = None) -> list[TenantLoad]:
    """The engine's tenants, only those in `visible` unless that is None."""
    tenants = getattr(engine, "tenants", None)
    loads: list[TenantLoad] = tenants() if tenants is not None else []
    return [t for t in loads if visible is None or t.tenant in visible]


def _tenant_lines(models: list[tuple[str, Engine]],
                  visible: set[str] | None) -> Iterator[str]:
    loads = [(mid, t) for mid, engine in models for t in tenants_of(engine, visible)]
    for name, text, attr in GAUGES:
        yield f"# HELP {name} {text}\n# TYPE {name} gauge"
        for mid, t in loads:
            yield f"{name}{_labels(model=mid, tenant=t.tenant)} {getattr(t, attr)}"
    name = "aicloud_tenant_served_tokens_total"
    yield f"# HELP {name} Tokens served to the tenant\n# TYPE {name} counter"
    for mid, t in loads:
        yield f"{name}{_labels(model=mid, tenant=t.tenant, kind='input')} " \
              f"{t.served_input_tokens}"
        yield f"{name}{_labels(model=mid, tenant=t.tenant, kind='output')} " \
              f"{t.served_output_tokens}"


def _engine_lines(models: list[tuple[str, Engine]]) -> Iterator[str]:
    fields = (("running", "Sequences being decoded"), ("waiting", "Requests waiting"),
              ("tokens_per_second", "Output tokens per second, recent"),
              ("kv_cells_used", "KV cache cells in use"), ("kv_cells_total", "KV cache cells"))
    stats = [(mid, engine.stats()) for mid, engine in models]
    for attr, text in fields:
        name = f"aicloud_engine_{attr}"
        yield f"# HELP {name} {text}\n# TYPE {name} gauge"
        for mid, s in stats:
            yield f"{name}{_labels(model=mid)} {getattr(s, attr)}"


def _histogram_lines(name: str, text: str, by_model: dict[str, Histogram]) -> Iterator[str]:
    yield f"# HELP {name} {text}\n# TYPE {name} histogram"
    for mid, h in sorted(by_model.items()):
        for bound, count in h.cumulative():
            yield f"{name}_bucket{_labels(model=mid, le=bound)} {count}"
        yield f"{name}_sum{_labels(model=mid)} {h.total:.6f}"
        yield f"{name}_count{_labels(model=mid)} {h.n}"


def _pool_lines(pool: ModelPool, telemetry: Telemetry) -> Iterator[str]:
    views = pool.views()
    name = "aicloud_model_state"
    yield f"# HELP {name} 1 for the state each model is in\n# TYPE {name} gauge"
    for v in views:
        for state in ModelState:
            yield f"{name}{_labels(model=v.id, state=state.value)} {int(v.state is state)}"
    name = "aicloud_model_resident_bytes"
    yield f"# HELP {name} Memory a loaded model takes (measured at its load)\n# TYPE {name} gauge"
    for v in views:
        yield f"{name}{_labels(model=v.id)} {v.memory_bytes if v.state.resident else 0}"
    for name, text, value in (
            ("aicloud_pool_memory_budget_bytes", "Memory the loaded models may take",
             pool.config.memory_budget),
            ("aicloud_pool_memory_used_bytes", "Memory the loaded models take", pool.used()),
            ("aicloud_pool_memory_unaccounted_bytes", "Memory this process grew by beyond "
             "what its loaded models are counted for (counted against the budget)",
             pool.unaccounted())):
        yield f"# HELP {name} {text}\n# TYPE {name} gauge\n{name} {value}"
    for name, text, counts, label in (
            ("aicloud_model_loads_total", "Model loads, by outcome", telemetry.loads, "outcome"),
            ("aicloud_model_evictions_total", "Models unloaded, by reason (evicted for "
             "another, keep_alive, admin, removed)", telemetry.unloads, "reason")):
        yield f"# HELP {name} {text}\n# TYPE {name} counter"
        yield from (f"{name}{_labels(model=m, **{label: r})} {n}"
                    for (m, r), n in sorted(counts.items()))
    yield from _histogram_lines("aicloud_model_load_seconds", "Time to load a model",
                                telemetry.load_seconds)
    yield from _histogram_lines("aicloud_cold_start_time_to_first_token_seconds",
                                "Time to first token of requests that waited for a load",
                                telemetry.cold_ttft)


def render(models: list[tuple[str, Engine]], telemetry: Telemetry,
           visible: set[str] | None = None, pool: ModelPool | None = None) -> str:
    lines = [*_engine_lines(models), *_tenant_lines(models, visible)]
    if pool is not None:
        lines += _pool_lines(pool, telemetry)
    lines += _histogram_lines("aicloud_time_to_first_token_seconds",
                              "Time from request to first token", telemetry.ttft)
    lines += _histogram_lines("aicloud_inter_token_latency_seconds",
                              "Time between output tokens", telemetry.itl)
    name = "aicloud_requests_refused_total"
    lines.append(f"# HELP {name} Requests shed by the scheduler\n# TYPE {name} counter")
    lines += [f"{name}{_labels(model=m, reason=r)} {n}"
              for (m, r), n in sorted(telemetry.refused.items())]
    lines += provider_lines(models)
    return "\n".join(lines) + "\n"


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request, pool: PoolDep, cloud: CloudDep) -> PlainTextResponse:
    visible = None
    if not request.app.state.metrics_public:
        visible = await visible_tenants(await current_admin(request), cloud)
    return PlainTextResponse(render(pool.items(), request.app.state.telemetry, visible, pool),
                             media_type="text/plain; version=0.0.4")
