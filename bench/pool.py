"""Many models on one machine: aicloud's pool against an Ollama-style policy and a
one-model-at-a-time policy (llama-swap style), run by this same bench on the same models.

Ten catalog models (the bundled SmolLM2 under ten ids), a heavy-tailed load (Poisson
arrivals, each request's model drawn from a Zipf law, so most requests go to one or two
models), and memory for about three of them. Each policy runs in its own process (so
its resident memory is its own) on the same request schedule, with the same engine and
layout; only what decides loads, evictions and decode threads differs:

- aicloud: `models.pool.ModelPool` as the server runs it (budget from the GGUF estimate,
  measured after each load; LRU eviction of idle models; minimum residency; one thread
  budget shared by every loaded model).
- ollama: load on request, keep_alive 5 min, at most 3 loaded (LRU among idle ones, a load
  waits for one to go idle), each model decoding with its own threads.
- swap: one model loaded at a time; a request for another waits for the running requests
  to finish, then the model is swapped.

A request is good if it finished within `--deadline` seconds of its arrival; goodput is
good requests per second of the run. A request a policy refuses (503) counts as refused,
not lost; lost requests are those that failed otherwise.

    python bench/pool.py                                # 10 models, 300 requests, 3 in memory
    python bench/pool.py --requests 40 --rate 1 --policies aicloud ollama   # a quick check
    python bench/pool.py --policies aicloud aicloud-own-threads   # what the shared threads do
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aicloud.engines.base import (
    ChatMessage,
    Engine,
    EngineUnavailable,
    FinishReason,
    GenerationRequest,
    SamplingParams,
)
from aicloud.engines.llamacpp.engine import LlamaCppEngine
from aicloud.engines.llamacpp.model import ContextConfig, default_threads
from aicloud.engines.llamacpp.threads import ThreadBudget
from aicloud.models.catalog import CatalogEntry, EngineKind, bundled_model
from aicloud.models.engines import EngineKinds
from aicloud.models.memory import llamacpp_need, resident_bytes
from aicloud.models.pool import ModelPool, ModelState, PoolConfig
from aicloud.scheduling.admission import Admitter
from aicloud.scheduling.fair_queue import FairQueue

TOPICS = ["the sea", "a library", "winter", "a bridge", "coffee", "the moon", "a garden",
          "trains", "a market", "rain"]


@dataclass(slots=True)
class Args:
    models: int
    requests: int
    rate: float
    zipf: float
    budget_models: float
    max_tokens: int
    deadline: float
    context: int
    sequences: int
    seed: int
    trace: str | None = None


@dataclass(slots=True)
class Outcome:
    model: int
    arrival: float
    cold: bool  # its model was not loaded when it arrived
    ttft: float | None = None
    done: float | None = None  # seconds from arrival to the last token
    refused: bool = False
    error: str | None = None
    # seconds from arrival to each stage (for --trace): the model leased (loaded), the
    # prompt tokenized, the request handed to the engine by the admission layer
    leased: float | None = None
    encoded: float | None = None
    admitted: float | None = None
    refusal: str | None = None


@dataclass(slots=True)
class Result:
    policy: str
    outcomes: list[Outcome] = field(default_factory=list)
    wall: float = 0.0
    budget: int = 0
    peak_memory: int = 0  # resident bytes above the process's start, sampled
    peak_counted: int = 0  # what the policy itself counted for its loaded models, sampled
    loads: int = 0

    def summary(self, deadline: float) -> dict[str, Any]:
        served = [o for o in self.outcomes if o.done is not None]
        good = [o for o in served if (o.done or 0) <= deadline]
        ttft = sorted(o.ttft for o in served if o.ttft is not None)
        cold = sorted(o.ttft for o in served if o.cold and o.ttft is not None)
        return {
            "policy": self.policy, "requests": len(self.outcomes), "served": len(served),
            "refused_503": sum(o.refused for o in self.outcomes),
            "lost": sum(o.error is not None for o in self.outcomes),
            "goodput_rps": round(len(good) / self.wall, 3) if self.wall else 0.0,
            "good": len(good),
            "ttft_p50": _pct(ttft, 50), "ttft_p99": _pct(ttft, 99),
            "cold_ttft_p50": _pct(cold, 50), "cold_requests": len(cold),
            "loads": self.loads, "budget_mib": self.budget >> 20,
            "peak_mib": self.peak_memory >> 20, "counted_mib": self.peak_counted >> 20,
            "wall_s": round(self.wall, 1)}


def _pct(values: list[float], p: int) -> float | None:
    if not values:
        return None
    return round(values[min(len(values) - 1, int(len(values) * p / 100))], 3)


def schedule(args: Args) -> list[tuple[float, int]]:
    """(arrival second, model index) for every request: the same for every policy."""
    rng = random.Random(args.seed)
    weights = [1 / (k + 1) ** args.zipf for k in range(args.models)]
    at, out = 0.0, []
    for _ in range(args.requests):
        at += rng.expovariate(args.rate)
        out.append((at, rng.choices(range(args.models), weights)[0]))
    return out


def layout(args: Args, threads: int) -> ContextConfig:
    return ContextConfig(sequences=args.sequences, context_per_sequence=args.context,
                         threads=threads)


def entry(k: int) -> CatalogEntry:
    return CatalogEntry(f"model-{k}", source=str(bundled_model().path))


def need(args: Args) -> int:
    return llamacpp_need(bundled_model().path, context=args.context,
                         sequences=args.sequences, kv_budget_mb=2048,
                         batch_tokens=512).total


# -- what --trace records --------------------------------------------------------------------


class Timing:
    """Besides each request's stages: every load and unload of an engine (when its start
    began, as seconds into the run, and how long it and its close took), when each request
    was handed to its engine, and how long decodes waited for the shared threads."""

    def __init__(self) -> None:
        self.origin = time.perf_counter()
        self.engines: list[dict[str, Any]] = []
        self.admitted: dict[str, float] = {}
        self.memory: list[tuple[float, int, int]] = []  # (second, resident, counted) MiB


class TimedEngine(LlamaCppEngine):
    def __init__(self, timing: Timing, model_id: str, config: ContextConfig,
                 threads_budget: ThreadBudget | None = None) -> None:
        super().__init__(model_id, bundled_model().path, config, threads_budget=threads_budget)
        self.timing = timing

    async def start(self) -> None:
        began = time.perf_counter()
        await super().start()
        self.timing.engines.append({"model": self.model_id, "at": began - self.timing.origin,
                                    "start_s": time.perf_counter() - began})

    async def close(self) -> None:
        began = time.perf_counter()
        await super().close()
        self.timing.engines.append({"model": self.model_id, "at": began - self.timing.origin,
                                    "close_s": time.perf_counter() - began})

    async def generate(self, request: GenerationRequest) -> Any:
        self.timing.admitted[request.request_id] = time.perf_counter()
        return await super().generate(request)


class TimedBudget(ThreadBudget):
    """The shared decode threads, with the time callers waited for them summed."""

    def __init__(self, total: int) -> None:
        super().__init__(total)
        self.waited = 0.0
        self.takes = 0
        self._sum = threading.Lock()

    def take(self, wanted: int, *, exact: bool = False, rows: int = 1) -> int:
        began = time.perf_counter()
        got = super().take(wanted, exact=exact, rows=rows)
        with self._sum:
            self.waited += time.perf_counter() - began
            self.takes += 1
        return got


# -- the policies: each gives a loaded engine for a request, for as long as it runs ----------


class Catalog:
    """The ten entries, in memory (the pool reads a catalog through `entries`/`find`)."""

    def __init__(self, entries: list[CatalogEntry]) -> None:
        self.by_id = {e.id: e for e in entries}

    async def entries(self) -> list[CatalogEntry]:
        return list(self.by_id.values())

    async def find(self, name: str) -> CatalogEntry | None:
        return self.by_id.get(name)


class Counting:
    """A PoolObserver that counts loads."""

    def __init__(self) -> None:
        self.loads = 0

    def model_loaded(self, model: str, seconds: float, ok: bool) -> None:
        self.loads += 1

    def model_unloaded(self, model: str, reason: str) -> None:
        pass


class AicloudPolicy:
    """`shared_threads=False` (policy `aicloud-own-threads`): the same pool, each engine
    decoding with its own threads as the other policies do, to tell what the shared
    thread budget costs or saves on a given machine."""

    def __init__(self, args: Args, shared_threads: bool = True) -> None:
        cores = default_threads()
        self.timing = Timing()
        self.threads = TimedBudget(cores) if shared_threads else None
        kinds = EngineKinds(
            {EngineKind.LLAMACPP: lambda e: Admitter(TimedEngine(
                self.timing, e.id, layout(args, cores), self.threads), FairQueue())},
            {EngineKind.LLAMACPP: lambda e: need(args)})
        self.budget = int(args.budget_models * need(args))
        self.pool = ModelPool(kinds=kinds, config=PoolConfig(memory_budget=self.budget))
        self.counting = Counting()
        self.pool.observer = self.counting
        self.catalog = Catalog([entry(k) for k in range(args.models)])

    async def start(self) -> None:
        await self.pool.start(self.catalog)

    def loaded(self, model_id: str) -> bool:
        return any(v.id == model_id and v.state is ModelState.READY for v in self.pool.views())

    @asynccontextmanager
    async def engine(self, model_id: str, deadline: float) -> AsyncIterator[Engine]:
        lease = await self.pool.lease(model_id, "bench", deadline=deadline)
        try:
            yield lease.model
        finally:
            lease.release()

    def loads(self) -> int:
        return self.counting.loads

    def counted(self) -> int:
        return self.pool.used()

    async def close(self) -> None:
        await self.pool.close()


class SimplePolicy:
    """Ollama-style (`capacity` 3, keep_alive 5 min: loads on request, evicts the least
    recently used idle model, a load waits for one to go idle) or swap (`capacity` 1:
    requests are served in arrival order, so one for another model stops the loaded one
    from taking more until it can be swapped). One load at a time; each engine decodes
    with every core."""

    def __init__(self, args: Args, capacity: int) -> None:
        self.args, self.capacity = args, capacity
        self.budget = int(capacity * need(args))
        self.engines: OrderedDict[str, TimedEngine] = OrderedDict()  # LRU first
        self.loading: set[str] = set()
        self.busy: dict[str, int] = {}
        self.last_used: dict[str, float] = {}
        self.waiting = 0  # requests waiting for a load
        self.changed = asyncio.Condition()
        self.load_lock = asyncio.Lock()
        self.load_count = 0
        self.timing = Timing()
        self.threads: TimedBudget | None = None  # each engine decodes with its own
        self.reaper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.reaper = asyncio.ensure_future(self._keep_alive())

    def loaded(self, model_id: str) -> bool:
        return model_id in self.engines

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(1)
            async with self.changed:
                for mid in [m for m, t in self.last_used.items() if m in self.engines
                            and not self.busy.get(m) and time.monotonic() - t > 300]:
                    await self.engines.pop(mid).close()

    def _take(self, model_id: str) -> TimedEngine:
        self.engines.move_to_end(model_id)
        self.busy[model_id] = self.busy.get(model_id, 0) + 1
        return self.engines[model_id]

    async def _ready(self, model_id: str) -> TimedEngine:
        async with self.changed:
            if model_id in self.engines and not (self.capacity == 1 and self.waiting):
                return self._take(model_id)
            self.waiting += 1
            try:
                while True:
                    if model_id in self.engines:
                        return self._take(model_id)
                    if model_id not in self.loading:
                        if len(self.engines) + len(self.loading) < self.capacity:
                            break
                        idle = [m for m in self.engines if not self.busy.get(m)]
                        if idle:
                            await self.engines.pop(idle[0]).close()
                            continue
                    await self.changed.wait()
                self.loading.add(model_id)
            finally:
                self.waiting -= 1
        try:
            async with self.load_lock:
                engine = TimedEngine(self.timing, model_id,
                                     layout(self.args, default_threads()))
                await engine.start()
                self.load_count += 1
        finally:
            async with self.changed:
                self.loading.discard(model_id)
                self.changed.notify_all()
        async with self.changed:
            self.engines[model_id] = engine
            self.changed.notify_all()
            return self._take(model_id)

    @asynccontextmanager
    async def engine(self, model_id: str, deadline: float) -> AsyncIterator[Engine]:
        engine = await self._ready(model_id)  # as Ollama: no deadline
        try:
            yield engine
        finally:
            async with self.changed:
                self.busy[model_id] -= 1
                self.last_used[model_id] = time.monotonic()
                self.changed.notify_all()

    def loads(self) -> int:
        return self.load_count

    def counted(self) -> int:
        return len(self.engines) * need(self.args)

    async def close(self) -> None:
        if self.reaper is not None:
            self.reaper.cancel()
        for engine in self.engines.values():
            await engine.close()


# -- the run ---------------------------------------------------------------------------------


async def one(policy: Any, k: int, arrival: float, start: float, args: Args,
              outcome: Outcome) -> None:
    await asyncio.sleep(max(0.0, start + arrival - time.perf_counter()))
    model_id = entry(k).id
    outcome.cold = not policy.loaded(model_id)
    began, deadline = time.perf_counter(), time.monotonic() + args.deadline
    request_id = f"r{arrival}"
    try:
        async with policy.engine(model_id, deadline) as engine:
            outcome.leased = time.perf_counter() - began
            tokens = await engine.encode_chat(
                [ChatMessage("user", f"Write one sentence about {TOPICS[k % len(TOPICS)]}.")])
            outcome.encoded = time.perf_counter() - began
            # every policy is told the client's deadline; only an admission layer uses it
            request = GenerationRequest(request_id, tokens, SamplingParams(temperature=0),
                                        args.max_tokens, tenant=f"t{k}", deadline=deadline)
            async for event in await engine.generate(request):
                if outcome.ttft is None and event.completion_tokens:
                    outcome.ttft = time.perf_counter() - began
                if event.finish_reason is not None and event.finish_reason.refused:
                    raise EngineUnavailable(f"shed: {event.finish_reason.value}",
                                            retry_after=1)
                if event.finish_reason is FinishReason.ERROR:
                    raise RuntimeError("the generation failed")
            outcome.done = time.perf_counter() - began
        handed = policy.timing.admitted.get(request_id)
        outcome.admitted = None if handed is None else handed - began
    except EngineUnavailable as exc:
        outcome.refused = True
        outcome.refusal = f"after {time.perf_counter() - began:.1f} s: {exc.message}"
    except Exception as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"


async def run_policy(name: str, args: Args) -> Result:
    policy: Any
    if name in ("aicloud", "aicloud-own-threads"):
        policy = AicloudPolicy(args, shared_threads=name == "aicloud")
    else:
        policy = SimplePolicy(args, 3 if name == "ollama" else 1)
    base = resident_bytes() or 0
    result = Result(name, budget=policy.budget)
    stop = asyncio.Event()

    async def sample() -> None:
        ticks = 0
        while not stop.is_set():
            grown, counted = (resident_bytes() or 0) - base, policy.counted()
            result.peak_memory = max(result.peak_memory, grown)
            result.peak_counted = max(result.peak_counted, counted)
            if ticks % 5 == 0:
                policy.timing.memory.append((round(time.perf_counter() - policy.timing.origin,
                                                   2), grown >> 20, counted >> 20))
            ticks += 1
            await asyncio.sleep(0.05)

    await policy.start()
    sampler = asyncio.ensure_future(sample())
    plan = schedule(args)
    result.outcomes = [Outcome(k, at, False) for at, k in plan]
    start = policy.timing.origin = time.perf_counter()
    await asyncio.gather(*(one(policy, k, at, start, args, o)
                           for (at, k), o in zip(plan, result.outcomes, strict=True)))
    result.wall = time.perf_counter() - start
    result.loads = policy.loads()
    stop.set()
    await sampler
    await policy.close()
    if args.trace:
        write_trace(f"{args.trace}.{name}.json", result, policy)
    return result


def write_trace(path: str, result: Result, policy: Any) -> None:
    """Every request's stages, every engine start and close, the memory samples."""
    threads = policy.threads
    with open(path, "w") as fh:
        json.dump({"policy": result.policy,
                   "requests": [dataclasses.asdict(o) for o in result.outcomes],
                   "engines": policy.timing.engines, "memory": policy.timing.memory,
                   "thread_wait_s": None if threads is None else round(threads.waited, 3),
                   "thread_takes": None if threads is None else threads.takes}, fh)


def child(name: str, args: Args) -> None:
    result = asyncio.run(run_policy(name, args))
    print(json.dumps(result.summary(args.deadline)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", nargs="+", default=["aicloud", "ollama", "swap"])
    parser.add_argument("--models", type=int, default=10)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rate", type=float, default=2.0, help="requests per second")
    parser.add_argument("--zipf", type=float, default=1.2)
    parser.add_argument("--budget-models", type=float, default=3.5,
                        help="aicloud's memory budget, in models' estimated needs")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--deadline", type=float, default=5.0)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--sequences", type=int, default=4)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--trace", help="write each policy's requests' stages, loads and "
                        "memory samples to TRACE.<policy>.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    args = Args(ns.models, ns.requests, ns.rate, ns.zipf, ns.budget_models, ns.max_tokens,
                ns.deadline, ns.context, ns.sequences, ns.seed, ns.trace)
    if ns.child:
        child(ns.child, args)
        return
    rows = []
    for name in ns.policies:
        out = subprocess.run([sys.executable, __file__, "--child", name,
                              *sys.argv[1:]], capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(f"{name} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    keys = list(rows[0]) if rows else []
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    print(f"\n{args.requests} requests at {args.rate}/s over {args.models} models, Zipf "
          f"{args.zipf}, deadline {args.deadline} s, {args.max_tokens} tokens each; "
          f"{default_threads()} cores")


if __name__ == "__main__":
    main()

