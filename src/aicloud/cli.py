"""The `aicloud` command. `serve` is where a request's journey starts: read this first."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer

from aicloud.accounts.keys import AccountError, KeyService
from aicloud.config import Settings
from aicloud.engines.llamacpp.engine import LlamaCppEngine
from aicloud.engines.llamacpp.model import ContextConfig, ModelLoadError, check_gguf_path
from aicloud.engines.llamacpp.weights import check_format
from aicloud.models.catalog import CatalogError, resolve_models
from aicloud.models.pool import ModelPool
from aicloud.store import db, migrate

app = typer.Typer(help="aicloud: your own AI cloud.", no_args_is_help=True)
keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")

T = TypeVar("T")


def build_pool(settings: Settings) -> ModelPool:
    config = ContextConfig(
        sequences=settings.sequences, context_per_sequence=settings.context,
        threads=settings.threads, batch_tokens=settings.batch_tokens,
        kv_budget_mb=settings.kv_budget_mb,
    )
    specs = resolve_models(settings.models)
    for spec in specs:
        check_gguf_path(spec.path)
    check_format(settings.weights)
    cache = settings.home_dir / "weights"
    return ModelPool({s.model_id: LlamaCppEngine(s.model_id, s.path, config,
                                                 weights=settings.weights, weights_cache=cache)
                      for s in specs})


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="address to listen on")] = None,
    port: Annotated[int | None, typer.Option(help="port to listen on")] = None,
    model: Annotated[list[str] | None, typer.Option(
        help="GGUF file to serve, as PATH or ID=PATH; repeat for more. "
             "Default: the bundled SmolLM2-135M-Instruct.")] = None,
    sequences: Annotated[int | None, typer.Option(
        help="sequences decoded together per model (default: as many as the KV budget "
             "holds, up to 32)")] = None,
    context: Annotated[int | None, typer.Option(
        help="context tokens per sequence (default: the model's, up to 2048)")] = None,
    threads: Annotated[int | None, typer.Option(
        help="decoding threads (default: the cores this process may use)")] = None,
    kv_budget_mb: Annotated[int | None, typer.Option(
        help="memory for the KV cache of each model, used to size --sequences "
             "(default 2048)")] = None,
    weights: Annotated[str | None, typer.Option(
        help="serve the weights as they are (native) or re-typed once into q4_0, q8_0, "
             "bf16 or f16 (on AVX2 CPUs q4_0 decodes batches fastest)")] = None,
) -> None:
    """Start the OpenAI-compatible server."""
    import uvicorn

    from aicloud.api.app import create_app

    overrides = {k: v for k, v in dict(host=host, port=port, models=model, sequences=sequences,
                                       context=context, threads=threads,
                                       kv_budget_mb=kv_budget_mb, weights=weights).items() if v}
    settings = Settings(**overrides)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        pool = build_pool(settings)
    except (CatalogError, ModelLoadError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--model") from None
    uvicorn.run(create_app(settings, pool), host=settings.host, port=settings.port,
                log_level=settings.log_level, loop="auto", http="auto")


def _with_keys(action: Callable[[KeyService], Awaitable[T]]) -> T:
    """Run one key operation directly against the database; no server needed."""
    settings = Settings()
    settings.prepare_home()
    migrate.upgrade(settings.db_url)

    async def run() -> T:
        engine = db.create_engine_async(settings.db_url)
        try:
            return await action(KeyService(db.session_factory(engine)))
        finally:
            await engine.dispose()

    return asyncio.run(run())


@keys_app.command("create")
def keys_create(
    project: Annotated[str, typer.Option(help="project the key belongs to (created if new)")],
    name: Annotated[str, typer.Option(help="a label for the key")] = "",
) -> None:
    """Create a key. The secret is printed once, as the last line."""
    try:
        view, secret = _with_keys(lambda keys: keys.create_key(project, name))
    except AccountError as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(f"created key {view.id} for project {view.project}")
    typer.echo("store this secret now; it cannot be shown again:")
    typer.echo(secret)


@keys_app.command("list")
def keys_list() -> None:
    """List keys (prefixes only; secrets are never stored)."""
    views = _with_keys(lambda keys: keys.list_keys())
    typer.echo(f"{'ID':<29} {'PROJECT':<20} {'PREFIX':<12} {'CREATED':<20} STATUS")
    for v in views:
        status = "revoked" if v.revoked_at else "active"
        typer.echo(f"{v.id:<29} {v.project:<20} {v.prefix:<12} "
                   f"{v.created_at:%Y-%m-%d %H:%M:%S}  {status}")


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="the key's id")]) -> None:
    """Revoke a key; requests with it fail from now on."""
    if not _with_keys(lambda keys: keys.revoke(key_id)):
        typer.echo(f"no key with id {key_id}", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {key_id}")
