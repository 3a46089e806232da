"""One Batch API line, run by the very code that serves an HTTP request to its endpoint:
the same checks and refusals, rate limits, budget hold, engine and ledger, with three
differences `open_run` applies for a batch line (the batch class, the batch price, no
progress journal) and one here: the answer is written in the usage row's transaction."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from aicloud.api.deps import validate_body
from aicloud.api.errors import APIError, error_body, invalid
from aicloud.api.generation import Completed, Format, Run, Serving, begin, collect
from aicloud.api.routes.embeddings import embed
from aicloud.api.routes.openai import lease_for, open_chat, open_completion
from aicloud.api.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from aicloud.batches.runner import LineCall, LineOutcome
from aicloud.billing.usage import Alongside
from aicloud.engines.base import Engine, EngineError, EngineUnavailable, Usage
from aicloud.models.pool import ModelPool, UnknownModel
from aicloud.store.direct import DatabaseUnavailable

RETRY_SECONDS = 2.0  # when a refusal names no retry-after
GATE_SECONDS = 0.05  # how often a held line looks at its engine's load again
# interactive traffic comes in bursts: a model counts as busy this long after it was last
# seen with interactive work, so a gap between two requests does not let a window's worth
# of lines in (measured: without it, 1 request/s of 32 tokens still let the whole window
# through between requests, and interactive TTFT p99 grew 18x on a loaded machine)
BUSY_HOLD_SECONDS = 2.0


class LineRunner:
    """The `LineExecutor` of the server's batch runner.

    An engine that can pause a sequence (`EngineInfo.preempts`: llama.cpp) makes batch
    lines yield to interactive work at every step itself: they sit its steps out and lend
    their slots. On any other (vLLM, Ray replicas, providers) the batch class only orders
    the waiting line: a batch line that got a sequence slot decodes in every step beside
    interactive ones, and on a CPU each extra row makes the step (so every interactive
    token) slower. So there, while anything other than this server's batch lines runs or
    waits on a model (or did within BUSY_HOLD_SECONDS), at most `yield_lines` batch lines
    run; the others wait here, before admission, holding nothing."""

    def __init__(self, serving: Serving, pool: ModelPool, yield_lines: int = 8) -> None:
        self.serving, self.pool, self.yield_lines = serving, pool, yield_lines
        self._running: Counter[str] = Counter()  # batch lines past the gate, by model
        self._busy_until: dict[str, float] = {}  # by model, time.monotonic()

    async def __call__(self, call: LineCall) -> LineOutcome:
        model = call.body.get("model")
        engine = self._engine(model) if isinstance(model, str) else None
        if engine is None or not isinstance(model, str) or _yields_by_step(engine):
            return await self._guarded(call)
        # polled: an engine's load changes without an event to wait on
        while self._running[model] >= self.yield_lines and self._others(engine, model):  # noqa: ASYNC110
            await asyncio.sleep(GATE_SECONDS)
        self._running[model] += 1
        try:
            return await self._guarded(call)
        finally:
            self._running[model] -= 1

    def _engine(self, model: str) -> Engine | None:
        try:
            return self.pool.get(model)
        except UnknownModel:
            return None

    def _others(self, engine: Engine, model: str) -> bool:
        """Interactive work (anything but this server's batch lines) on the model, now
        or within the last BUSY_HOLD_SECONDS."""
        try:
            stats = engine.stats()
        except EngineError:
            return False
        now = time.monotonic()
        if stats.running + stats.waiting > self._running[model]:
            self._busy_until[model] = now + BUSY_HOLD_SECONDS
        return now < self._busy_until.get(model, 0.0)

    async def _guarded(self, call: LineCall) -> LineOutcome:
        try:
            return await self._run(call)
        except APIError as exc:
            return _refused(exc)
        except EngineUnavailable as exc:
            return LineOutcome(503, error_body(503, exc.message), retry_after=exc.retry_after)
        except DatabaseUnavailable:
            return LineOutcome(503, error_body(503, "database unavailable"),
                               retry_after=RETRY_SECONDS)

    async def _run(self, call: LineCall) -> LineOutcome:
        if call.body.get("stream"):
            raise invalid("batch requests cannot stream", "stream")
        if call.endpoint == "/v1/embeddings":
            body = validate_body(call.body, EmbeddingRequest)
            lease = await lease_for(self.pool, body.model, call.principal)
            try:
                data, _ = await embed(self.serving, call.principal, lease.model, body,
                                      call.request_id, lambda data: call.answer(200, data))
            finally:
                lease.release()
            return LineOutcome(200, data, recorded=True)
        opener: Callable[..., Awaitable[tuple[Run, Format]]]
        if call.endpoint == "/v1/chat/completions":
            chat = validate_body(call.body, ChatCompletionRequest, ("messages",))
            model, opener = chat.model, partial(open_chat, body=chat)
        else:
            text = validate_body(call.body, CompletionRequest, ("prompt",))
            model, opener = text.model, partial(open_completion, body=text)
        lease = await lease_for(self.pool, model, call.principal)
        try:
            run, fmt = await opener(self.serving, call.principal, lease.model,
                                    batch_line=call.request_id, cold_since=lease.cold_since)
            answered: dict[str, Any] = {}

            def answer(completed: list[Completed], usage: Usage) -> Alongside:
                answered.update(fmt.whole(run, completed, usage))
                return call.answer(200, answered)

            run.answer = answer
            try:
                await begin(run, None)
                await collect(run, None)
            except asyncio.CancelledError:  # the server stops: the line stays pending
                run.cancel()
                raise
        finally:
            lease.release()
        return LineOutcome(200, answered, recorded=True)


def _yields_by_step(engine: Engine) -> bool:
    """Whether the engine itself keeps batch lines out of interactive steps."""
    try:
        return engine.info().preempts
    except EngineError:
        return False


def _refused(exc: APIError) -> LineOutcome:
    """A refusal for now (limits, a full queue, an overloaded model) is retried; a spent
    budget stops the batch; anything else is the line's answer."""
    body = error_body(exc.status, exc.message, exc.param, exc.code, exc.kind)
    if exc.code == "insufficient_quota":
        return LineOutcome(exc.status, body, out_of_budget=True)
    if exc.status in (429, 503):
        seconds = (exc.headers or {}).get("retry-after")
        retry = float(seconds) if seconds and seconds.replace(".", "", 1).isdigit() else None
        return LineOutcome(exc.status, body, retry_after=retry or RETRY_SECONDS)
    return LineOutcome(exc.status, body)
