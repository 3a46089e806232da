"""`aicloud providers add|list|show|update|remove`: the admin API's provider operations
against the database. A key is read from stdin (`--api-key-stdin`), never taken as an
argument (the process list shows arguments), or named by its environment variable."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from aicloud.admin_cli import run, show
from aicloud.api.routes.admin.providers import ProviderList, provider_json
from aicloud.providers.store import ProviderSettings, ProviderView
from aicloud.services import Cloud

providers = typer.Typer(help="Upstream providers (OpenAI-compatible services).",
                        no_args_is_help=True)

KeyStdin = Annotated[bool, typer.Option(
    "--api-key-stdin", help="read the provider's API key from stdin (stored encrypted)")]
KeyEnv = Annotated[str | None, typer.Option(
    help="take the key from this environment variable of the server, at each request")]
Headers = Annotated[list[str] | None, typer.Option(
    "--header", help="NAME=VALUE sent with every request (stored encrypted); repeat")]
Timeout = Annotated[float | None, typer.Option(help="seconds to the first byte, and between "
                                                    "chunks (default 60)")]
Connect = Annotated[float | None, typer.Option(help="seconds to connect (default 5)")]
Retries = Annotated[int | None, typer.Option(help="extra attempts before the first byte "
                                                  "(default 2)")]
Concurrency = Annotated[int | None, typer.Option(help="requests in flight at most "
                                                      "(default 64)")]


def _key(stdin: bool) -> str | None:
    if not stdin:
        return None
    key = sys.stdin.readline().strip()
    if not key:
        raise typer.BadParameter("no key on stdin", param_hint="--api-key-stdin")
    return key


def _headers(pairs: list[str] | None) -> dict[str, str] | None:
    if pairs is None:
        return None
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise typer.BadParameter("use NAME=VALUE", param_hint="--header")
        out[name.strip()] = value
    return out


def _settings(base: ProviderSettings, timeout: float | None, connect_timeout: float | None,
              retries: int | None, max_concurrency: int | None) -> ProviderSettings:
    return ProviderSettings(
        timeout if timeout is not None else base.timeout,
        connect_timeout if connect_timeout is not None else base.connect_timeout,
        retries if retries is not None else base.retries,
        max_concurrency if max_concurrency is not None else base.max_concurrency)


@providers.command("add")
def add(name: str, base_url: Annotated[str, typer.Option(help="e.g. https://host/v1")],
        api_key_stdin: KeyStdin = False, api_key_env: KeyEnv = None, header: Headers = None,
        timeout: Timeout = None, connect_timeout: Connect = None, retries: Retries = None,
        max_concurrency: Concurrency = None) -> None:
    """Add a provider; then `aicloud models add ID --provider NAME --upstream-model X`."""
    if api_key_stdin and api_key_env:
        raise typer.BadParameter("give --api-key-stdin or --api-key-env, not both")
    key = _key(api_key_stdin)
    settings = _settings(ProviderSettings(), timeout, connect_timeout, retries,
                         max_concurrency)
    view = run(lambda c: c.providers.add(name, base_url, api_key=key, api_key_env=api_key_env,
                                         headers=_headers(header), settings=settings))
    show(provider_json(view).model_dump())


@providers.command("list")
def list_() -> None:
    views = run(lambda c: c.providers.views())
    show(ProviderList(data=[provider_json(v) for v in views]).model_dump())


@providers.command("show")
def show_one(name: str) -> None:
    show(provider_json(run(lambda c: c.providers.view(name))).model_dump())


@providers.command("update")
def update(name: str, base_url: Annotated[str | None, typer.Option()] = None,
           api_key_stdin: KeyStdin = False, api_key_env: KeyEnv = None,
           header: Headers = None, timeout: Timeout = None, connect_timeout: Connect = None,
           retries: Retries = None, max_concurrency: Concurrency = None) -> None:
    """Change what is given; --header replaces all extra headers."""
    if api_key_stdin and api_key_env:
        raise typer.BadParameter("give --api-key-stdin or --api-key-env, not both")
    key = _key(api_key_stdin)

    async def change(cloud: Cloud) -> ProviderView:
        current = await cloud.providers.view(name)
        changes: dict[str, object] = {"settings": _settings(
            current.settings, timeout, connect_timeout, retries, max_concurrency)}
        for field, value in (("base_url", base_url), ("api_key", key),
                             ("api_key_env", api_key_env), ("headers", _headers(header))):
            if value is not None:
                changes[field] = value
        return await cloud.providers.update(name, **changes)

    show(provider_json(run(change)).model_dump())


@providers.command("remove")
def remove(name: str) -> None:
    run(lambda c: c.providers.remove(name))
    show({"object": "provider.deleted", "name": name, "deleted": True})
