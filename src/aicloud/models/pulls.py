"""Pulls: a GGUF from `hf://OWNER/REPO/FILE` or `https://…` into AICLOUD_HOME/models and the
catalog. Each pull downloads into `models/.partial/` (resumable), checks the sha256 (the
one asked for, and the hub's for LFS files) and that llama.cpp can read the file, and only
then renames it into place and adds it to the catalog: a half or corrupt file is never
at a path the catalog names.

`fetch` is the blocking part (a worker thread runs it); `Pulls` runs pulls inside the
server, where the admin API starts them and reads their progress."""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from aicloud.accounts.base import new_id, now
from aicloud.models.catalog import Catalog, CatalogEntry, CatalogError, EngineKind
from aicloud.models.pull_download import Counter, Download, PullCancelled
from aicloud.models.pull_sources import SHA256, PullError, file_name_of, resolve, shown_url

log = logging.getLogger(__name__)

PARTIAL_DIR = ".partial"
NOT_IN_ID = re.compile(r"[^A-Za-z0-9._:-]+")
# pulls a server runs at once; more wait their turn (state "queued")
PULL_WORKERS = 2
# finished pulls a server remembers for GET /admin/v1/models/pulls
KEEP_FINISHED = 100

__all__ = ["PullCancelled", "PullError", "PullProgress", "PullRequest", "PullState", "Pulls",
           "check_readable", "fetch", "install"]


class PullState(enum.StrEnum):
    QUEUED = "queued"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (PullState.DONE, PullState.FAILED, PullState.CANCELLED)


@dataclass(slots=True, frozen=True)
class PullRequest:
    """What to pull and the catalog entry it becomes. `model_id` defaults to the file's
    name without `.gguf`; `options` are the engine's (weights, context, ...)."""

    source: str
    model_id: str
    sha256: str | None = None
    aliases: tuple[str, ...] = ()
    pinned: bool = False
    keep_alive: float | None = None
    organizations: tuple[str, ...] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def create(cls, source: str, model_id: str | None = None, sha256: str | None = None,
               **fields: Any) -> PullRequest:
        """Check everything that needs no network: the source's scheme and shape, the
        names, the checksum's form."""
        name = file_name_of(source)
        model_id = model_id or default_model_id(name)
        if sha256 is not None and not SHA256.match(sha256.lower()):
            raise PullError("sha256 must be 64 hexadecimal digits")
        request = cls(source, model_id, sha256 and sha256.lower(), **fields)
        request.entry(Path("check.gguf"))  # the names and fields, as the catalog checks them
        if "weights" in request.options:
            from aicloud.engines.llamacpp.model import ModelLoadError
            from aicloud.engines.llamacpp.weights import check_format

            try:
                check_format(str(request.options["weights"]))
            except ModelLoadError as exc:
                raise PullError(exc.message) from None
        return request

    @property
    def shown(self) -> str:
        return self.source if self.source.startswith("hf://") else shown_url(self.source)

    def entry(self, path: Path) -> CatalogEntry:
        return CatalogEntry(self.model_id, EngineKind.LLAMACPP, str(path), dict(self.options),
                            aliases=self.aliases, keep_alive=self.keep_alive,
                            pinned=self.pinned, organizations=self.organizations)


def default_model_id(file_name: str) -> str:
    stem = file_name[:-5] if file_name.lower().endswith(".gguf") else file_name
    model_id = NOT_IN_ID.sub("-", stem).lstrip("._:-")[:128]
    if not model_id:
        raise PullError("the source names no file to call the model after: give it an id")
    return model_id


@dataclass(slots=True)
class PullProgress:
    """One pull as the admin API and the CLI show it. The worker thread writes it, readers
    take what is there (single int and str fields: nothing is seen half-written)."""

    id: str
    source: str
    model_id: str
    state: PullState = PullState.QUEUED
    counter: Counter = field(default_factory=Counter)
    sha256: str | None = None
    path: str | None = None
    error: str | None = None
    created_at: datetime = field(default_factory=now)
    finished_at: datetime | None = None

    def finish(self, state: PullState, error: str | None = None) -> None:
        self.state, self.error, self.finished_at = state, error, now()


def models_dir(home: Path) -> Path:
    return home / "models"


def fetch(request: PullRequest, folder: Path, progress: PullProgress,
          cancel: threading.Event) -> Path:
    """Download, check and rename into `folder` (blocking). Returns the final path; raises
    PullError (the partial file is kept when resuming it makes sense) or PullCancelled."""
    final = folder / f"{request.model_id}.gguf"
    remote = resolve(request.source)
    expected = request.sha256
    if expected and remote.sha256 and expected != remote.sha256:
        raise PullError(f"the sha256 given ({expected}) is not the one the hub names for "
                        f"{request.source} ({remote.sha256})")
    expected = expected or remote.sha256
    progress.counter.total = remote.size
    progress.state = PullState.DOWNLOADING
    download = Download(remote, folder / PARTIAL_DIR / f"{final.name}.part", progress.counter,
                        cancel)
    try:
        digest = download.run()
    except OSError as exc:  # a full disk, a read-only folder
        raise PullError(f"cannot write {download.partial}: {exc.strerror}") from None
    progress.state, progress.sha256 = PullState.VERIFYING, digest
    try:
        if expected and digest != expected:
            raise PullError(f"sha256 mismatch for {request.shown}: expected {expected}, "
                            f"got {digest}")
        check_readable(download.partial)
    except PullError:
        download.discard()
        raise
    os.replace(download.partial, final)
    download.state_file.unlink(missing_ok=True)
    _sync_folder(folder)
    return final


def check_readable(path: Path) -> None:
    """A GGUF header, and llama.cpp reading the file's metadata, vocabulary and tensor
    table without loading the weights (`vocab_only`): a truncated or foreign file fails
    here, in a fraction of a second, instead of at its first request."""
    import llama_cpp

    from aicloud.engines.llamacpp.model import ModelLoadError, check_gguf_path

    try:
        check_gguf_path(path)
    except ModelLoadError as exc:  # missing, not a regular file, or no GGUF header
        reason = exc.message.split(":")[0].replace("not a GGUF file", "no GGUF header")
        raise PullError(f"not a GGUF model: {reason}") from None
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise PullError("llama.cpp cannot read the file: truncated, corrupt or of an "
                        "unsupported architecture")
    llama_cpp.llama_model_free(model)


async def check_names_free(catalog: Catalog, request: PullRequest, final: Path) -> None:
    """Refuse before downloading what could not enter the catalog afterwards."""
    for entry in await catalog.entries():
        taken = set(entry.names) & {request.model_id, *request.aliases}
        if taken:
            raise CatalogError(f"the name {sorted(taken)[0]!r} is already used by model "
                               f"{entry.id}")
        if entry.source and entry.path == final:
            raise CatalogError(f"{final} is already the source of model {entry.id}")


async def install(catalog: Catalog, request: PullRequest, path: Path) -> CatalogEntry:
    try:
        return await catalog.add(request.entry(path))
    except CatalogError as exc:
        raise CatalogError(f"{exc}; the file stays at {path} for `aicloud models add`") from None


@dataclass(slots=True)
class _Run:
    progress: PullProgress
    cancel: threading.Event
    task: asyncio.Task[None] | None = None


class Pulls:
    """The pulls this server runs, started through the admin API: at most PULL_WORKERS
    download at once, each in its own thread; the last KEEP_FINISHED finished ones stay
    listed. One server process knows only its own pulls."""

    def __init__(self, catalog: Catalog, home: Path, workers: int = PULL_WORKERS) -> None:
        self._catalog = catalog
        self._folder = models_dir(home)
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="pull")
        self._runs: OrderedDict[str, _Run] = OrderedDict()

    async def start(self, request: PullRequest) -> PullProgress:
        await check_names_free(self._catalog, request, self._folder / f"{request.model_id}.gguf")
        # checked after the await, so two requests for one id cannot both pass
        running = {r.progress.model_id for r in self._runs.values()
                   if not r.progress.state.finished}
        if request.model_id in running:
            raise PullError(f"model {request.model_id} is already being pulled")
        progress = PullProgress(new_id("pull"), request.shown, request.model_id)
        run = _Run(progress, threading.Event())
        self._runs[progress.id] = run
        run.task = asyncio.create_task(self._run(request, run))
        self._forget_old()
        log.info("pull %s of %s as model %s started", progress.id, progress.source,
                 progress.model_id)
        return progress

    def get(self, pull_id: str) -> PullProgress | None:
        run = self._runs.get(pull_id)
        return run.progress if run else None

    def items(self) -> list[PullProgress]:
        return [run.progress for run in self._runs.values()]

    def cancel(self, pull_id: str) -> PullProgress | None:
        """Stop a pull at its next chunk; the partial file stays for the next pull."""
        run = self._runs.get(pull_id)
        if run is not None:
            run.cancel.set()
        return run.progress if run else None

    async def close(self, wait: float = 10.0) -> None:
        tasks = [r.task for r in self._runs.values() if r.task and not r.task.done()]
        for run in self._runs.values():
            run.cancel.set()
        if tasks:
            await asyncio.wait(tasks, timeout=wait)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self, request: PullRequest, run: _Run) -> None:
        progress = run.progress
        loop = asyncio.get_running_loop()
        try:
            path = await loop.run_in_executor(self._executor, fetch, request, self._folder,
                                              progress, run.cancel)
            await install(self._catalog, request, path)
        except PullCancelled:
            progress.finish(PullState.CANCELLED, "cancelled; pull it again to resume")
        except (PullError, CatalogError) as exc:
            progress.finish(PullState.FAILED, str(exc))
        except Exception as exc:
            log.exception("pull %s failed", progress.id)
            progress.finish(PullState.FAILED, f"internal error ({type(exc).__name__})")
        else:
            progress.path = str(path)
            progress.finish(PullState.DONE)
        log.info("pull %s of %s: %s%s", progress.id, progress.source, progress.state.value,
                 f" ({progress.error})" if progress.error else "")

    def _forget_old(self) -> None:
        finished = [pid for pid, r in self._runs.items() if r.progress.state.finished]
        for pid in finished[:max(0, len(finished) - KEEP_FINISHED)]:
            del self._runs[pid]


def _sync_folder(folder: Path) -> None:
    """Make the rename durable: a crash right after it must not lose the file."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
