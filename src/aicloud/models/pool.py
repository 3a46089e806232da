"""The models this server runs: the catalog's entries, loaded on demand within a memory
budget and unloaded when idle.

Each model goes unloaded -> loading -> ready -> draining -> unloaded, or to failed when
its load fails. A request for an unloaded model waits while exactly one load runs (the
weights are read in worker threads, so other models keep decoding); loading makes room by
unloading idle models, the least in demand first (requests counted with a half-life, so
between models asked equally often the least recently used), never a pinned model, one
with work in flight or one loaded less than `min_residency` ago. What Ollama's users hit
is what this is built against: a model reloaded on every request (keep_alive per model
and per request, minimum residency), over-estimated memory (the estimate from the GGUF
header is replaced by what the load measurably cost), no pinning, and an eviction that
waited forever (a load waits at most `fit_wait` for room, then the request gets a 503
with Retry-After; nothing holds a lock while it waits).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy.exc import SQLAlchemyError

from aicloud.engines.base import (
    GENERATE,
    ChatMessage,
    EmbeddingRequest,
    Embeddings,
    Engine,
    EngineError,
    EngineInfo,
    EngineStats,
    EngineUnavailable,
    GenerationRequest,
    GenerationStream,
    TenantLoad,
)
from aicloud.engines.llamacpp.model import ModelLoadError
from aicloud.models.catalog import MAX_KEEP_ALIVE, Catalog, CatalogEntry, CatalogError, EngineKind
from aicloud.models.engines import EngineKinds
from aicloud.models.memory import resident_bytes, return_freed_memory
from aicloud.scheduling.admission import Admitter

log = logging.getLogger(__name__)


class UnknownModel(LookupError):
    pass


class ModelState(enum.StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"

    @property
    def resident(self) -> bool:
        """Holds (or is loading into) its memory."""
        return self in (ModelState.LOADING, ModelState.READY, ModelState.DRAINING)


@dataclass(slots=True, frozen=True)
class PoolConfig:
    """`keep_alive`: idle seconds before a model without its own unloads; a request may
    ask for another (`X-Keep-Alive`), up to `max_keep_alive`. `fit_wait`: how long a load
    waits for busy models to finish before its requests get a 503."""

    memory_budget: int = 8 << 30
    keep_alive: float = 300.0
    max_keep_alive: float = MAX_KEEP_ALIVE
    min_residency: float = 2.0
    # how long a request keeps counting for its model's place in the eviction order
    demand_half_life: float = 30.0
    fit_wait: float = 30.0
    retry_after: float = 5.0
    tick: float = 1.0  # how often idle models are looked at and the catalog re-read

    def __post_init__(self) -> None:
        if self.memory_budget <= 0:
            raise ValueError("the memory budget must be positive")
        if not (math.isfinite(self.demand_half_life) and self.demand_half_life > 0):
            raise ValueError("demand_half_life must be a positive number of seconds")
        for name in ("keep_alive", "max_keep_alive", "min_residency", "fit_wait"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a non-negative number of seconds")
        if self.tick <= 0 or self.retry_after <= 0:
            raise ValueError("tick and retry_after must be positive")


class CatalogSource(Protocol):
    """Where the pool reads the catalog: `catalog.Catalog` (the database)."""

    async def entries(self) -> list[CatalogEntry]: ...

    async def find(self, name: str) -> CatalogEntry | None: ...


class PoolObserver(Protocol):
    """Told of loads and unloads (the API's telemetry, for /metrics)."""

    def model_loaded(self, model: str, seconds: float, ok: bool) -> None: ...

    def model_unloaded(self, model: str, reason: str) -> None: ...


@dataclass(slots=True, frozen=True)
class ModelCard:
    id: str
    created: int
    owned_by: str = "aicloud"
    capabilities: tuple[str, ...] = ()


@dataclass(slots=True, frozen=True)
class ModelView:
    """A model as the pool sees it now (health, admin API, metrics)."""

    id: str
    state: ModelState
    pinned: bool
    memory_bytes: int  # measured once loaded, estimated before
    measured: bool
    keep_alive: float
    in_flight: int  # requests holding it, or engine calls on it, whichever are more
    idle_seconds: float | None
    error: str | None


@dataclass(slots=True)
class Lease:
    """A model made ready for one request, which counts as work in flight on it until
    `release` (the API releases it when the response has been sent), so the model is
    not unloaded between the request's steps (tokenizing, the budget hold, generating).
    `cold_since` is when the request began waiting for a load (None if it did not)."""

    model: PooledModel
    cold_since: float | None = None
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.model.end(leased=True)


class PooledModel:
    """One catalog model in this process, whatever its state: an Engine to the API, whose
    calls wait for the model to be loaded (and load it again if it was unloaded between
    two calls of one request), and which counts the work in flight on it, so the pool
    never unloads a model under a running request."""

    def __init__(self, pool: ModelPool, entry: CatalogEntry, engine: Engine | None = None
                 ) -> None:
        self._pool = pool
        self.entry = entry
        self.engine = engine
        self.fixed = engine is not None  # built by the caller, not from the catalog
        self.state = ModelState.UNLOADED
        self.need = 0
        self.measured = False
        self.reserved = False  # a load that has made its room (counted while loading)
        self.error: str | None = None
        self.loaded_at = 0.0
        self.last_used = time.monotonic()
        self._demand = 0.0  # requests for it, each decayed by the pool's half-life
        self._demand_at = self.last_used
        self.requested_keep_alive: float | None = None  # the last request's X-Keep-Alive
        # work in flight: requests holding a lease, and engine calls running (a request's
        # own calls run under its lease; a generation outlives it when its client left,
        # until the engine stops it). Either keeps the model loaded.
        self.leased = 0
        self.running = 0
        self.waiters = 0  # requests waiting for it to be ready: it is theirs once loaded
        self.service: float | None = None  # its admission layer's service time, kept
        self.changed = asyncio.Event()  # set and replaced at every state change
        self._info: EngineInfo | None = None
        self._loading: asyncio.Task[None] | None = None

    @property
    def model_id(self) -> str:
        return self.entry.id

    @property
    def keep_alive(self) -> float:
        if self.requested_keep_alive is not None:
            return self.requested_keep_alive
        if self.entry.keep_alive is not None:
            return self.entry.keep_alive
        return self._pool.config.keep_alive

    @property
    def holds_memory(self) -> bool:
        """Counted against the budget: loaded, or loading once it has made room (a load
        still waiting for room must not keep the others from finding theirs)."""
        return self.state in (ModelState.READY, ModelState.DRAINING) or (
            self.state is ModelState.LOADING and self.reserved)

    def set_state(self, state: ModelState) -> None:
        if state is not ModelState.LOADING:
            self.reserved = False
        self.state = state
        self.changed.set()
        self.changed = asyncio.Event()
        self._pool.wake()

    @property
    def busy(self) -> bool:
        return bool(self.leased or self.running)

    @property
    def in_flight(self) -> int:
        """What the admin API, console and metrics show: one request streaming counts
        once, though it holds a lease and runs a generation."""
        return max(self.leased, self.running)

    def requested(self, now: float, half_life: float) -> None:
        """One more request for it (loaded or not)."""
        self._demand = self.demand(now, half_life) + 1.0
        self._demand_at = now

    def demand(self, now: float, half_life: float) -> float:
        """Its requests, each counting half as much every `half_life` seconds: about its
        request rate times 1.44 half-lives, and for models asked once each, the most
        recent highest (LRU's order)."""
        decay: float = 0.5 ** (max(0.0, now - self._demand_at) / half_life)
        return self._demand * decay

    def evictable(self, now: float, min_residency: float) -> bool:
        return (self.state is ModelState.READY and not self.entry.pinned and not self.fixed
                and not self.busy and self.waiters == 0
                and now - self.loaded_at >= min_residency)

    def view(self, now: float) -> ModelView:
        idle = now - self.last_used if not self.busy and self.state.resident else None
        return ModelView(self.entry.id, self.state, self.entry.pinned or self.fixed, self.need,
                         self.measured, self.keep_alive, self.in_flight, idle, self.error)

    # -- work in flight -------------------------------------------------------------------

    def begin(self, leased: bool = False) -> None:
        if leased:
            self.leased += 1
        else:
            self.running += 1
        self.last_used = time.monotonic()

    def end(self, leased: bool = False) -> None:
        if leased:
            self.leased -= 1
        else:
            self.running -= 1
        self.last_used = time.monotonic()
        if not self.busy:
            self._pool.wake()

    async def _ready(self) -> Engine:
        await self._pool.ensure(self)
        assert self.engine is not None  # ensure() returns only with the engine ready
        return self.engine

    # -- the Engine protocol --------------------------------------------------------------

    async def start(self) -> None:
        await self._pool.ensure(self)

    async def close(self) -> None:
        await self._pool.unload(self.entry.id, reason="closed")

    # Work counts from the moment the engine is ready (no await between the two), never
    # while waiting for a load or a drain: a drain waits for the count to reach zero.

    async def encode_chat(self, messages: list[ChatMessage],
                          tools: list[dict[str, Any]] | None = None) -> list[int]:
        engine = await self._ready()
        self.begin()
        try:
            return await engine.encode_chat(messages, tools)
        finally:
            self.end()

    async def encode_text(self, text: str) -> list[int]:
        engine = await self._ready()
        self.begin()
        try:
            return await engine.encode_text(text)
        finally:
            self.end()

    async def generate(self, request: GenerationRequest) -> GenerationStream:
        """The stream counts as work in flight until the engine's final event, whoever
        reads it (a client that left still has its sequence running until cancelled)."""
        engine = await self._ready()
        self.begin()
        try:
            stream = await engine.generate(request)
        except BaseException:
            self.end()
            raise
        final = asyncio.ensure_future(stream.final())
        final.add_done_callback(lambda _: self.end())
        return stream

    async def embed(self, request: EmbeddingRequest) -> Embeddings:
        engine = await self._ready()
        self.begin()
        try:
            return await engine.embed(request)
        finally:
            self.end()

    def info(self) -> EngineInfo:
        """The loaded engine's, or what it said when it was last loaded."""
        if self.engine is not None and self.state is ModelState.READY:
            self._info = self.engine.info()
        if self._info is None:
            raise EngineError(f"model {self.entry.id} is not loaded")
        return self._info

    def stats(self) -> EngineStats:
        if self.engine is None or not self.state.resident:
            return EngineStats(0, 0, 0.0, 0, 0)
        return self.engine.stats()

    def tenants(self) -> list[TenantLoad]:
        tenants: Callable[[], list[TenantLoad]] | None = getattr(self.engine, "tenants", None)
        return tenants() if tenants is not None and self.state.resident else []

    @property
    def capabilities(self) -> tuple[str, ...]:
        """What the model can do; before its first load, what every engine kind can."""
        try:
            return tuple(sorted(self.info().capabilities))
        except EngineError:
            return (GENERATE,)


@dataclass(slots=True)
class _Room:
    """Signalled whenever memory may have become free (an unload, a model going idle).
    Each wait is on a fresh event, so a wake-up between a check and the wait is not lost
    (the waiter then re-checks at once)."""

    event: asyncio.Event = field(default_factory=asyncio.Event)

    def wake(self) -> None:
        self.event.set()
        self.event = asyncio.Event()

    def waiter(self) -> asyncio.Event:
        return self.event

    async def wait(self, event: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), seconds)


class ModelPool:
    """`engines`: models built by the caller, served as they are (pinned, never
    unloaded: tests and embedded uses). `kinds` builds the catalog's models; `register`
    are the `--model` entries written into the catalog at start; `memory` reads the
    process's resident bytes, which loads and unloads are measured by."""

    def __init__(self, engines: Mapping[str, Engine] | None = None, *,
                 kinds: EngineKinds | None = None, config: PoolConfig | None = None,
                 register: Iterable[CatalogEntry] = (), default: CatalogEntry | None = None,
                 memory: Callable[[], int | None] = resident_bytes) -> None:
        self.config = config or PoolConfig()
        self._memory = memory
        self.observer: PoolObserver | None = None
        self._kinds = kinds or EngineKinds({})
        self._register = list(register)
        self._default = default  # served when nothing is given and no local model is listed
        self._catalog: CatalogSource | None = None
        self._models: dict[str, PooledModel] = {}
        self._entries: dict[str, CatalogEntry] = {}  # the catalog as last read, by name
        self._created = int(time.time())
        self._memory_lock = asyncio.Lock()  # held by each load and each unload
        self._base = memory()  # the process before any model: what the budget bounds is growth
        self._room = _Room()
        self._room_line: list[PooledModel] = []  # loads waiting for room, oldest first
        self._reaper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        for model_id, engine in (engines or {}).items():
            entry = CatalogEntry(model_id, source=f"(built in: {model_id})", pinned=True)
            self._models[model_id] = PooledModel(self, entry, engine)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, catalog: CatalogSource | None = None) -> None:
        """Register the `--model` entries, start the caller's engines, load the pinned
        models (one that fails is marked failed; the others serve, but a `--model` that
        fails stops the start: the operator named it), then keep watch."""
        self._catalog = catalog
        if isinstance(catalog, Catalog):  # the database's: `--model` registers into it
            for entry in self._register:
                await catalog.add(entry, replace=True)
            entries = await catalog.entries()
            if not self._register and self._default and all(
                    e.engine is EngineKind.UPSTREAM and e.id != self._default.id
                    for e in entries):  # partner models only: the bundled one serves too
                with contextlib.suppress(CatalogError):  # another process just added it
                    await catalog.add(self._default)
        await self.refresh()
        for model in self._models.values():
            if model.fixed and model.engine is not None:
                await model.engine.start()
                model.loaded_at = time.monotonic()
                model.set_state(ModelState.READY)
        pinned = [e for e in self._unique_entries() if e.pinned]
        await asyncio.gather(*(self._preload(e) for e in pinned))
        for entry in self._register:  # what the command line names must serve, or say why
            named = self._models.get(entry.id)
            if named is not None and named.state is ModelState.FAILED:
                raise ModelLoadError(named.error or f"model {entry.id} failed to load")
        self._reaper = asyncio.create_task(self._watch())

    async def close(self) -> None:
        """Stop the pool's own tasks and wait until they have stopped (one cancelled in a
        catalog query must not still be in it when the database is disposed), then close
        the engines."""
        tasks = [task for task in (self._reaper, *self._tasks,
                                   *(m._loading for m in self._models.values()))
                 if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(self._close_engine(m) for m in self._models.values()
                               if m.engine is not None), return_exceptions=True)

    async def _close_engine(self, model: PooledModel) -> None:
        engine, model.engine = model.engine, (model.engine if model.fixed else None)
        if isinstance(engine, Admitter) and engine.service is not None:
            model.service = engine.service  # for its next load's first requests
        if engine is not None:
            await engine.close()

    async def _preload(self, entry: CatalogEntry) -> None:
        model = self._model_for(entry)
        try:
            await self.ensure(model)
        except EngineUnavailable as exc:
            if model.state is not ModelState.FAILED:  # a failure was logged by the load
                log.warning("pinned model %s is not loaded: %s", entry.id, exc.message)

    # -- what requests call ----------------------------------------------------------------

    async def find(self, name: str) -> CatalogEntry | None:
        """The entry called `name` (id or alias): the caller's engines, then the catalog
        (its last good read while the database is away)."""
        fixed = self._models.get(name)
        if fixed is not None and fixed.fixed:
            return fixed.entry
        if self._catalog is None:
            return None
        try:
            return await self._catalog.find(name)
        except SQLAlchemyError:
            return self._entries.get(name)

    async def lease(self, name: str, organization_id: str,
                    may_use: Callable[[str], bool] = lambda _: True,
                    keep_alive: float | None = None, deadline: float | None = None) -> Lease:
        """The model called `name`, loaded (waiting for its load if need be), for a caller
        of `organization_id` whose key allows the names `may_use` accepts. A model the
        caller may not use is UnknownModel, exactly like one that does not exist. A caller
        with a `deadline` (time.monotonic()) gets a 503 once it passes while the model is
        not ready, and a load still waiting for room that nobody waits for any more is
        given up: it would only evict a model others use."""
        entry = await self.find(name)
        if entry is None or not entry.allows(organization_id) or not any(
                may_use(n) for n in entry.names):
            raise UnknownModel(name)
        model = self._model_for(entry)
        # the last request's wish holds until the next one's (as Ollama's keep_alive)
        model.requested_keep_alive = None if keep_alive is None else min(
            keep_alive, self.config.max_keep_alive)
        model.last_used = time.monotonic()
        model.requested(model.last_used, self.config.demand_half_life)
        cold = None if model.state is ModelState.READY else time.perf_counter()
        # a ready model needs no wait (wait_for would time out a deadline already past
        # before ensure() even ran, and answer "could not be loaded" for a loaded model)
        if deadline is None or model.state is ModelState.READY:
            await self.ensure(model)
        else:
            try:
                await asyncio.wait_for(self.ensure(model), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise EngineUnavailable(
                    f"The model '{entry.id}' could not be loaded within the request's "
                    "deadline; retry shortly.", retry_after=self.config.retry_after) from None
        model.begin(leased=True)  # no await since ensure() saw it ready
        return Lease(model, cold)

    async def cards(self, organization_id: str | None = None,
                    may_use: Callable[[str], bool] = lambda _: True) -> list[ModelCard]:
        """Every model the caller may use, loaded or not (`organization_id` None: all)."""
        if self._catalog is not None:
            try:
                await self.refresh()
            except SQLAlchemyError:
                log.debug("listing models from the catalog as last read")
        entries = [e for e in self._unique_entries()
                   if (organization_id is None or e.allows(organization_id))
                   and any(may_use(n) for n in e.names)]
        return [ModelCard(e.id, self._created,
                          capabilities=self._model_for(e).capabilities) for e in entries]

    # -- loading and unloading ------------------------------------------------------------

    async def ensure(self, model: PooledModel) -> None:
        """Return once `model` is ready; start its load if nobody has. A failed model
        stays failed until its catalog entry changes or an admin loads it again. While it
        waits, the model cannot be evicted (a model loaded for waiting requests is theirs:
        evicting it before they run would only make them load it again)."""
        model.waiters += 1
        try:
            await self._until_ready(model)
        finally:
            model.waiters -= 1

    async def _until_ready(self, model: PooledModel) -> None:
        while model.state is not ModelState.READY:
            if model.state is ModelState.FAILED:
                raise EngineUnavailable(
                    f"The model '{model.entry.id}' could not be loaded; an administrator "
                    "can see why in the admin API.", retry_after=self.config.retry_after)
            if model.state is ModelState.UNLOADED:
                model.set_state(ModelState.LOADING)  # before any await: one load only
                model._loading = asyncio.create_task(self._load(model))
                # a load given up after its waiters left raises to nobody
                model._loading.add_done_callback(_retrieved)
            if model.state is ModelState.LOADING and model._loading is not None:
                # a load that cannot fit raises its 503 in every request waiting for it;
                # a request that leaves does not cancel the load
                await asyncio.shield(model._loading)
            else:
                await model.changed.wait()  # draining: load again once it is unloaded

    async def _load(self, model: PooledModel) -> None:
        """The one load of `model`: reserve its memory, make room, build and start its
        engine (in worker threads), measure what it cost."""
        entry = model.entry
        model.error = None
        started = time.perf_counter()
        try:
            if not model.measured:
                model.need = await asyncio.to_thread(self._kinds.estimate, entry)
            if model.need > self.config.memory_budget:
                raise EngineError(f"needs {_mib(model.need)} MiB, more than the whole memory "
                                  f"budget of {_mib(self.config.memory_budget)} MiB")
            await self._make_room(model)
            async with self._memory_lock:  # one load or unload at a time: each measurable
                before = self._memory()
                engine = self._kinds.build(entry)
                if isinstance(engine, Admitter) and engine.service is None:
                    # what its last residency measured: without it, the first requests
                    # after a reload started however near their deadline (bench/pool.py:
                    # most of the late ones at 8 requests/s)
                    engine.service = model.service
                try:
                    await engine.start()
                except BaseException:
                    await _quietly_close(engine)
                    raise
                after = self._memory()
        except EngineUnavailable:
            model.set_state(ModelState.UNLOADED)
            raise
        except asyncio.CancelledError:
            model.set_state(ModelState.UNLOADED)
            raise
        except Exception as exc:
            message = exc.message if isinstance(exc, EngineError) else (
                f"{type(exc).__name__}: {exc}")
            if self._reaper is not None or entry not in self._register:  # else the start
                # fails, saying why once
                log.error("model %s failed to load: %s", entry.id, message)
            model.error = message
            model.set_state(ModelState.FAILED)
            self._observe_load(entry.id, time.perf_counter() - started, ok=False)
            return
        if before is not None and after is not None and model.need > 0:
            # llama.cpp's buffers become resident only as they are first written, so right
            # after a load the growth reads low: it never lowers what the model is counted
            # for (its estimate, or what its last unload freed). Reloads counted at their
            # growth alone let five SmolLM2s be loaded, counted at 561 MiB together, on a
            # budget of 720 for three (bench/pool.py: the process grew by 870 MiB)
            model.need, model.measured = max(after - before, model.need, 1), True
        if self._models.get(entry.id) is not model:  # removed from the catalog meanwhile
            await _quietly_close(engine)
            model.set_state(ModelState.UNLOADED)
            return
        model.engine = engine
        model.loaded_at = model.last_used = time.monotonic()
        model.set_state(ModelState.READY)
        self._observe_load(entry.id, time.perf_counter() - started, ok=True)
        log.info("model %s loaded in %.1f s (%d MiB)", entry.id,
                 time.perf_counter() - started, _mib(model.need))
        await self._trim(model)

    async def _trim(self, loaded: PooledModel) -> None:
        """A load that cost more than its estimate may leave the pool over budget: unload
        idle models (never waiting for busy ones) until it is not."""
        while self.used() > self.config.memory_budget:
            now = time.monotonic()
            victims = [m for m in self._models.values() if m is not loaded
                       and m.evictable(now, self.config.min_residency)]
            if not victims:
                log.warning("the loaded models take %d MiB, over the budget of %d MiB",
                            _mib(self.used()), _mib(self.config.memory_budget))
                return
            await self._unload(self._victim(victims, now), "evicted")

    async def _make_room(self, model: PooledModel) -> None:
        """Unload idle models, the least in demand first (`_victim`), until `model` fits; wait for
        busy ones up to `fit_wait`, then refuse (503: nothing is wrong with the model).

        Loads waiting for room get it in the order they began: only the oldest evicts,
        and a later one fits only beside what the earlier ones still need. Before, any
        waiter (or a load just begun) took the room as soon as it saw some, and with ten
        models on three models' memory one load starved behind newer ones until its
        requests got 503s (bench/pool.py: loads waited 22-29 s while newer ones took 2 s)."""
        deadline = time.monotonic() + self.config.fit_wait
        self._room_line.append(model)
        try:
            while not self._fits(model):
                if not model.waiters:
                    raise EngineUnavailable(f"Nobody waits for '{model.entry.id}' any more.",
                                            retry_after=self.config.retry_after)
                woken = self._room.waiter()
                now = time.monotonic()
                victims = [m for m in self._models.values() if m is not model
                           and m.evictable(now, self.config.min_residency)]
                if victims and self._room_line[0] is model:
                    await self._unload(self._victim(victims, now), "evicted")
                    continue
                if now >= deadline:
                    raise EngineUnavailable(
                        f"The model '{model.entry.id}' does not fit in memory beside the "
                        "models busy now; retry shortly.", retry_after=self.config.retry_after)
                await self._room.wait(woken, min(deadline - now, self._recheck_in(now)))
            model.reserved = True  # no await since the check: two loads cannot both fit
        finally:
            self._room_line.remove(model)
            self.wake()  # the next in line may fit now, or be the one to evict

    def _victim(self, idle: list[PooledModel], now: float) -> PooledModel:
        """The idle model to unload: the least in demand, the least recently used among
        equals. By recency alone, the hottest model was evicted whenever its line
        emptied for a moment: under overload (bench/pool.py at 8 requests/s) a model
        taking 40% of the requests was unloaded for one asked once, and its next
        requests waited 12 s for its reload behind six other loads."""
        half_life = self.config.demand_half_life
        return min(idle, key=lambda m: (m.demand(now, half_life), m.last_used))

    def _fits(self, model: PooledModel) -> bool:
        """Whether `model` fits beside the loaded models, the loads ahead of it and the
        memory the process holds beyond what they are counted for (`unaccounted`); with
        no model resident it fits if it fits the budget alone, since unloading could free
        nothing more."""
        ahead = self._room_line[: self._room_line.index(model)]
        used = self.used() + sum(m.need for m in ahead)
        held = used + self.unaccounted() if used else 0
        return held + model.need <= self.config.memory_budget

    def unaccounted(self) -> int:
        """Bytes this process has grown by since the pool began beyond what its resident
        models are counted for: memory the allocator kept after unloads, parked sequences'
        KV copies, buffers a model touched after its load. Counted against the budget, so
        the budget bounds the process's growth, not only the models' estimates."""
        now = self._memory()
        if now is None or self._base is None:
            return 0
        return max(0, now - self._base - self.used())

    def _recheck_in(self, now: float) -> float:
        """Seconds until an idle model's minimum residency ends (nothing wakes a waiting
        load then), at most `tick`."""
        ends = [m.loaded_at + self.config.min_residency - now for m in self._models.values()
                if m.state is ModelState.READY and m.in_flight == 0 and not m.waiters
                and now - m.loaded_at < self.config.min_residency]
        return max(0.001, min([self.config.tick, *ends]))

    def used(self) -> int:
        return sum(m.need for m in self._models.values() if m.holds_memory)

    async def load(self, name: str) -> PooledModel:
        """An admin's load: also a failed model tries again."""
        model = await self._existing(name)
        if model.state is ModelState.FAILED:
            model.set_state(ModelState.UNLOADED)
        await self.ensure(model)
        return model

    async def unload(self, name: str, reason: str = "admin") -> PooledModel:
        """Unload now: new requests wait for the next load, running ones finish first."""
        model = await self._existing(name)
        if model.state is ModelState.LOADING and model._loading is not None:
            await asyncio.wait([model._loading])
        if model.state in (ModelState.READY, ModelState.DRAINING):
            await self._unload(model, reason)
        return model

    async def _unload(self, model: PooledModel, reason: str) -> None:
        if model.fixed or model.state is not ModelState.READY:
            return
        model.set_state(ModelState.DRAINING)
        while model.busy:
            await self._room.wait(self._room.waiter(), self.config.tick)
        async with self._memory_lock:  # not during a load: each would measure the other
            before = self._memory()
            try:
                await self._close_engine(model)
            except Exception:
                log.exception("closing model %s failed", model.entry.id)
            await asyncio.to_thread(return_freed_memory)
            after = self._memory()
        # what unloading freed is what the model held, buffers it touched since included,
        # and what it is counted for from now on, if less than its estimate (SmolLM2 at
        # 4 x 512 tokens: estimated 205 MiB, freed ~160): an under-read is not lost, as
        # the process's growth beyond the counts is counted too (`unaccounted`)
        if model.measured and before is not None and after is not None:
            model.need = max(before - after, 1)
        model.set_state(ModelState.UNLOADED)
        log.info("model %s unloaded (%s)", model.entry.id, reason)
        if self.observer is not None:
            self.observer.model_unloaded(model.entry.id, reason)

    def wake(self) -> None:
        self._room.wake()

    # -- keeping watch -------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Re-read the catalog: changed entries take effect (pinning and keep_alive at
        once, a new source or options at the next load, and a failed model may try again),
        removed ones are unloaded."""
        if self._catalog is None:
            return
        entries = await self._catalog.entries()
        self._entries = {n: e for e in entries for n in e.names}
        by_id = {e.id: e for e in entries}
        for model in list(self._models.values()):
            if model.fixed:
                continue
            entry = by_id.get(model.entry.id)
            if entry is None:
                self._models.pop(model.entry.id)
                self._spawn(self._unload(model, "removed"))
            elif entry != model.entry:
                self._update(model, entry)

    def _update(self, model: PooledModel, entry: CatalogEntry) -> None:
        if (entry.source, entry.options, entry.engine) != (
                model.entry.source, model.entry.options, model.entry.engine):
            model.measured = False
            if model.state is ModelState.FAILED:
                model.set_state(ModelState.UNLOADED)
        model.entry = entry

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.config.tick)
            try:
                await self.refresh()
            except SQLAlchemyError as exc:
                log.debug("catalog not re-read: %s", type(exc).__name__)
            self._expire_idle()
            for entry in self._unique_entries():
                model = self._models.get(entry.id)
                if entry.pinned and (model is None or model.state is ModelState.UNLOADED):
                    self._spawn(self._preload(entry))

    def _expire_idle(self) -> None:
        now = time.monotonic()
        for model in list(self._models.values()):
            if (model.state is ModelState.READY and not model.busy and not model.waiters
                    and not model.entry.pinned and not model.fixed
                    and now - model.last_used >= model.keep_alive):
                self._spawn(self._unload(model, "keep_alive"))

    # -- views ------------------------------------------------------------------------------

    def views(self) -> list[ModelView]:
        """Every model of the catalog (as last read) and of the caller's engines."""
        now = time.monotonic()
        for entry in self._unique_entries():
            self._model_for(entry)
        return [m.view(now) for m in sorted(self._models.values(), key=lambda m: m.model_id)]

    def described(self) -> list[tuple[CatalogEntry, ModelView]]:
        """Each model's catalog entry beside its view."""
        now = time.monotonic()
        self.views()
        return [(m.entry, m.view(now)) for m in sorted(self._models.values(),
                                                        key=lambda m: m.model_id)]

    def get(self, name: str) -> Engine:
        """The engine of a loaded model (for admin routes that act on a running engine)."""
        model = self._models.get(name)
        if model is None or model.engine is None or not model.state.resident:
            raise UnknownModel(name)
        return model.engine

    def items(self) -> list[tuple[str, Engine]]:
        """The loaded models' engines, by id."""
        return [(mid, m.engine) for mid, m in sorted(self._models.items())
                if m.engine is not None and m.state.resident]

    # -- helpers ----------------------------------------------------------------------------

    def _unique_entries(self) -> list[CatalogEntry]:
        fixed = [m.entry for m in self._models.values() if m.fixed]
        return fixed + sorted({e.id: e for e in self._entries.values()}.values(),
                              key=lambda e: e.id)

    def _model_for(self, entry: CatalogEntry) -> PooledModel:
        model = self._models.get(entry.id)
        if model is None:
            model = self._models[entry.id] = PooledModel(self, entry)
        elif entry != model.entry and not model.fixed:
            self._update(model, entry)
        return model

    async def _existing(self, name: str) -> PooledModel:
        entry = await self.find(name)
        if entry is None:
            raise UnknownModel(name)
        return self._model_for(entry)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _observe_load(self, model: str, seconds: float, ok: bool) -> None:
        if self.observer is not None:
            self.observer.model_loaded(model, seconds, ok)


async def _quietly_close(engine: Engine) -> None:
    """Free what a failed start allocated; its own error is the one worth reporting."""
    try:
        await engine.close()
    except Exception:
        log.debug("closing an engine that failed to start also failed", exc_info=True)


def _mib(n: int) -> int:
    return n >> 20


def _retrieved(task: asyncio.Task[None]) -> None:
    """Mark a load's failure as seen: whoever waited for it has it already, or left."""
    if not task.cancelled():
        task.exception()
