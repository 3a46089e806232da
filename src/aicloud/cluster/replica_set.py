"""A model served by several Ray replicas, behind the one Engine protocol.

The admission layer in front (`scheduling.Admitter`) decides who goes next and hands over
no more requests than the ready replicas have slots, so its order (tenant-fair or first
come) holds across the whole cluster. What it hands over waits here, first come, only
until a replica has room (after a replica died, or raced with another). A replica that
dies takes only its running streams down (they end with an error event and the usage
produced so far); requests it had not started go back to the front of the line, and Ray
restarts the replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

from aicloud.cluster.connect import connect
from aicloud.cluster.replica import EngineReplica, ReplicaSpec, Whereabouts
from aicloud.cluster.router import Router, Slotted
from aicloud.cluster.stream import ClusterStream, Phase
from aicloud.engines.base import (
    EMBED,
    ChatMessage,
    EmbeddingRequest,
    Embeddings,
    EngineError,
    EngineInfo,
    EngineStats,
    EngineUnavailable,
    FinishReason,
    GenerationRequest,
    completion_limit,
    not_embedding,
)

log = logging.getLogger(__name__)

# how long a caller refused for want of a replica should wait: Ray restarts a dead actor
# at once, and loading the bundled model in it takes about a second
UNAVAILABLE_RETRY = 2.0


@dataclass(slots=True)
class Scaling:
    """Replicas between `minimum` and `maximum`: one more when every replica has been
    full (or a request has waited here) for `up_after` seconds, one fewer after
    `down_after` seconds with nothing to do. Requests wait in the admission layer, which
    hands over only what fits, so a set that stays full is one with requests waiting."""

    replicas: int = 1
    minimum: int = 1
    maximum: int = 1
    up_after: float = 2.0
    down_after: float = 60.0

    def __post_init__(self) -> None:
        self.minimum = max(1, min(self.minimum, self.replicas))
        self.maximum = max(self.maximum, self.replicas)


@dataclass(slots=True, eq=False)
class Replica(Slotted):
    handle: Any = None
    state: str = "starting"  # starting | ready | dead | draining
    where: Whereabouts | None = None
    served: int = 0
    stats: EngineStats | None = None


class ReplicaSet:
    kind = "ray"

    def __init__(self, spec: ReplicaSpec, scaling: Scaling, *, address: str = "auto",
                 tick: float = 1.0, max_wait: float = 60.0) -> None:
        self.model_id = spec.model_id
        self.address = address
        self.spec = spec
        self.scaling = scaling
        self.replicas: list[Replica] = []
        self.max_wait = max_wait  # a request handed over but never placed is refused then
        self._waiting: deque[ClusterStream] = deque()
        self._full_since: float | None = None
        self._router = Router()
        self._info: EngineInfo | None = None
        self._numbers = itertools.count()
        self._wake = asyncio.Event()
        self._finished = asyncio.Condition()  # notified whenever a request leaves a replica
        self._tasks: set[asyncio.Task[Any]] = set()
        self._tick = tick
        self._idle_since = time.monotonic()
        self._actor: Any = None
        self._instance = secrets.token_hex(3)  # several API servers may share a cluster

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        import ray

        await asyncio.to_thread(connect, self.address)
        self._actor = ray.remote(EngineReplica)
        await asyncio.gather(*(self._add_replica() for _ in range(self.scaling.replicas)))
        self._spawn(self._dispatch_forever())
        self._spawn(self._maintain_forever())

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for replica in list(self.replicas):
            self._kill(replica)
        self.replicas.clear()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _add_replica(self) -> Replica:
        index = next(self._numbers)
        handle = self._actor.options(
            name=f"aicloud:{self.model_id}:{self._instance}:{index}", namespace="aicloud",
            num_cpus=self.spec.num_cpus, num_gpus=self.spec.num_gpus,
            max_restarts=-1, max_task_retries=0, max_concurrency=1000,
        ).remote(self.spec.make_engine)
        replica = Replica(index=index, capacity=0, handle=handle)
        self.replicas.append(replica)
        try:
            await self._ready(replica)
        except Exception:
            self._kill(replica)
            self.replicas.remove(replica)
            raise
        return replica

    async def _ready(self, replica: Replica) -> None:
        info: EngineInfo = await replica.handle.start.remote()
        replica.where = await replica.handle.whereabouts.remote()
        replica.capacity = info.max_sequences
        replica.state, replica.alive = "ready", True
        self._info = self._info or info
        self._wake.set()
        log.info("replica %s:%d ready on node %s (pid %d)", self.model_id, replica.index,
                 replica.where.node_ip, replica.where.pid)

    def _kill(self, replica: Replica) -> None:
        import ray

        with contextlib.suppress(Exception):
            ray.kill(replica.handle, no_restart=True)

    # -- the Engine protocol ------------------------------------------------------------------

    def info(self) -> EngineInfo:
        if self._info is None:
            raise EngineUnavailable(f"model {self.model_id} is not running yet",
                                    retry_after=UNAVAILABLE_RETRY)
        total = sum(r.capacity for r in self.replicas if r.state == "ready")
        return EngineInfo(self.model_id, self._info.context_length, max(total, 1), self.kind,
                          self._info.capabilities, self._info.chat_template)

    async def encode_chat(self, messages: list[ChatMessage],
                          tools: list[dict[str, Any]] | None = None) -> list[int]:
        tokens: list[int] = await self._any_replica("encode_chat", messages, tools)
        return tokens

    async def encode_text(self, text: str) -> list[int]:
        tokens: list[int] = await self._any_replica("encode_text", text)
        return tokens

    async def _any_replica(self, method: str, *args: Any) -> Any:
        from ray.exceptions import RayActorError, RayTaskError

        ready = sorted((r for r in self.replicas if r.state == "ready"), key=lambda r: r.load)
        for replica in ready:
            try:
                return await getattr(replica.handle, method).remote(*args)
            except RayTaskError as exc:
                raise _cause(exc) from None
            except RayActorError:
                self._lost(replica)
        raise EngineUnavailable(f"no replica of {self.model_id} is available; retry shortly",
                                retry_after=UNAVAILABLE_RETRY)

    async def embed(self, request: EmbeddingRequest) -> Embeddings:
        """Straight to the least loaded replica, which batches it between its own steps;
        embeddings take no sequence slot, so they skip the slot queue."""
        if not self.info().can(EMBED):
            raise not_embedding(self.model_id)
        embeddings: Embeddings = await self._any_replica("embed", request)
        return embeddings

    async def generate(self, request: GenerationRequest) -> ClusterStream:
        self._check(request)
        stream = ClusterStream(request, self._cancel)
        self._enqueue(stream)
        return stream

    def _enqueue(self, stream: ClusterStream, *, first: bool = False) -> None:
        if first:
            self._waiting.appendleft(stream)
        else:
            self._waiting.append(stream)
        self._wake.set()

    def _check(self, request: GenerationRequest) -> None:
        """What can be refused before queueing: the replica checks the vocabulary."""
        completion_limit(request, self.info().context_length)

    def stats(self) -> EngineStats:
        live = [r.stats for r in self.replicas if r.stats is not None and r.alive]
        return EngineStats(
            running=sum(len(r.outstanding) for r in self.replicas),
            waiting=len(self._waiting) + sum(s.waiting for s in live),
            tokens_per_second=round(sum(s.tokens_per_second for s in live), 2),
            kv_cells_used=sum(s.kv_cells_used for s in live),
            kv_cells_total=sum(s.kv_cells_total for s in live),
        )

    def placement(self) -> dict[str, Any]:
        return {
            "replicas": [{
                "index": r.index, "state": r.state, "node_id": r.where and r.where.node_id,
                "node_ip": r.where and r.where.node_ip, "pid": r.where and r.where.pid,
                "running": len(r.outstanding), "outstanding_tokens": r.load,
                "capacity": r.capacity, "served": r.served,
            } for r in self.replicas],
            "waiting": len(self._waiting),
            "scaling": {"replicas": len(self.replicas), "min_replicas": self.scaling.minimum,
                        "max_replicas": self.scaling.maximum},
        }

    # -- dispatching ------------------------------------------------------------------------

    async def _dispatch_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._waiting and any(r.has_room for r in self.replicas):
                stream = self._waiting.popleft()
                replica = self._router.pick(self.replicas, stream.request.prompt_tokens,
                                           stream.request.cache_scope)
                if replica is None:  # raced with a death: put it back and wait
                    self._enqueue(stream, first=True)
                    break
                self._start(stream, replica)

    def _start(self, stream: ClusterStream, replica: Replica) -> None:
        request = stream.request
        tokens = len(request.prompt_tokens) + (request.max_tokens or 0)
        replica.outstanding[stream.request_id] = tokens
        stream.phase, stream.replica = Phase.RUNNING, replica.index
        self._spawn(self._run(stream, replica))

    async def _run(self, stream: ClusterStream, replica: Replica) -> None:
        from ray.exceptions import RayError, RayTaskError

        try:
            # the admission layer's counters stay in this process
            refs = replica.handle.generate.options(num_returns="streaming").remote(
                replace(stream.request, shares=None))
            async for ref in refs:
                for event in await ref:
                    stream.deliver(event)
            replica.served += 1
        except RayTaskError as exc:
            log.warning("replica %d refused %s: %s", replica.index, stream.request_id, exc)
            stream.end(FinishReason.ERROR)
        except RayError:  # the actor died or became unreachable
            self._lost(replica)
            if stream.delivered == 0 and stream.phase is not Phase.DONE:
                stream.phase, stream.replica = Phase.WAITING, None
                self._enqueue(stream, first=True)  # nothing was produced: another takes it
            else:
                stream.end(FinishReason.ERROR)
        finally:
            replica.outstanding.pop(stream.request_id, None)
            self._wake.set()
            async with self._finished:
                self._finished.notify_all()

    def _cancel(self, stream: ClusterStream) -> None:
        if stream in self._waiting:
            self._waiting.remove(stream)
            stream.end(FinishReason.CANCELLED)
            return
        replica = next((r for r in self.replicas if r.index == stream.replica), None)
        if replica is not None and replica.alive:
            replica.handle.cancel.remote(stream.request_id)

    def _lost(self, replica: Replica) -> None:
        if replica.state in ("dead", "draining"):
            return
        log.error("replica %s:%d died; Ray is restarting it", self.model_id, replica.index)
        replica.state, replica.alive = "dead", False
        self._router.forget(replica.index)
        self._spawn(self._revive(replica))

    async def _revive(self, replica: Replica) -> None:
        """Ray restarts the actor process; the first call loads the model again. Failed
        attempts are logged (the first with its traceback; then attempts 2, 4, 8...,
        so a node that stays away does not flood the log) and retried each tick."""
        for attempt in itertools.count(1):
            if replica not in self.replicas or replica.state != "dead":
                return
            try:
                await asyncio.wait_for(self._ready(replica), timeout=120)
            except Exception as exc:
                if attempt & (attempt - 1) == 0:
                    log.warning("replica %s:%d not back yet (attempt %d): %s: %s",
                                self.model_id, replica.index, attempt, type(exc).__name__,
                                exc, exc_info=exc if attempt == 1 else None)
                await asyncio.sleep(self._tick)

    # -- scaling and health ----------------------------------------------------------------------

    async def scale_to(self, replicas: int | None = None, minimum: int | None = None,
                       maximum: int | None = None) -> None:
        s = self.scaling
        s.minimum = minimum if minimum is not None else s.minimum
        s.maximum = maximum if maximum is not None else s.maximum
        s.replicas = replicas if replicas is not None else len(self.replicas)
        s.minimum, s.maximum = min(s.minimum, s.replicas), max(s.maximum, s.replicas)
        if s.minimum < 1:
            raise EngineError("a model needs at least one replica", param="min_replicas")
        while len(self._serving()) < s.replicas:
            await self._add_replica()
        while len(self._serving()) > s.replicas:
            await self._drain(self._serving()[-1])

    def _serving(self) -> list[Replica]:
        return [r for r in self.replicas if r.state != "draining"]

    async def _drain(self, replica: Replica) -> None:
        replica.state, replica.alive = "draining", False
        async with self._finished:
            await self._finished.wait_for(lambda: not replica.outstanding)
        self._kill(replica)
        self.replicas.remove(replica)
        self._router.forget(replica.index)

    async def _maintain_forever(self) -> None:
        while True:
            await asyncio.sleep(self._tick)
            self._expire(time.monotonic())
            try:
                await self._refresh_stats()
            except Exception as exc:  # stale numbers until the next tick; say why
                log.warning("could not read the replicas' stats of %s: %s: %s",
                            self.model_id, type(exc).__name__, exc)
            self._autoscale(time.monotonic())

    def _expire(self, now: float) -> None:
        """Refuse (503) what has waited `max_wait` for a replica: none came back."""
        while self._waiting and now - self._waiting[0].enqueued_at >= self.max_wait:
            self._waiting.popleft().end(FinishReason.OVERLOADED)

    async def _refresh_stats(self) -> None:
        ready = [r for r in self.replicas if r.state == "ready"]
        results = await asyncio.gather(*(r.handle.stats.remote() for r in ready),
                                       return_exceptions=True)
        for replica, result in zip(ready, results, strict=True):
            if isinstance(result, EngineStats):
                replica.stats = result

    def _autoscale(self, now: float) -> None:
        s, serving = self.scaling, self._serving()
        busy = self._waiting or any(r.outstanding for r in self.replicas)
        if busy:
            self._idle_since = now
        starting = any(r.state == "starting" for r in self.replicas)
        ready = [r for r in self.replicas if r.state == "ready"]
        full = bool(ready) and not any(r.has_room for r in ready)
        self._full_since = (self._full_since or now) if full else None
        waited = max((now - w.enqueued_at for w in self._waiting), default=0.0)
        waited = max(waited, now - self._full_since if self._full_since else 0.0)
        if len(serving) < s.maximum and not starting and waited >= s.up_after:
            log.info("scaling %s up: full for %.1fs", self.model_id, waited)
            self._spawn(self._add_replica())
        elif len(serving) > s.minimum and now - self._idle_since >= s.down_after:
            log.info("scaling %s down after %.0fs idle", self.model_id, now - self._idle_since)
            self._idle_since = now
            self._spawn(self._drain(serving[-1]))


def _cause(exc: Exception) -> Exception:
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, EngineError) else EngineError(
        "the model replica failed on this request")
