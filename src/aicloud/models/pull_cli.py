"""`aicloud models pull SOURCE`: here, straight into AICLOUD_HOME/models and the database's
catalog, or (with --url) inside a running server through its admin API. Either way a
Rich progress bar on stderr, the new catalog entry as JSON on stdout, and Ctrl-C keeps
the partial file for the next pull of the same source to resume."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Annotated, Any, NoReturn, TypeVar

import httpx
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from aicloud.config import Settings
from aicloud.models.catalog import CatalogEntry, CatalogError
from aicloud.models.pulls import (
    PullCancelled,
    PullError,
    PullProgress,
    PullRequest,
    check_names_free,
    fetch,
    install,
    models_dir,
)
from aicloud.services import Cloud, open_cloud
from aicloud.store import migrate

T = TypeVar("T")
POLL_SECONDS = 0.5
FINISHED = ("done", "failed", "cancelled")

models = typer.Typer(help="The model catalog.", no_args_is_help=True)


def pull_command(
    source: Annotated[str, typer.Argument(
        help="hf://OWNER/REPO/FILE.gguf (HF_ENDPOINT and HF_TOKEN are honoured) or an "
             "http(s) URL of a GGUF file")],
    model_id: Annotated[str | None, typer.Option(
        "--id", help="the model's id (default: the file's name without .gguf)")] = None,
    sha256: Annotated[str | None, typer.Option(
        help="the file's expected sha256; the hub's own is checked too")] = None,
    alias: Annotated[list[str] | None, typer.Option(help="another name; repeat")] = None,
    pin: Annotated[bool, typer.Option("--pin", help="never evicted from memory")] = False,
    keep_alive: Annotated[float | None, typer.Option(
        help="seconds the model stays loaded when idle (default: the server's)")] = None,
    org: Annotated[list[str] | None, typer.Option(
        help="only this organization may use it; repeat (default: all)")] = None,
    weights: Annotated[str | None, typer.Option(
        help="serve the weights as shipped (native) or re-typed: q4_0, q8_0, bf16, f16")] = None,
    context: Annotated[int | None, typer.Option(help="context tokens per sequence")] = None,
    url: Annotated[str | None, typer.Option(
        help="pull inside this server (its admin API) instead of here")] = None,
    admin_key: Annotated[str | None, typer.Option(
        envvar="AICLOUD_ADMIN_KEY", help="an installation admin key, with --url")] = None,
) -> None:
    """Pull a GGUF model into the catalog, with progress; resumable, checked before use."""
    options = {k: v for k, v in (("weights", weights), ("context", context)) if v is not None}
    try:
        request = PullRequest.create(
            source, model_id, sha256, aliases=tuple(alias or ()), pinned=pin,
            keep_alive=keep_alive, organizations=tuple(org) if org else None, options=options)
    except (PullError, CatalogError) as exc:
        _fail(str(exc))
    if url:
        _show(_pull_in_server(url, admin_key, request))
    else:
        _show(_entry_json(_pull_here(request)))


models.command("pull")(pull_command)


def _pull_here(request: PullRequest) -> CatalogEntry:
    settings = Settings()
    settings.prepare_home()
    migrate.upgrade(settings.db_url)
    folder = models_dir(settings.home_dir)
    _with_cloud(settings, lambda cloud: check_names_free(
        cloud.catalog, request, folder / f"{request.model_id}.gguf"))
    progress = PullProgress("local", request.shown, request.model_id)
    cancel = threading.Event()
    with ThreadPoolExecutor(1, thread_name_prefix="pull") as pool:
        job = pool.submit(fetch, request, folder, progress, cancel)
        try:
            _watch(request, lambda: _local_view(progress, job), job.done)
        except KeyboardInterrupt:
            cancel.set()
        path = _outcome(job)
    return _with_cloud(settings, lambda cloud: install(cloud.catalog, request, path))


def _outcome(job: Future[T]) -> T:
    try:
        return job.result()
    except PullCancelled:
        _fail("interrupted; run the same pull again to resume it", code=130)
    except PullError as exc:
        _fail(str(exc))


def _local_view(progress: PullProgress, job: Future[Any]) -> dict[str, Any]:
    state = progress.state.value
    if job.done():
        state = "failed" if job.exception() else "done"
    return {"state": state, "bytes_done": progress.counter.done,
            "bytes_total": progress.counter.total}


def _with_cloud(settings: Settings, action: Callable[[Cloud], Awaitable[T]]) -> T:
    async def go() -> T:
        cloud = open_cloud(settings)
        try:
            return await action(cloud)
        finally:
            await cloud.close()

    try:
        return asyncio.run(go())
    except CatalogError as exc:
        _fail(str(exc))


def _pull_in_server(url: str, admin_key: str | None, request: PullRequest) -> dict[str, Any]:
    """Start the pull through POST /admin/v1/models/pulls and follow it until it ends;
    Ctrl-C cancels it there too (its partial file stays for the next try)."""
    if not admin_key:
        _fail("--url needs an installation admin key (--admin-key or AICLOUD_ADMIN_KEY)")
    body = {"source": request.source, "id": request.model_id, "sha256": request.sha256,
            "aliases": list(request.aliases), "pinned": request.pinned,
            "keep_alive": request.keep_alive, "options": dict(request.options),
            "organizations": None if request.organizations is None
            else list(request.organizations)}
    with httpx.Client(base_url=url.rstrip("/") + "/admin/v1", timeout=30,
                      headers={"Authorization": f"Bearer {admin_key}"}) as client:
        view = _answer(client.post("/models/pulls", json=body), url)
        latest = [view]

        def poll() -> dict[str, Any]:
            time.sleep(POLL_SECONDS)
            latest[0] = _answer(client.get(f"/models/pulls/{view['id']}"), url)
            return latest[0]

        try:
            _watch(request, poll, lambda: latest[0]["state"] in FINISHED)
        except KeyboardInterrupt:
            client.delete(f"/models/pulls/{view['id']}")
            _fail("interrupted; the server stopped the pull: pull again to resume it", code=130)
    if latest[0]["state"] != "done":
        _fail(latest[0]["error"] or latest[0]["state"])
    return latest[0]


def _answer(resp: httpx.Response, url: str) -> dict[str, Any]:
    try:
        data: dict[str, Any] = resp.json()
    except ValueError:
        _fail(f"{url} answered HTTP {resp.status_code}, not JSON")
    if resp.status_code >= 400:
        _fail(data.get("error", {}).get("message", f"HTTP {resp.status_code}"))
    return data


def _watch(request: PullRequest, read: Callable[[], dict[str, Any]],
           done: Callable[[], bool]) -> None:
    """A progress bar on stderr, fed by `read` until `done`."""
    console = Console(stderr=True)
    console.print(f"pulling {request.shown} as model {request.model_id}", highlight=False,
                  markup=False, soft_wrap=True)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    label = request.model_id
    with Progress(*columns, console=console, transient=False) as bar:
        task: TaskID = bar.add_task(label, total=None)
        while True:
            view = read()
            bar.update(task, completed=view["bytes_done"], total=view["bytes_total"],
                       description=f"{label} {view['state']}")
            if done():
                view = read()
                bar.update(task, completed=view["bytes_done"],
                           description=f"{label} {view['state']}")
                return
            time.sleep(0.1)


def _entry_json(entry: CatalogEntry) -> dict[str, Any]:
    return {"object": "model", "id": entry.id, "engine": entry.engine.value,
            "source": entry.source, "aliases": list(entry.aliases),
            "options": dict(entry.options), "keep_alive": entry.keep_alive,
            "pinned": entry.pinned,
            "organizations": None if entry.organizations is None else list(entry.organizations)}


def _show(data: dict[str, Any]) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)
