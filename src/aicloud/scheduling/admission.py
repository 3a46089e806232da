"""The one admission layer in front of every engine: llama.cpp, vLLM, a Ray replica set or
an upstream provider all get the same tenant-fair order, priorities and back-pressure.

An `Admitter` is itself an Engine wrapped around one. A request waits in the model's
`FairQueue` until the engine has room, and is then handed to `engine.generate` with the
queue's counters attached (`GenerationRequest.shares`), so an engine that picks which of
its sequences decode each step orders them by the same counters: one set of per-tenant
counters, applied at admission here and token by token inside the engine.

- Room: on an engine that can pause a sequence, any tenant may fill every free slot
  (`info().max_sequences`), so a tenant alone gets the whole engine; on any other, the
  last quarter of the slots is kept for tenants below their share (`FairQueue.can_start`).
  An engine that `preempts` (pauses a sequence to lend its slot) is handed up to a quarter
  more, only for tenants a whole slot below their weighted share
  of the slots: a newcomer's first token then comes at once instead of after a whole
  generation. (A request handed over waits inside the engine if it finds no room after
  all; it no longer expires, and the reserve bounds how many can.)
- Priorities: an interactive request is admitted before any waiting batch one. On an
  engine that preempts, the batch class's generations take no room from interactive
  ones either: the engine leaves them out of its steps while interactive sequences run
  and parks them to lend their slots (issue 16: batch lines use only idle capacity).
- Counters grow as service happens: the prompt when admitted (an estimate: the final
  usage corrects it by what was cached), each output token as its event passes.
- Back-pressure: a full line or a long wait is refused with a 429 (the tenant floods the
  model) or a 503 (everyone does), with a retry-after, exactly as `FairQueue` decides.
- Deadlines: a request that carries one (`GenerationRequest.deadline`) and reaches the
  head of the line too late to finish by it (now + the model's recent service time, from
  hand-over to last token) is answered with a 503 instead of being started. Under
  overload a line served in order makes every request late; shedding what can no longer
  be on time gives its slot and decode time to requests that still can be.
- `in_flight` counts the model's admitted generations and running embeddings; `idle()`
  returns once nothing is in flight or waiting, which is what a pool drains on.

Everything here runs on the event loop, so the queue needs no lock.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from aicloud.engines.base import (
    ChatMessage,
    EmbeddingRequest,
    Embeddings,
    Engine,
    EngineError,
    EngineInfo,
    EngineStats,
    FinishReason,
    GenerationRequest,
    GenerationStream,
    Priority,
    TenantLoad,
    TokenEvent,
    Usage,
    completion_limit,
)
from aicloud.scheduling.fair_queue import FairQueue, Mode

log = logging.getLogger(__name__)

# while requests wait, admission is re-checked at least this often: an engine's room can
# grow without a request finishing (a Ray replica coming back)
RECHECK_SECONDS = 1.0
# how much each finished generation moves the model's service-time estimate
SERVICE_WEIGHT = 0.2


class AdmittedStream:
    """A request as the caller holds it: waiting in the line, then the engine's stream.
    Output tokens are charged to its tenant as their events pass."""

    def __init__(self, request: GenerationRequest, admitter: Admitter) -> None:
        self.request = request
        self._admitter = admitter
        # the engine's stream once admitted, or the one event of a request that never ran
        self._outcome: asyncio.Future[GenerationStream | TokenEvent] = (
            asyncio.get_running_loop().create_future())
        self.cancelled = False
        self.charged_input = 0
        self.charged_output = 0
        self.handed: float | None = None  # when it was handed to the engine

    @property
    def tenant(self) -> str:
        return self.request.tenant

    @property
    def batch(self) -> bool:
        return self.request.priority >= Priority.BATCH

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        outcome = await asyncio.shield(self._outcome)
        if isinstance(outcome, TokenEvent):
            yield outcome
            return
        async for event in outcome:
            self._admitter.charge_output(self, event.completion_tokens)
            yield event
            if event.finish_reason is not None:
                return

    def cancel(self) -> None:
        self.cancelled = True
        if not self._outcome.done():
            self._admitter.withdraw(self)
        elif not isinstance(outcome := self._outcome.result(), TokenEvent):
            outcome.cancel()

    async def final(self) -> TokenEvent:
        outcome = await asyncio.shield(self._outcome)
        return outcome if isinstance(outcome, TokenEvent) else await outcome.final()

    def started(self, inner: GenerationStream) -> None:
        if not self._outcome.done():
            self._outcome.set_result(inner)
        if self.cancelled:
            inner.cancel()

    def end(self, reason: FinishReason) -> None:
        """Finish without having run: refused, cancelled while waiting, or failed to
        start. Nothing was computed, so nothing is used."""
        if not self._outcome.done():
            self._outcome.set_result(TokenEvent("", 0, reason, Usage(0, 0)))


class Admitter:
    """An Engine in front of `engine`: the model's waiting line and its counters."""

    def __init__(self, engine: Engine, queue: FairQueue[AdmittedStream] | None = None) -> None:
        self.engine = engine
        self.queue: FairQueue[AdmittedStream] = queue if queue is not None else FairQueue()
        self._generating = 0
        self._batch = 0  # of those generating, the batch class's
        self._embedding = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self.service: float | None = None  # recent seconds from hand-over to last token
        self.shed = 0  # requests refused at their turn because their deadline was lost

    @property
    def in_flight(self) -> int:
        """Generations admitted and not finished, plus embeddings being computed."""
        return self._generating + self._embedding

    async def idle(self) -> None:
        """Return once nothing is in flight or waiting (at once if so already)."""
        await self._idle.wait()

    # -- the Engine protocol --------------------------------------------------------------

    async def start(self) -> None:
        await self.engine.start()

    async def close(self) -> None:
        while (stream := self.queue.pop()) is not None:
            stream.end(FinishReason.ERROR)
        if self._timer is not None:
            self._timer.cancel()
        await self.engine.close()

    async def encode_chat(self, messages: list[ChatMessage],
                          tools: list[dict[str, Any]] | None = None) -> list[int]:
        return await self.engine.encode_chat(messages, tools)

    async def encode_text(self, text: str) -> list[int]:
        return await self.engine.encode_text(text)

    def info(self) -> EngineInfo:
        return self.engine.info()

    def stats(self) -> EngineStats:
        stats = self.engine.stats()
        return replace(stats, waiting=stats.waiting + len(self.queue))

    def tenants(self) -> list[TenantLoad]:
        return self.queue.metrics()

    async def embed(self, request: EmbeddingRequest) -> Embeddings:
        """Embeddings take no sequence slot, so they skip the line; they count as in
        flight while they run."""
        self._embedding += 1
        self._idle.clear()
        try:
            return await self.engine.embed(request)
        finally:
            self._embedding -= 1
            self._check_idle()

    async def generate(self, request: GenerationRequest) -> AdmittedStream:
        """Refuse what no engine could run; then join the line, and start at once if the
        line lets it (the engine's own EngineError then reaches the caller). Raises
        EngineOverloaded when the line refuses it."""
        if request.relay is None:  # a relayed request has no tokens: its provider checks it
            completion_limit(request, self.engine.info().context_length)
        stream = AdmittedStream(request, self)
        evicted = self.queue.push(stream, request.tenant, request.priority, request.weight)
        self._idle.clear()
        for other in evicted:
            other.end(FinishReason.THROTTLED)
        if self._admit_waiting(inline=stream):
            stream.started(await self._hand_over(stream))
        return stream

    # -- admission -----------------------------------------------------------------------

    def _may_admit(self, tenant: str, priority: Priority) -> bool:
        """An engine that preempts lends a batch sequence's slot to an interactive one (it
        parks it), so for the interactive class only interactive generations take room."""
        info = self.engine.info()
        busy = self._generating
        if info.preempts and priority is Priority.INTERACTIVE:
            busy -= self._batch
        return self.queue.can_start(tenant, busy, info.max_sequences, info.preempts)

    def _admit_waiting(self, inline: AdmittedStream | None = None) -> bool:
        """Refuse what waited too long, then admit what the engine has room for, in the
        line's order; returns whether `inline` was admitted (its caller starts it)."""
        for old, everyone in self.queue.expired():
            old.end(FinishReason.OVERLOADED if everyone else FinishReason.THROTTLED)
        found = False
        try:
            while (admitted := self.queue.pop(self._may_admit)) is not None:
                if self._too_late(admitted):
                    self.shed += 1
                    admitted.end(FinishReason.OVERLOADED)
                    continue
                self._take(admitted)
                if admitted is inline:
                    found = True
                else:
                    self._spawn(self._start_waiting(admitted))
        except EngineError as exc:  # the engine cannot tell its room now (a replica set
            log.debug("admission paused: %s", exc)  # with none ready): the timer retries
        self._arm()
        self._check_idle()
        return found

    def _too_late(self, stream: AdmittedStream) -> bool:
        """Whether `stream`, started now, would finish after its deadline."""
        deadline = stream.request.deadline
        return deadline is not None and self.queue.now() + (self.service or 0.0) > deadline

    def _take(self, stream: AdmittedStream) -> None:
        """Count it in flight and charge its prompt now (corrected when it ends)."""
        self._generating += 1
        self._batch += stream.batch
        self._idle.clear()
        self.queue.started(stream.tenant)
        relay = stream.request.relay
        stream.charged_input = (relay.prompt_estimate if relay is not None
                                else len(stream.request.prompt_tokens))
        self.queue.charge(stream.tenant, input_tokens=stream.charged_input)

    async def _hand_over(self, stream: AdmittedStream) -> GenerationStream:
        shares = self.queue if self.queue.config.mode is Mode.VTC else None
        stream.handed = self.queue.now()
        try:
            inner = await self.engine.generate(replace(stream.request, shares=shares))
        except BaseException:
            self._release(stream, Usage(0, 0))
            raise
        self._spawn(self._watch(stream, inner))
        return inner

    async def _start_waiting(self, stream: AdmittedStream) -> None:
        if stream.cancelled:
            self._release(stream, Usage(0, 0))
            stream.end(FinishReason.CANCELLED)
            return
        try:
            stream.started(await self._hand_over(stream))
        except EngineError as exc:
            log.info("request %s could not start: %s", stream.request.request_id, exc.message)
            stream.end(FinishReason.ERROR)
        except Exception:
            log.exception("request %s could not start", stream.request.request_id)
            stream.end(FinishReason.ERROR)

    async def _watch(self, stream: AdmittedStream, inner: GenerationStream) -> None:
        final = await inner.final()
        if final.finish_reason in (FinishReason.STOP, FinishReason.LENGTH) and (
                stream.handed is not None):
            took = self.queue.now() - stream.handed
            self.service = took if self.service is None else (
                self.service + SERVICE_WEIGHT * (took - self.service))
        self.charge_output(stream, final.completion_tokens)
        self._release(stream, final.usage or Usage(stream.charged_input, 0))

    def _release(self, stream: AdmittedStream, usage: Usage) -> None:
        """It left the engine: correct the prompt's charge to what was computed, and let
        the next one in."""
        computed = usage.prompt_tokens - usage.cached_tokens
        self.queue.charge(stream.tenant, input_tokens=computed - stream.charged_input)
        stream.charged_input = computed
        self.queue.finished(stream.tenant)
        self._generating -= 1
        self._batch -= stream.batch
        self._admit_waiting()

    def charge_output(self, stream: AdmittedStream, made: int) -> None:
        if made > stream.charged_output:
            self.queue.charge(stream.tenant, output_tokens=made - stream.charged_output)
            stream.charged_output = made

    def withdraw(self, stream: AdmittedStream) -> None:
        """Cancelled before it started: it leaves the line and costs nothing."""
        if self.queue.remove(stream):
            stream.end(FinishReason.CANCELLED)
            self._check_idle()

    def _arm(self) -> None:
        """Wake up when the oldest waiter expires, or to re-check the engine's room."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        expiry = self.queue.next_expiry()
        if expiry is not None:
            self._timer = asyncio.get_running_loop().call_later(
                min(expiry, RECHECK_SECONDS), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._admit_waiting()

    def _check_idle(self) -> None:
        if not self.in_flight and not len(self.queue):
            self._idle.set()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def unwrap(engine: Engine) -> Engine:
    """The engine behind an admission layer, for what only it can tell (a replica set's
    placement and scaling)."""
    return engine.engine if isinstance(engine, Admitter) else engine
