"""The `aicloud` command. `serve` is where a request's journey starts: read this first."""

from __future__ import annotations

import importlib.util
import sys
from functools import partial
from typing import Annotated, Any, Literal

import typer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aicloud import admin_cli, logs, models_cli, providers_cli
from aicloud.cluster.replica import EngineFactory, ReplicaSpec
from aicloud.config import Settings
from aicloud.engines.base import Engine
from aicloud.engines.llamacpp.engine import LlamaCppEngine
from aicloud.engines.llamacpp.model import (
    ContextConfig,
    ModelLoadError,
    check_gguf_path,
    default_threads,
)
from aicloud.engines.llamacpp.threads import ThreadBudget
from aicloud.engines.llamacpp.weights import (
    AUTO,
    NATIVE,
    check_format,
    decided_format,
    retyped_path,
)
from aicloud.engines.upstream import make_upstream_engine
from aicloud.models.catalog import (
    CatalogEntry,
    CatalogError,
    EngineKind,
    ModelSpec,
    bundled_model,
    resolve_models,
    spec_entry,
)
from aicloud.models.engines import EngineFactory as ModelFactory
from aicloud.models.engines import EngineKinds
from aicloud.models.memory import llamacpp_need, machine_memory
from aicloud.models.pool import ModelPool, PoolConfig
from aicloud.models.pull_cli import pull_command
from aicloud.providers.serving import provider_links
from aicloud.scheduling.admission import Admitter
from aicloud.scheduling.fair_queue import FairQueue, Mode, SchedulingConfig

app = typer.Typer(help="aicloud: your own AI cloud.", no_args_is_help=True)
app.add_typer(admin_cli.orgs, name="orgs")
app.add_typer(admin_cli.projects, name="projects")
app.add_typer(admin_cli.keys, name="keys")
app.add_typer(admin_cli.admin_keys, name="admin-keys")
app.add_typer(admin_cli.prices, name="prices")
app.add_typer(admin_cli.billing, name="billing")
models_cli.models.command("pull")(pull_command)
app.add_typer(models_cli.models, name="models")
app.add_typer(providers_cli.providers, name="providers")
app.add_typer(admin_cli.batches, name="batches")


def build_pool(settings: Settings) -> ModelPool:
    """The catalog's models, each built when first needed by its engine kind's factory;
    `--model` entries are registered into the catalog (pinned), and with none given and
    an empty catalog the bundled model is. Upstream models share one link per provider."""
    kind = EngineKind(settings.engine)
    specs = resolve_models(settings.models) if settings.models else []
    if kind is EngineKind.VLLM:
        check_vllm(specs)
    else:
        for spec in specs:
            check_gguf_path(spec.path)
        check_format(settings.weights)
    budget = ThreadBudget(settings.threads or default_threads())
    kinds: dict[EngineKind, ModelFactory] = {
        EngineKind.LLAMACPP: partial(llamacpp_engine, settings, budget),
        EngineKind.VLLM: partial(vllm_engine, settings),
        EngineKind.UPSTREAM: partial(make_upstream_engine, providers=provider_links(settings))}
    # every engine behind the one admission layer (scheduling/admission.py)
    factories = {kind: partial(admitted, settings, make) for kind, make in kinds.items()}
    # replicas on Ray take memory on the cluster's nodes, not this process's
    estimators = {} if settings.ray_address else {
        EngineKind.LLAMACPP: partial(llamacpp_estimate, settings)}
    machine = machine_memory()
    config = PoolConfig(
        memory_budget=(settings.memory_budget_mb << 20) if settings.memory_budget_mb
        else machine // 2, keep_alive=settings.keep_alive,
        max_keep_alive=settings.max_keep_alive, min_residency=settings.min_residency,
        fit_wait=settings.load_wait)
    default = None if specs else spec_entry(bundled_model(), kind)
    return ModelPool(kinds=EngineKinds(factories, estimators), config=config,
                     register=[spec_entry(s, kind) for s in specs], default=default)


def admitted(settings: Settings, make: ModelFactory, entry: CatalogEntry) -> Engine:
    """The engine `make` builds, behind its model's admission layer: the fair line,
    priorities and back-pressure, whatever the engine is."""
    return Admitter(make(entry), FairQueue(scheduling_config(settings)))


def context_config(settings: Settings, entry: CatalogEntry) -> ContextConfig:
    """The server's layout, with the catalog entry's own `context` and `sequences`."""
    options = entry.options
    return ContextConfig(
        sequences=options.get("sequences", settings.sequences),
        context_per_sequence=options.get("context", settings.context),
        threads=settings.threads, step_sequences=settings.step_sequences,
        batch_tokens=settings.batch_tokens,
        kv_budget_mb=settings.kv_budget_mb, adapt_threads=settings.adapt_threads,
        flash_attention=settings.flash_attention, kv_type=settings.kv_cache,
    )


def llamacpp_engine(settings: Settings, budget: ThreadBudget, entry: CatalogEntry) -> Engine:
    """Every local llama.cpp model decodes from the one `budget` of threads."""
    check_gguf_path(entry.path)
    weights = check_format(str(entry.options.get("weights", settings.weights)))
    make = partial(LlamaCppEngine, entry.id, entry.path, context_config(settings, entry),
                   weights=weights, weights_cache=settings.weights_cache)
    if settings.ray_address:
        return on_ray(settings, entry.id, make)
    return make(threads_budget=budget)


def llamacpp_estimate(settings: Settings, entry: CatalogEntry) -> int:
    """From the GGUF's header; a re-typed copy already made is sized by its own file."""
    config = context_config(settings, entry)
    weights = str(entry.options.get("weights", settings.weights))
    path = check_gguf_path(entry.path)
    if weights == AUTO:  # the copy it will serve, once it has been chosen on this machine
        weights = decided_format(path, settings.weights_cache) or NATIVE
    if weights != NATIVE and (typed := retyped_path(
            path, weights, settings.weights_cache)).is_file():
        path = typed
    return llamacpp_need(path, context=config.context_per_sequence,
                         sequences=config.sequences, kv_budget_mb=config.kv_budget_mb,
                         batch_tokens=config.batch_tokens, kv_type=config.kv_type).total


def check_vllm(specs: list[ModelSpec]) -> None:
    from aicloud.engines.vllm_convert import check_model_path

    if importlib.util.find_spec("vllm") is None:
        raise ModelLoadError("--engine vllm needs the vllm extra: pip install 'aicloud[vllm]'")
    for spec in specs:
        check_model_path(spec.path)


def vllm_engine(settings: Settings, entry: CatalogEntry) -> Engine:
    """Models on vLLM, which schedules by itself: priorities, but no tenant fairness."""
    from aicloud.engines.vllm import VllmEngine

    if settings.ray_address:
        raise ModelLoadError("vLLM models do not run on Ray yet")
    check_vllm([ModelSpec(entry.id, entry.path)])
    return VllmEngine(entry.id, entry.path, context_config(settings, entry),
                      weights_cache=settings.weights_cache, eager=settings.vllm_eager)


def scheduling_config(settings: Settings) -> SchedulingConfig:
    return SchedulingConfig(Mode(settings.scheduling), settings.input_token_weight,
                            settings.output_token_weight, settings.max_queue,
                            settings.max_queue_wait)


def on_ray(settings: Settings, model_id: str, make: EngineFactory) -> Engine:
    """The model as replicas on a Ray cluster, each placed with `replica_cpus` CPUs."""
    from aicloud.cluster.replica_set import ReplicaSet, Scaling

    spec = ReplicaSpec(model_id, make, num_cpus=settings.replica_cpus or settings.threads or 1)
    scaling = Scaling(settings.replicas, settings.min_replicas or settings.replicas,
                      settings.max_replicas or settings.replicas, settings.scale_up_after,
                      settings.scale_down_after)
    return ReplicaSet(spec, scaling, address=settings.ray_address or "auto",
                      max_wait=settings.max_queue_wait)


def memory_mb(text: str) -> int:
    """`6G`, `512M`, `1.5g` or a number of MiB."""
    units = {"k": 1 / 1024, "m": 1, "g": 1024, "t": 1024 * 1024}
    raw = text.strip().lower().removesuffix("ib").removesuffix("b")
    scale = units.get(raw[-1:])
    try:
        value = float(raw[:-1] if scale is not None else raw) * (scale or 1)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a size such as 6G or 512M",
                                 param_hint="--memory-budget") from None
    if not 16 <= value < 1 << 40:
        raise typer.BadParameter("the memory budget must be at least 16M",
                                 param_hint="--memory-budget")
    return int(value)


class OneLineLoadErrors:
    """A model that cannot load (a corrupt or truncated file, a wrong path) is the
    operator's input, not a bug: say so in one line instead of uvicorn's 45-line
    traceback of the startup. Starlette reports a failed startup from inside its
    `except` block, so the error at hand is the one that failed it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_briefly(message: Message) -> None:
            error = sys.exc_info()[1]
            if message["type"] == "lifespan.startup.failed" and isinstance(
                    error, ModelLoadError | CatalogError):
                message = {**message, "message": f"cannot serve the model: {error}"}
            await send(message)

        await self.app(scope, receive, send_briefly if scope["type"] == "lifespan" else send)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="address to listen on")] = None,
    port: Annotated[int | None, typer.Option(help="port to listen on")] = None,
    model: Annotated[list[str] | None, typer.Option(
        help="GGUF file (or, for vLLM, Hugging Face folder) to serve, as PATH or ID=PATH; "
             "repeat for more. Default: the bundled SmolLM2-135M-Instruct.")] = None,
    engine: Annotated[Literal["llamacpp", "vllm"] | None, typer.Option(
        help="llamacpp (default) or vllm (needs the vllm extra)")] = None,
    sequences: Annotated[int | None, typer.Option(
        help="sequences decoded together per model (default: as many as the KV budget "
             "holds, up to 32)")] = None,
    context: Annotated[int | None, typer.Option(
        help="context tokens per sequence (default: the model's, up to 2048)")] = None,
    threads: Annotated[int | None, typer.Option(
        help="decoding threads (default: the cores this process may use)")] = None,
    step_sequences: Annotated[int | None, typer.Option(
        help="running sequences decoded per step, taking turns: fewer makes a newcomer's "
             "first token come sooner under load (default: 16 per thread)")] = None,
    kv_budget_mb: Annotated[int | None, typer.Option(
        help="memory for the KV cache of each model, used to size --sequences "
             "(default 2048)")] = None,
    kv_cache: Annotated[Literal["bf16", "f16", "q8_0"] | None, typer.Option(
        help="type of the KV cache: bf16 (default; texts independent of the batch), f16 "
             "(5-10% faster decode here, texts may depend on the batch) or q8_0 (half "
             "the memory)")] = None,
    weights: Annotated[str | None, typer.Option(
        help="auto (default: the faster of the file and q4_0 on this machine, measured "
             "once), native (the file as it is), or re-typed once into q4_0, q8_0, "
             "bf16 or f16 (on AVX2 CPUs q4_0 decodes batches fastest)")] = None,
    ray: Annotated[str | None, typer.Option(
        help="run engine replicas on a Ray cluster: auto (the cluster of this machine), "
             "local (start one here) or HOST:PORT")] = None,
    replicas: Annotated[int | None, typer.Option(help="replicas per model on Ray")] = None,
    min_replicas: Annotated[int | None, typer.Option(
        help="autoscaling floor (default: --replicas)")] = None,
    max_replicas: Annotated[int | None, typer.Option(
        help="autoscaling ceiling (default: --replicas)")] = None,
    replica_cpus: Annotated[float | None, typer.Option(
        help="CPUs Ray reserves for each replica (default: --threads, or 1)")] = None,
    memory_budget: Annotated[str | None, typer.Option(
        help="memory the loaded models may take together, e.g. 6G or 512M (default: half "
             "of the machine's); idle models are unloaded to make room")] = None,
) -> None:
    """Start the OpenAI-compatible server."""
    import uvicorn

    from aicloud.api.app import create_app

    options: dict[str, Any] = dict(
        host=host, port=port, models=model, engine=engine, sequences=sequences,
        context=context, threads=threads, step_sequences=step_sequences,
        kv_budget_mb=kv_budget_mb, kv_cache=kv_cache, weights=weights, ray_address=ray,
        replicas=replicas,
        min_replicas=min_replicas, max_replicas=max_replicas, replica_cpus=replica_cpus,
        memory_budget_mb=memory_mb(memory_budget) if memory_budget else None)
    # Settings validates each value; `--port 0` is a port: any free one
    overrides = {k: v for k, v in options.items() if v is not None}
    settings = Settings(**overrides)
    log_config = logs.setup(settings.log_level)
    try:
        pool = build_pool(settings)
    except (CatalogError, ModelLoadError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--model") from None
    # with port 0 the OS picks a free port; uvicorn's "running on" line names it
    uvicorn.run(OneLineLoadErrors(create_app(settings, pool)), host=settings.host,
                port=settings.port, log_level=settings.log_level, log_config=log_config,
                loop="auto", http="auto")


@app.command()
def status(url: Annotated[str | None, typer.Option(
        help="the server (default: http://AICLOUD_HOST:AICLOUD_PORT)")] = None,
           admin_key: Annotated[str | None, typer.Option(
        envvar="AICLOUD_ADMIN_KEY",
        help="an admin key, to see the node and process of each replica")] = None) -> None:
    """Models, their state (unloaded, loading, ready, draining, failed), their load and,
    on Ray, where every replica runs."""
    import httpx

    settings = Settings()
    base = url or f"http://{settings.host}:{settings.port}"
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    try:
        resp = httpx.get(f"{base}/healthz", headers=headers, timeout=10)
    except httpx.HTTPError as exc:
        typer.echo(f"error: {base} is not answering ({type(exc).__name__})", err=True)
        raise typer.Exit(1) from None
    if resp.status_code != 200:
        typer.echo(f"error: {base}: {resp.json()['error']['message']}", err=True)
        raise typer.Exit(1)
    health = resp.json()
    typer.echo(f"{base}: {health['status']}")
    for model, view in health["models"].items():
        typer.echo(f"{model}: {view.get('state', 'ready')}, {view['running']} running, "
                   f"{view['waiting']} waiting, {view['tokens_per_second']} tok/s")
        if view.get("error"):
            typer.echo(f"  failed: {view['error']}")
        for r in view.get("placement", {}).get("replicas", []):
            where = f"node {r['node_ip']} pid {r['pid']}" if "pid" in r else ""
            typer.echo(f"  replica {r['index']}: {r['state']:<9} {where}  "
                       f"{r['running']}/{r['capacity']} running, {r['served']} served")
