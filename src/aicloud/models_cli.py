"""`aicloud models`: the catalog from the command line.

`add`, `update`, `remove`, `pin` and `unpin` write the catalog in the database, as the other admin
commands do (a running server sees the change within a second); `list` and `show` add
each model's state from the server when it answers (with an admin key, also why a model
failed); `load` and `unload` act on the running server through its admin API.
"""

from __future__ import annotations

import dataclasses
import json
from decimal import Decimal
from typing import Annotated, Any

import httpx
import typer

from aicloud.admin_cli import SCOPE, run, show
from aicloud.billing.money import MoneyError, Rates
from aicloud.config import Settings
from aicloud.engines.base import EngineError
from aicloud.models.catalog import CatalogEntry, CatalogError, EngineKind, UnknownCatalogModel
from aicloud.models.engines import check_source

models = typer.Typer(help="The model catalog: add, list, load, pin...", no_args_is_help=True)

Url = Annotated[str | None, typer.Option(
    help="the server (default: http://AICLOUD_HOST:AICLOUD_PORT)")]
AdminKey = Annotated[str | None, typer.Option(
    envvar="AICLOUD_ADMIN_KEY", help="an installation admin key, for load/unload and to "
    "see why a model failed")]


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


def _catalog(action: Any) -> Any:
    """A catalog operation against the database; its refusals print as one line."""
    try:
        return run(action)
    except (CatalogError, UnknownCatalogModel, EngineError, MoneyError) as exc:
        raise _fail(str(exc)) from None


def _base(url: str | None) -> str:
    settings = Settings()
    return url or f"http://{settings.host}:{settings.port}"


def _server_states(url: str | None, admin_key: str | None) -> dict[str, dict[str, Any]]:
    """Each model's state as the server reports it; empty when no server answers."""
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    try:
        resp = httpx.get(f"{_base(url)}/healthz", headers=headers, timeout=10)
    except httpx.HTTPError:
        return {}
    models_: dict[str, dict[str, Any]] = resp.json().get("models", {}) \
        if resp.status_code == 200 else {}
    return models_


def _entry_json(entry: CatalogEntry, state: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": entry.id, "engine": entry.engine.value, "source": entry.source,
        "aliases": list(entry.aliases), "provider": entry.provider,
        "upstream_model": entry.upstream_model, "options": dict(entry.options),
        "keep_alive": entry.keep_alive, "pinned": entry.pinned,
        "organizations": None if entry.organizations is None else list(entry.organizations),
        "state": state["state"] if state else "unknown (no server answering)"}
    if state and state.get("error"):
        out["error"] = state["error"]
    return out


def _prices(input_price: Decimal | None, cached_input_price: Decimal | None,
            output_price: Decimal | None) -> Rates | None:
    """The price options as rates; none given is None, some but not both main ones is an
    error."""
    if input_price is None and output_price is None and cached_input_price is None:
        return None
    if input_price is None or output_price is None:
        raise typer.BadParameter("prices need at least --input-price and --output-price")
    from aicloud.api.routes.admin.model_schemas import ModelPrices

    try:
        return ModelPrices(input=input_price, output=output_price,
                           cached_input=cached_input_price).rates()
    except MoneyError as exc:
        raise _fail(str(exc)) from None


@models.command("add")
def add(
    model_id: Annotated[str, typer.Argument(metavar="ID")],
    path: Annotated[str | None, typer.Option(help="a GGUF file (or, for vLLM, a Hugging "
                                             "Face folder) on the server")] = None,
    provider: Annotated[str | None, typer.Option(help="an upstream provider's name")] = None,
    upstream_model: Annotated[str | None, typer.Option(
        help="the model's id at the provider")] = None,
    engine: Annotated[EngineKind | None, typer.Option(
        help="llamacpp (default for a path), vllm, or upstream (default with --provider)")
    ] = None,
    alias: Annotated[list[str] | None, typer.Option(help="another name; repeat")] = None,
    weights: Annotated[str | None, typer.Option(
        help="native, q4_0, q8_0, bf16 or f16")] = None,
    context: Annotated[int | None, typer.Option(help="context tokens per sequence")] = None,
    sequences: Annotated[int | None, typer.Option(help="sequences decoded together")] = None,
    keep_alive: Annotated[float | None, typer.Option(
        help="idle seconds before it unloads (default: the server's)")] = None,
    tokenizer: Annotated[str | None, typer.Option(
        help="upstream models: a GGUF of the same model whose tokenizer counts the tokens "
        "when the provider reports no usage")] = None,
    fallback: Annotated[list[str] | None, typer.Option(
        help="upstream models: a model tried when the provider is unavailable; repeat")
    ] = None,
    pin: Annotated[bool, typer.Option("--pin", help="keep it loaded")] = False,
    org: Annotated[list[str] | None, typer.Option(
        help="an organization id that may use it; repeat (default: every one)")] = None,
    input_price: Annotated[Decimal | None, typer.Option(help="USD per million")] = None,
    cached_input_price: Annotated[Decimal | None, typer.Option(help="USD per million")] = None,
    output_price: Annotated[Decimal | None, typer.Option(help="USD per million")] = None,
) -> None:
    """Add a model to the catalog; servers load it on its first request (pinned: now)."""
    if (path is None) == (provider is None):
        raise typer.BadParameter("give either --path or --provider (with --upstream-model)")
    kind = engine or (EngineKind.UPSTREAM if provider else EngineKind.LLAMACPP)
    options: dict[str, Any] = {k: v for k, v in (
        ("weights", weights), ("context", context), ("sequences", sequences),
        ("tokenizer", tokenizer), ("fallbacks", fallback)) if v is not None}
    try:
        entry = check_source(CatalogEntry(
            model_id, kind, source=path or "", options=options, aliases=tuple(alias or ()),
            provider=provider, upstream_model=upstream_model, keep_alive=keep_alive,
            pinned=pin, organizations=tuple(org) if org else None))
    except (CatalogError, EngineError) as exc:
        raise _fail(str(exc)) from None
    prices = _prices(input_price, cached_input_price, output_price)

    async def go(cloud: Any) -> CatalogEntry:
        added: CatalogEntry = await cloud.catalog.add(entry)
        if prices is not None:
            await cloud.prices.set_price(SCOPE, added.id, prices)
        return added

    show(_entry_json(_catalog(go), None))


@models.command("update")
def update(
    model_id: Annotated[str, typer.Argument(metavar="ID")],
    path: Annotated[str | None, typer.Option(help="a new source file or folder")] = None,
    upstream_model: Annotated[str | None, typer.Option(
        help="the model's new id at its provider")] = None,
    alias: Annotated[list[str] | None, typer.Option(
        help="the model's aliases, replacing the old ones; repeat")] = None,
    no_aliases: Annotated[bool, typer.Option("--no-aliases", help="drop every alias")] = False,
    weights: Annotated[str | None, typer.Option(
        help="native, q4_0, q8_0, bf16 or f16")] = None,
    context: Annotated[int | None, typer.Option(help="context tokens per sequence")] = None,
    sequences: Annotated[int | None, typer.Option(help="sequences decoded together")] = None,
    keep_alive: Annotated[float | None, typer.Option(
        help="idle seconds before it unloads")] = None,
    server_keep_alive: Annotated[bool, typer.Option(
        "--server-keep-alive", help="use the server's keep_alive again")] = False,
    org: Annotated[list[str] | None, typer.Option(
        help="the organizations that may use it, replacing the old list; repeat")] = None,
    all_orgs: Annotated[bool, typer.Option("--all-orgs", help="every organization")] = False,
    input_price: Annotated[Decimal | None, typer.Option(help="USD per million")] = None,
    cached_input_price: Annotated[Decimal | None, typer.Option(help="USD per million")] = None,
    output_price: Annotated[Decimal | None, typer.Option(help="USD per million")] = None,
) -> None:
    """Change a catalog model: only what is given changes (engine options are merged into
    the model's own). A new source or options take effect at its next load."""
    changes: dict[str, Any] = {}
    if path is not None:
        changes["source"] = path
    if upstream_model is not None:
        changes["upstream_model"] = upstream_model
    if alias or no_aliases:
        changes["aliases"] = () if no_aliases else tuple(alias or ())
    if keep_alive is not None or server_keep_alive:
        changes["keep_alive"] = None if server_keep_alive else keep_alive
    if org or all_orgs:
        changes["organizations"] = None if all_orgs else tuple(org or ())
    options = {k: v for k, v in (("weights", weights), ("context", context),
                                 ("sequences", sequences)) if v is not None}
    prices = _prices(input_price, cached_input_price, output_price)

    async def go(cloud: Any) -> CatalogEntry:
        entry: CatalogEntry | None = await cloud.catalog.find(model_id)
        if entry is None:
            raise UnknownCatalogModel(model_id)
        if options:
            changes["options"] = {**entry.options, **options}
        if "source" in changes or options:  # resolved to absolute, readable paths
            checked = check_source(dataclasses.replace(entry, **changes))
            changes.update(source=checked.source, options=checked.options)
        updated: CatalogEntry = await cloud.catalog.update(entry.id, **changes) \
            if changes else entry
        if prices is not None:
            await cloud.prices.set_price(SCOPE, updated.id, prices)
        return updated

    show(_entry_json(_catalog(go), None))


@models.command("list")
def list_(url: Url = None, admin_key: AdminKey = None) -> None:
    """The catalog, with each model's state on the server (when one answers)."""
    entries: list[CatalogEntry] = _catalog(lambda c: c.catalog.entries())
    states = _server_states(url, admin_key)
    rows = [_entry_json(e, states.get(e.id)) for e in entries]
    width = max([len(r["id"]) for r in rows] + [2])
    typer.echo(f"{'ID':<{width}}  {'ENGINE':<8}  {'STATE':<9}  PINNED  SOURCE")
    for r in rows:
        where = r["source"] or f"{r['provider']}:{r['upstream_model']}"
        typer.echo(f"{r['id']:<{width}}  {r['engine']:<8}  {r['state'][:9]:<9}  "
                   f"{'yes' if r['pinned'] else 'no':<6}  {where}")
        if r.get("error"):
            typer.echo(f"{'':<{width}}  failed: {r['error']}")


@models.command("show")
def show_(model_id: Annotated[str, typer.Argument(metavar="ID")], url: Url = None,
          admin_key: AdminKey = None) -> None:
    """One model (by id or alias) as JSON, with its state on the server."""
    entry: CatalogEntry | None = _catalog(lambda c: c.catalog.find(model_id))
    if entry is None:
        raise _fail(f"no model {model_id!r} in the catalog")
    show(_entry_json(entry, _server_states(url, admin_key).get(entry.id)))


@models.command("remove")
def remove(model_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Remove a model from the catalog; servers unload it once its requests finish."""
    show(_entry_json(_catalog(lambda c: c.catalog.remove(model_id)), None))


def _set_pinned(model_id: str, pinned: bool) -> None:
    show(_entry_json(_catalog(lambda c: c.catalog.update(model_id, pinned=pinned)), None))


@models.command("pin")
def pin(model_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Keep a model loaded: servers load it and never unload it for room or idleness."""
    _set_pinned(model_id, True)


@models.command("unpin")
def unpin(model_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Let a model be unloaded again when idle or for room."""
    _set_pinned(model_id, False)


def _server_action(model_id: str, action: str, url: str | None,
                   admin_key: str | None) -> None:
    if not admin_key:
        raise _fail("this acts on the running server: give --admin-key or AICLOUD_ADMIN_KEY")
    base = _base(url)
    try:
        resp = httpx.post(f"{base}/admin/v1/models/{model_id}/{action}", timeout=600,
                          headers={"Authorization": f"Bearer {admin_key}"})
    except httpx.HTTPError as exc:
        raise _fail(f"{base} is not answering ({type(exc).__name__})") from None
    body = resp.json()
    if resp.status_code != 200:
        raise _fail(body.get("error", {}).get("message", resp.text))
    if body.get("state") == "failed":
        typer.echo(json.dumps(body, indent=2), err=True)
        raise _fail(f"model {model_id} failed to load: {body.get('error')}")
    show(body)


@models.command("load")
def load(model_id: Annotated[str, typer.Argument(metavar="ID")], url: Url = None,
         admin_key: AdminKey = None) -> None:
    """Load a model on the running server now (a failed one tries again)."""
    _server_action(model_id, "load", url, admin_key)


@models.command("unload")
def unload(model_id: Annotated[str, typer.Argument(metavar="ID")], url: Url = None,
           admin_key: AdminKey = None) -> None:
    """Unload a model from the running server once its requests finish."""
    _server_action(model_id, "unload", url, admin_key)

