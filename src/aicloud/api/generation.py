"""Running one generation for a caller: start it, stream or collect it, and bill it.

Usage is written before the last byte of the response leaves (so a 200 always has its
row); a client that goes away cancels the sequence, and the tokens it already produced are
billed by a background task once the engine confirms the final count.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from starlette.requests import Request

from aicloud.accounts.keys import Principal
from aicloud.api.admission import Admission, admit, withdraw
from aicloud.api.errors import APIError, error_body, invalid
from aicloud.api.schemas import SamplingFields
from aicloud.api.telemetry import Telemetry
from aicloud.billing.usage import UsageEntry
from aicloud.engines.base import (
    Constraint,
    Engine,
    EngineError,
    EngineOverloaded,
    FinishReason,
    GenerationRequest,
    GenerationStream,
    SamplingParams,
    TokenEvent,
    Usage,
)
from aicloud.services import Cloud

log = logging.getLogger(__name__)
T = TypeVar("T")

STATUS = {
    FinishReason.STOP: "completed",
    FinishReason.LENGTH: "length",
    FinishReason.CANCELLED: "cancelled",
    FinishReason.ERROR: "error",
    FinishReason.OVERLOADED: "overloaded",
    FinishReason.THROTTLED: "throttled",
}


def refusal(reason: FinishReason, retry_after: float = 1.0) -> APIError:
    """A request the scheduler shed before it ran: 429 if its tenant floods the model,
    503 if the model is saturated for everyone."""
    seconds = str(max(1, round(retry_after)))
    if reason is FinishReason.THROTTLED or reason is None:
        return APIError(429, "Too many of your requests are waiting for this model; "
                        "retry later or send fewer at once.", code="rate_limit_exceeded",
                        headers={"retry-after": seconds})
    return APIError(503, "The model is overloaded; retry shortly.", code="model_overloaded",
                    headers={"retry-after": seconds})


def tenant_of(principal: Principal, share_by: str) -> str:
    return {"key": principal.api_key_id,
            "organization": principal.organization_id}.get(share_by, principal.project_id)


def sampling_from(body: SamplingFields) -> SamplingParams:
    try:
        return SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            min_p=body.min_p or 0.0,
            seed=body.seed,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
        )
    except EngineError as exc:
        raise invalid(exc.message, exc.param) from None


def usage_json(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


@dataclass(slots=True)
class Run:
    request_id: str
    model: str
    admission: Admission
    stream: GenerationStream
    cloud: Cloud
    background: set[asyncio.Task[None]]
    telemetry: Telemetry
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    created: int = field(default_factory=lambda: int(time.time()))
    recorded: bool = False
    _clock: float = field(default_factory=time.perf_counter)
    _tokens: int = 0

    def observe(self, event: TokenEvent) -> None:
        """Feed the latency histograms: the first token, then the gaps between tokens."""
        made = event.completion_tokens - self._tokens
        if made <= 0:
            return
        now = time.perf_counter()
        elapsed = now - self._clock
        if self._tokens == 0:  # any others that came with the first token took no time
            self.telemetry.first_token(self.model, elapsed)
            made, elapsed = made - 1, 0.0
        self.telemetry.next_tokens(self.model, elapsed, made)
        self._clock, self._tokens = now, event.completion_tokens

    async def record(self, final: TokenEvent) -> None:
        """Write the usage row and settle the hold in one transaction, then return the
        rate-limit tokens the request did not use."""
        usage = final.usage or Usage(0, final.completion_tokens)
        principal = self.admission.principal
        await self.cloud.ledger.record(UsageEntry(
            request_id=self.request_id, organization_id=principal.organization_id,
            api_key_id=principal.api_key_id, project_id=principal.project_id, model=self.model,
            prompt_tokens=usage.prompt_tokens, cached_tokens=usage.cached_tokens,
            completion_tokens=usage.completion_tokens, cost_pico=self.admission.cost(usage),
            status=STATUS[final.finish_reason or FinishReason.ERROR],
            started_at=self.started_at, finished_at=datetime.now(UTC),
        ), self.admission.hold)
        self.recorded = True
        await self.cloud.limits.settle(self.admission.ticket, usage.total_tokens)

    def abandon(self) -> None:
        """The client left: stop the sequence and bill what it produced, off this task."""
        if self.recorded:
            return
        self.stream.cancel()
        task = asyncio.get_running_loop().create_task(self._record_when_final())
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _record_when_final(self) -> None:
        try:
            await self.record(await self.stream.final())
        except Exception:
            log.exception("could not record usage of abandoned request %s", self.request_id)


async def open_run(request: Request, engine: Engine, principal: Principal, model: str,
                   prompt_tokens: list[int], body: SamplingFields, max_tokens: int | None,
                   prefix: str, constraint: Constraint | None = None) -> Run:
    cloud: Cloud = request.app.state.cloud
    sampling = sampling_from(body)
    request_id = f"{prefix}-{secrets.token_hex(12)}"
    most = max_tokens if max_tokens is not None else (
        engine.info().context_length - len(prompt_tokens))
    admission = await admit(cloud, principal, model, request_id, len(prompt_tokens),
                            max(most, 0))
    gen = GenerationRequest(
        request_id=request_id, prompt_tokens=prompt_tokens,
        sampling=sampling, max_tokens=max_tokens, stop=body.stops,
        tenant=tenant_of(principal, request.app.state.fair_share_by),
        priority=body.priority, weight=principal.weight, constraint=constraint,
    )
    try:
        stream = await engine.generate(gen)
    except EngineOverloaded as exc:
        await withdraw(cloud, admission)
        raise refusal(FinishReason.OVERLOADED if exc.everyone else FinishReason.THROTTLED,
                      exc.retry_after) from None
    except EngineError as exc:
        await withdraw(cloud, admission)
        raise invalid(exc.message, exc.param, exc.code) from None
    except BaseException:
        await withdraw(cloud, admission)
        raise
    return Run(request_id, model, admission, stream, cloud, request.app.state.background,
               request.app.state.telemetry)


class Format(Protocol):
    """How chat and text completions differ: only the JSON they wrap text in."""

    def chunk(self, run: Run, text: str, finish: str | None, first: bool) -> dict[str, Any]: ...

    def whole(self, run: Run, text: str, finish: str, usage: Usage) -> dict[str, Any]: ...


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


async def until_disconnect(run: Run, request: Request, work: Awaitable[T]) -> T:
    """Await `work` unless the client goes first: then stop the sequence, bill what it
    made, and answer 499."""
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        run.abandon()
        raise APIError(499, "client closed the request")
    return task.result()


async def refused(run: Run, event: TokenEvent) -> APIError:
    """The scheduler shed the request before it ran: bill nothing, answer 429 or 503."""
    await run.record(event)
    reason = event.finish_reason or FinishReason.THROTTLED
    run.telemetry.refused[(run.model, reason.value)] += 1
    return refusal(reason)


async def first_event(run: Run, request: Request) -> tuple[AsyncIterator[TokenEvent],
                                                          TokenEvent]:
    """Wait for the first event before sending any header, so a request shed from the
    queue still gets a real 429/503 instead of a 200 with an error inside."""
    events = aiter(run.stream)
    first = await until_disconnect(run, request, anext(events))
    if first.finish_reason is not None and first.finish_reason.refused:
        raise await refused(run, first)
    return events, first


async def stream_events(run: Run, fmt: Format, include_usage: bool,
                        events: AsyncIterator[TokenEvent],
                        first_event: TokenEvent) -> AsyncIterator[bytes]:
    """SSE body. If this generator is cancelled (client gone), the run is abandoned."""
    first = True
    try:
        async for event in _chain(first_event, events):
            run.observe(event)
            if event.finish_reason is None:
                if event.text or first:
                    yield sse(fmt.chunk(run, event.text, None, first))
                    first = False
                continue
            await run.record(event)
            if event.finish_reason is FinishReason.ERROR:
                yield sse(error_body(500, "the engine failed while generating"))
                return
            if event.text:
                yield sse(fmt.chunk(run, event.text, None, first))
            yield sse(fmt.chunk(run, "", event.finish_reason.openai, False))
            if include_usage and event.usage is not None:
                yield sse({**fmt.chunk(run, "", None, False), "choices": [],
                           "usage": usage_json(event.usage)})
            yield sse("[DONE]")
    finally:
        run.abandon()


async def _chain(first: TokenEvent, rest: AsyncIterator[TokenEvent]
                 ) -> AsyncIterator[TokenEvent]:
    yield first
    if first.finish_reason is None:
        async for event in rest:
            yield event


async def collect(run: Run, request: Request) -> tuple[str, str, Usage]:
    """Gather the whole text, cancelling the sequence if the client disconnects first."""
    async def gather() -> tuple[str, TokenEvent]:
        parts: list[str] = []
        async for event in run.stream:
            run.observe(event)
            parts.append(event.text)
            if event.finish_reason is not None:
                return "".join(parts), event
        raise RuntimeError("stream ended without a final event")

    text, final = await until_disconnect(run, request, gather())
    reason = final.finish_reason or FinishReason.ERROR
    if reason.refused:
        raise await refused(run, final)
    await run.record(final)
    if reason is FinishReason.ERROR:
        raise APIError(500, "the engine failed while generating")
    return text, reason.openai, final.usage or Usage(0, final.completion_tokens)
