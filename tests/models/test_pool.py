"""The pool's decisions (one load per model, LRU eviction within the budget, pinning,
minimum residency, keep_alive, failures) with stand-in engines whose loads and requests
the test controls, over a real catalog in SQLite. The same behaviours with the real
engine, through a live server, are in tests/e2e/test_pool.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from aicloud.engines.base import (
    EngineError,
    EngineInfo,
    EngineStats,
    EngineUnavailable,
    FinishReason,
    GenerationRequest,
    TokenEvent,
    Usage,
)
from aicloud.models.catalog import Catalog, CatalogEntry
from aicloud.models.engines import EngineKinds
from aicloud.models.pool import ModelPool, ModelState, PoolConfig, UnknownModel
from aicloud.scheduling.admission import Admitter
from aicloud.store import db, migrate

MB = 1 << 20


class Stream:
    """A sequence the test ends by calling `finish`."""

    def __init__(self) -> None:
        self._final: asyncio.Future[TokenEvent] = asyncio.get_running_loop().create_future()

    def finish(self) -> None:
        if not self._final.done():
            self._final.set_result(TokenEvent("", 1, FinishReason.STOP, Usage(1, 1)))

    def cancel(self) -> None:
        self.finish()

    async def final(self) -> TokenEvent:
        return await asyncio.shield(self._final)

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        yield await self.final()


class StandIn:
    """An engine whose start waits for `gate` (when set) and fails for `bad` models."""

    def __init__(self, entry: CatalogEntry, world: World) -> None:
        self.entry, self.world = entry, world
        self.closed = self.loaded = False

    async def start(self) -> None:
        self.world.starts.append(self.entry.id)
        if self.world.gate is not None:
            await self.world.gate.wait()
        if self.entry.options.get("bad"):
            raise EngineError("not a model")
        self.world.resident += self.size
        self.loaded = True

    async def close(self) -> None:
        if self.loaded:
            self.world.resident -= self.size
        self.loaded, self.closed = False, True
        self.world.closes.append(self.entry.id)

    @property
    def size(self) -> int:
        """What the load really takes: the catalog's `size_mb` (the estimate) unless the
        entry says `real_mb`."""
        return int(self.entry.options.get("real_mb", self.entry.options["size_mb"])) * MB

    async def encode_chat(self, messages: Any, tools: Any = None) -> list[int]:
        return [1, 2]

    async def encode_text(self, text: str) -> list[int]:
        return [1]

    async def generate(self, request: GenerationRequest) -> Stream:
        assert not self.closed, "a request ran on an unloaded engine"
        stream = Stream()
        self.world.streams.append(stream)
        return stream

    async def embed(self, request: Any) -> Any:
        raise EngineError("no")

    def info(self) -> EngineInfo:
        return EngineInfo(self.entry.id, 256, 2, "stand-in")

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 0.0, 0, 0)


class World:
    def __init__(self) -> None:
        self.starts: list[str] = []
        self.closes: list[str] = []
        self.streams: list[Stream] = []
        self.gate: asyncio.Event | None = None
        self.resident = 0  # bytes the loaded stand-ins take, as the pool measures them


def entry(model_id: str, size_mb: int = 100, **fields: Any) -> CatalogEntry:
    options = {"size_mb": size_mb, **fields.pop("options", {})}
    return CatalogEntry(model_id, source=f"/models/{model_id}.gguf", options=options, **fields)


Scenario = Callable[[ModelPool, Catalog, World], Awaitable[None]]


def run(tmp_path: Path, entries: list[CatalogEntry], scenario: Scenario,
        **config: Any) -> World:
    url = f"sqlite:///{tmp_path / 'pool.db'}"
    migrate.upgrade(url)
    world = World()
    admitted = config.pop("admitted", False)  # each stand-in behind an admission layer

    def build(e: CatalogEntry) -> Any:
        return Admitter(StandIn(e, world)) if admitted else StandIn(e, world)

    kinds = EngineKinds({e.engine: build for e in entries},
                        {e.engine: lambda e: e.options["size_mb"] * MB for e in entries})
    defaults: dict[str, Any] = {"memory_budget": 250 * MB, "min_residency": 0.0,
                                "fit_wait": 1.0, "tick": 0.05, "keep_alive": 60.0}

    async def go() -> None:
        database = db.create_engine_async(url)
        catalog = Catalog(db.session_factory(database))
        for e in entries:
            await catalog.add(e)
        pool = ModelPool(kinds=kinds, config=PoolConfig(**{**defaults, **config}),
                         memory=lambda: world.resident)
        await pool.start(catalog)
        try:
            await scenario(pool, catalog, world)
        finally:
            await pool.close()
            await database.dispose()

    asyncio.run(go())
    return world


async def use(pool: ModelPool, name: str, keep_alive: float | None = None) -> Stream:
    """One request that stays running until the test finishes its stream."""
    lease = await pool.lease(name, "org_a", keep_alive=keep_alive)
    stream = await lease.model.generate(GenerationRequest("r", [1]))
    lease.release()  # the response is sent; the stream still counts until it ends
    assert isinstance(stream, Stream)
    return stream


async def call(pool: ModelPool, name: str, keep_alive: float | None = None) -> None:
    """One request, finished at once."""
    (await use(pool, name, keep_alive)).finish()
    await asyncio.sleep(0)


async def until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition never held")


def states(pool: ModelPool) -> dict[str, str]:
    return {v.id: v.state.value for v in pool.views()}


def test_concurrent_first_requests_trigger_one_load(tmp_path: Path) -> None:
    async def scenario(pool: ModelPool, catalog: Catalog, world: World) -> None:
        world.gate = asyncio.Event()
        waiting = [asyncio.ensure_future(use(pool, "a")) for _ in range(8)]
        await until(lambda: bool(world.starts))
        await asyncio.sleep(0.05)
        assert states(pool)["a"] == "loading" and not any(w.done() for w in waiting)
        world.gate.set()
        streams = await asyncio.gather(*waiting)
        assert world.starts == ["a"]
        assert states(pool)["a"] == "ready"
        assert pool.views()[0].in_flight == 8  # the eight streams
        for s in streams:
            s.finish()

    run(tmp_path, [entry("a")], scenario)


def test_least_recently_used_idle_model_is_evicted_for_room(tmp_path: Path) -> None:
    async def scenario(pool: ModelPool, catalog: Catalog, world: World) -> None:
        await call(pool, "a")
        await call(pool, "b")
        await call(pool, "a")  # b is now the least recently used
        await call(pool, "c")  # 3 x 100 MB > 250 MB: one must go
        assert states(pool) == {"a": "ready", "b": "unloaded", "c": "ready"}
        assert world.closes == ["b"]
        assert pool.used() <= 250 * MB

    run(tmp_path, [entry("a"), entry("b"), entry("c")], scenario)


def test_the_model_most_in_demand_is_kept_though_used_less_recently(tmp_path: Path) -> None:
    """By recency alone the hot model went whenever its line emptied for a moment (under
    overload, a model with 40% of the requests was evicted for one asked once)."""
    async def scenario(pool: ModelPool, catalog: Catalog, world: World) -> None:
        for _ in range(5):
            await call(pool, "hot")
        await call(pool, "b")  # the most recent, asked once
        await call(pool, "c")  # one must go: b, not the hot one
        assert states(pool) == {"hot": "ready", "b": "unloaded", "c": "ready"}
        assert world.closes == ["b"]

    run(tmp_path, [entry("hot"), entry("b"), entry("c")], scenario)


def test_pinned_model_is_never_evicted(tmp_path: Path) -> None:
    async def scenario(pool: ModelPool, catalog: Catalog, world: World) -> None:
        assert states(pool)["p"] == "ready"  # pinned: loaded at start
        await call(pool, "a")
        await call(pool, "b")  # p is the oldest, but pinned: a goes
        assert states(pool) == {"a": "unloaded", "b": "ready", "p": "ready"}
        await call(pool, "a")
        assert states(pool) == {"a": "ready", "b": "unloaded", "p": "ready"}
        assert "p" not in world.closes

    run(tmp_path, [entry("p", pinned=True), entry("a"), entry("b")], scenario)


def test_a_model_with_work_in_flight_is_not_evicted_and_the_load_gets_a_503(
        tmp_path: Path) -> None:
    async def scenario(pool: ModelPool, catalog: Catalog, world: World) -> None:
        running_a = await use(pool, "a")
        running_b = await use(pool, "b")
        with pytest.raises(EngineUnavailable) as refused:
            await use(pool, "c")  # nothing idle to evict within fit_wait
        assert refused.value.retry_after > 0
        assert states(pool) == {"a": "ready", "b": "ready", "c": "unloaded"}
        assert world.closes == []
        # once a request ends, its model may go, and the next try loads
        waiting = asyncio.ensure_future(use(pool, "c"))
        await asyncio.sleep(0.05)
        running_a.finish()
        (await waiting).finish()
        assert states(pool) == {"a": "unloaded", "b": "ready", "c": "ready"}
        running_b.finish()

    run(tmp_path, [entry("a"), entry("b"), entry("c")], scenario)


def test_a_request_past_its_deadline_leaves_and_a_load_nobody_waits_for_is_given_up(
        tmp_path: Path) -> None:
    """Under overload, loads queued for room behind busy models were made for requests
    long gone, each evicting a model others used."""
    async def scenario(pool: ModelPool, catalog: Catalog, world: World) -> None:
        running = [await use(pool, "a"), await use(pool, "b")]
        began = time.monotonic()
        with pytest.raises(EngineUnavailable) as refused:
            await pool.lease("c", "org_a", deadline=began + 0.2)
        assert time.monotonic() - began < 1.0 and refused.value.retry_after > 0
        await until(lambda: states(pool)["c"] == "unloaded")
        for stream in running:
            stream.finish()
        await asyncio.sleep(0.2)
        assert world.starts == ["a", "b"] and world.closes == []
        await call(pool, "c")  # a caller with time to wait still gets its load

    run(tmp_path, [entry("a"), entry("b"), entry("c")], scenario, fit_wait=10.0)


def test_a_loaded_model_is_leased_whatever_the_deadline(tmp_path: Path) -> None:
    """asyncio.wait_for with no time left (Python 3.11) times out before the wait even
    starts: a loaded model was refused as "could not be loaded", so a request whose
    deadline was lost never reached the admission layer that sheds it with its 503."""
    async def scenario(pool: ModelPool, catalog: Catalog, world: World) -> None:
        await call(pool, "a")
        lease = await pool.lease("a", "org_a", deadline=time.monotonic() - 1.0)
        lease.release()

    run(tmp_path, [entry("a")], scenario)


def test_a_reloaded_model_starts_with_the_service_time_its_last_load_measured(
        tmp_path: Path) -> None:
    """Without it, a reload's first requests started however near their deadline."""
    async def scenario(pool: ModelPool, catalog: Catalog, world: World) -> None:
        lease = await pool.lease("a", "org_a")
        first = lease.model.engine
        assert isinstance(first, Admitter) and first.service is None
        first.service = 1.5  # as its finished generations would have measured
        lease.release()
        await pool.unload("a")
        lease = await pool.lease("a", "org_a")
        again = lease.model.engine
        assert isinstance(again, Admitter) and again is not first and again.service == 1.5
        lease.release()

    run(tmp_path, [entry("a")], scenario, admitted=True)


def test_minimum_residency_keeps_a_fresh_model_from_being_evicted(tmp_path: Path) -> None:
    async def scenario(pool: ModelPool, catalog: Catalog, world: World) -> None:
        await call(pool, "a")
        await call(pool, "b")
        with pytest.raises(EngineUnavailable):
            await call(pool, "c")  # a and b are idle but loaded under a second ago
        assert world.closes == []

    run(tmp_path, [entry("a"), entry("b"), entry("c")], scenario, min_residency=5.0)


def test_keep_alive_unloads_idle_models_per_model_and_per_request(tmp_path: Path) -> None:
    async def scenario(pool: ModelPool, catalog: Catalog, world: World) -> None:
        await call(pool, "short")
        await call(pool, "default")
        await call(pool, "asked", keep_alive=0.1)
        await asyncio.sleep(0.5)
        assert states(pool) == {"asked": "unloaded", "default": "ready", "short": "unloaded"}
        # a running request keeps its model however short its keep_alive
        running = await use(pool, "short", keep_alive=0)
        await asyncio.sleep(0.3)
        assert states(pool)["short"] == "ready"
        running.finish()
        await asyncio.sleep(0.3)
        assert states(pool)["short"] == "unloaded"

    run(tmp_path, [entry("short", keep_alive=0.1), entry("default"), entry("asked")],
        scenario, memory_budget=1000 * MB)


def test_request_keep_alive_is_capped_by_the_server(tmp_path: Path) -> None:
    async def scenario(pool: ModelPool, catalog: Catalog, world: World) -> None:
        await call(pool, "a", keep_alive=1e6)
        assert pool.views()[0].keep_alive == 0.2
        await asyncio.sleep(0.5)
        assert states(pool)["a"] == "unloaded"

    run(tmp_path, [entry("a")], scenario, max_keep_alive=0.2)


def test_a_failed_load_is_reported_and_the_others_keep_serving(tmp_path: Path) -> None:
    async def scenario(pool: ModelPool, catalog: Catalog, world: World) -> None:
        for _ in range(2):
            with pytest.raises(EngineUnavailable):
                await call(pool, "bad")
        assert world.starts.count("bad") == 1  # failed stays failed: no reload per request
        view = {v.id: v for v in pool.views()}["bad"]
        assert view.state is ModelState.FAILED and view.error == "not a model"
        with pytest.raises(EngineUnavailable):
            await call(pool, "huge")  # more than the whole budget: refused before loading
        huge = {v.id: v for v in pool.views()}["huge"]
        assert huge.state is ModelState.FAILED and "more than the whole memory budget" in (
            huge.error or "")
        assert "huge" not in world.starts
        await call(pool, "good")
        assert states(pool)["good"] == "ready"
        # a fixed entry loads again
        await catalog.update("bad", options={"size_mb": 100})
        await pool.refresh()
        await call(pool, "bad")
        assert states(pool)["bad"] == "ready"

    run(tmp_path, [entry("bad", options={"bad": True}), entry("huge", 10_000), entry("good")],
        scenario)


def test_removed_model_is_unloaded_and_unknown(tmp_path: Path) -> None:
    async def scenario(pool: ModelPool, catalog: Catalog, world: World) -> None:
        running = await use(pool, "a")
        await catalog.remove("a")
        await pool.refresh()
        assert await pool.find("a") is None
        assert world.closes == []  # its request still runs
        running.finish()
        await asyncio.sleep(0.2)
        assert world.closes == ["a"]

    run(tmp_path, [entry("a")], scenario)


def test_a_leased_model_stays_until_released_and_a_later_call_loads_it_again(
        tmp_path: Path) -> None:
    """A request's lease keeps its model between the request's steps: an admin's unload
    waits for it. A call on the model after it was unloaded loads it again instead of
    running on a closed engine."""
    async def scenario(pool: ModelPool, catalog: Catalog, world: World) -> None:
        lease = await pool.lease("a", "org_a", keep_alive=0)
        await asyncio.sleep(0.2)  # several ticks: keep_alive 0 does not unload it
        unloading = asyncio.ensure_future(pool.unload("a"))
        await asyncio.sleep(0.1)
        assert states(pool)["a"] == "draining" and not unloading.done()
        lease.release()
        await unloading
        assert states(pool)["a"] == "unloaded"
        stream = await lease.model.generate(GenerationRequest("r", [1]))
        assert world.starts == ["a", "a"] and states(pool)["a"] == "ready"
        stream.cancel()

    run(tmp_path, [entry("a")], scenario)


def test_a_request_counts_once_in_flight_and_its_generation_keeps_the_model_after_it(
        tmp_path: Path) -> None:
    """A request's lease and the generation run under it are one request in flight; a
    generation that outlives its request (the client left) still keeps the model, and a
    lease released twice counts down once."""
    async def scenario(pool: ModelPool, catalog: Catalog, world: World) -> None:
        lease = await pool.lease("a", "org_a")
        stream = await lease.model.generate(GenerationRequest("r", [1]))
        assert pool.views()[0].in_flight == 1
        lease.release()
        lease.release()
        assert pool.views()[0].in_flight == 1
        unloading = asyncio.ensure_future(pool.unload("a"))
        await until(lambda: states(pool)["a"] == "draining")
        assert not unloading.done()
        stream.finish()
        await unloading
        view = pool.views()[0]
        assert (view.state.value, view.in_flight) == ("unloaded", 0)

    run(tmp_path, [entry("a")], scenario)


def test_organizations_and_allow_lists_hide_models(tmp_path: Path) -> None:
    async def scenario(pool: ModelPool, catalog: Catalog, world: World) -> None:
        assert [c.id for c in await pool.cards("org_a")] == ["open", "theirs"]
        assert [c.id for c in await pool.cards("org_b")] == ["open"]
        assert [c.id for c in await pool.cards("org_a", lambda n: n == "o")] == ["open"]
        with pytest.raises(UnknownModel):
            await pool.lease("theirs", "org_b")
        lease = await pool.lease("o", "org_b")
        assert lease.model.entry.id == "open"
        lease.release()

    run(tmp_path, [entry("open", aliases=("o",)),
                   entry("theirs", organizations=("org_a",))], scenario)


def test_a_load_that_costs_more_than_its_estimate_counts_what_it_cost(tmp_path: Path) -> None:
    """`a` is estimated at 50 MB but takes 200: counted at 200, b's load evicts it."""
    async def scenario(pool: ModelPool, catalog: Catalog, world: World) -> None:
        await call(pool, "a")
        assert {v.id: (v.memory_bytes, v.measured) for v in pool.views()}["a"] == (
            200 * MB, True)
        await call(pool, "b")
        assert states(pool) == {"a": "unloaded", "b": "ready"}
        assert pool.used() <= 250 * MB

    run(tmp_path, [entry("a", 50, options={"real_mb": 200}), entry("b")], scenario)


def test_a_load_that_reads_lower_than_its_estimate_keeps_the_estimate(tmp_path: Path) -> None:
    """Right after a load, buffers llama.cpp reserved are not yet resident: a growth below
    the estimate does not lower the model's count (its unload measures the rest)."""
    async def scenario(pool: ModelPool, catalog: Catalog, world: World) -> None:
        await call(pool, "a")
        assert {v.id: v.memory_bytes for v in pool.views()}["a"] == 100 * MB

    run(tmp_path, [entry("a", 100, options={"real_mb": 40})], scenario)


def test_loads_waiting_for_room_do_not_block_each_other(tmp_path: Path) -> None:
    """With `a` busy, only one of b and c fits at a time: b loads, serves, and makes way
    for c. A load still waiting for room must not count against the other, or both would
    wait for each other until refused."""
    async def scenario(pool: ModelPool, catalog: Catalog, world: World) -> None:
        running = await use(pool, "a")
        await asyncio.gather(call(pool, "b"), call(pool, "c"))
        assert sorted(world.starts) == ["a", "b", "c"]
        running.finish()

    run(tmp_path, [entry("a"), entry("b"), entry("c")], scenario, fit_wait=5.0)


def test_loads_waiting_for_room_get_it_in_the_order_they_began(tmp_path: Path) -> None:
    """c waits for room behind two young models; d, asked for later, must not take the
    room c was waiting for (a load just begun used to evict before the waiters woke)."""
    async def scenario(pool: ModelPool, catalog: Catalog, world: World) -> None:
        await call(pool, "d")
        await pool.unload("d")  # measured now: its next load goes straight for room
        await call(pool, "a")
        await call(pool, "b")
        waiting_c = asyncio.ensure_future(call(pool, "c"))
        await until(lambda: states(pool)["c"] == "loading")
        await asyncio.sleep(0.4)  # a and b are now old enough to be evicted
        await asyncio.gather(waiting_c, call(pool, "d"))
        assert world.starts == ["d", "a", "b", "c", "d"]

    run(tmp_path, [entry("a"), entry("b"), entry("c"), entry("d")], scenario,
        min_residency=0.3, tick=0.5, fit_wait=30.0)


def test_a_load_waiting_for_room_evicts_once_the_minimum_residency_ends(
        tmp_path: Path) -> None:
    """Nothing happens when an idle model's minimum residency ends: the waiting load
    looks again at that moment, not only at its next tick (here longer than the wait)."""
    async def scenario(pool: ModelPool, catalog: Catalog, world: World) -> None:
        await call(pool, "a")
        await call(pool, "b")
        await asyncio.wait_for(call(pool, "c"), 5.0)
        assert states(pool) == {"a": "unloaded", "b": "ready", "c": "ready"}

    run(tmp_path, [entry("a"), entry("b"), entry("c")], scenario,
        min_residency=0.3, tick=60.0, fit_wait=60.0)


def test_a_reload_beside_an_unload_is_counted_at_what_the_model_takes(tmp_path: Path) -> None:
    """b's unload while a reloads must not make a's load read as free (its growth and b's
    freed memory cancel): a stays counted at 100 MB, not at the 1 byte a reload measured."""
    async def scenario(pool: ModelPool, catalog: Catalog, world: World) -> None:
        await call(pool, "a")
        await call(pool, "b")
        await pool.unload("a")
        world.gate = asyncio.Event()
        reloading = asyncio.ensure_future(call(pool, "a"))
        await until(lambda: world.starts.count("a") == 2)
        unloading = asyncio.ensure_future(pool.unload("b"))
        await asyncio.sleep(0.05)
        world.gate.set()
        await asyncio.gather(reloading, unloading)
        assert {v.id: v.memory_bytes for v in pool.views()} == {"a": 100 * MB, "b": 100 * MB}

    run(tmp_path, [entry("a"), entry("b")], scenario)


def test_memory_the_process_kept_beyond_its_models_counts_against_the_budget(
        tmp_path: Path) -> None:
    """100 MB the process holds beyond its loaded models (an allocator that kept what an
    unload freed) leaves room for one model, not two; with none loaded, a model that fits
    the budget still loads."""
    async def scenario(pool: ModelPool, catalog: Catalog, world: World) -> None:
        await call(pool, "a")
        world.resident += 100 * MB
        assert pool.unaccounted() == 100 * MB
        await call(pool, "b")
        assert states(pool) == {"a": "unloaded", "b": "ready", "c": "unloaded"}
        await pool.unload("b")
        world.resident += 100 * MB  # now 200 MB beyond: c alone exceeds the budget with it
        await call(pool, "c")
        assert states(pool)["c"] == "ready"

    run(tmp_path, [entry("a"), entry("b"), entry("c")], scenario)


def test_what_an_unload_freed_replaces_a_higher_estimate(tmp_path: Path) -> None:
    """Estimated at 100 MB, `a` takes 60: counted at 100 until its unload measures 60, and
    at 60 from then on (its next load's growth reads no more)."""
    async def scenario(pool: ModelPool, catalog: Catalog, world: World) -> None:
        await call(pool, "a")
        await pool.unload("a")
        assert {v.id: v.memory_bytes for v in pool.views()}["a"] == 60 * MB
        await call(pool, "a")
        assert {v.id: v.memory_bytes for v in pool.views()}["a"] == 60 * MB

    run(tmp_path, [entry("a", 100, options={"real_mb": 60})], scenario)
