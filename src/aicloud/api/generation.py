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
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from starlette.requests import Request

from aicloud.accounts.keys import Principal
from aicloud.api.admission import Admission, admit, withdraw
from aicloud.api.errors import APIError, error_body, invalid
from aicloud.api.schemas import SamplingFields
from aicloud.billing.usage import UsageEntry
from aicloud.engines.base import (
    Engine,
    EngineError,
    FinishReason,
    GenerationRequest,
    GenerationStream,
    SamplingParams,
    TokenEvent,
    Usage,
)
from aicloud.services import Cloud

log = logging.getLogger(__name__)

STATUS = {
    FinishReason.STOP: "completed",
    FinishReason.LENGTH: "length",
    FinishReason.CANCELLED: "cancelled",
    FinishReason.ERROR: "error",
}


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
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    created: int = field(default_factory=lambda: int(time.time()))
    recorded: bool = False

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
                   prefix: str) -> Run:
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
        tenant=principal.project_id,
    )
    try:
        stream = await engine.generate(gen)
    except EngineError as exc:
        await withdraw(cloud, admission)
        raise invalid(exc.message, exc.param, exc.code) from None
    except BaseException:
        await withdraw(cloud, admission)
        raise
    return Run(request_id, model, admission, stream, cloud, request.app.state.background)


class Format(Protocol):
    """How chat and text completions differ: only the JSON they wrap text in."""

    def chunk(self, run: Run, text: str, finish: str | None, first: bool) -> dict[str, Any]: ...

    def whole(self, run: Run, text: str, finish: str, usage: Usage) -> dict[str, Any]: ...


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


async def stream_events(run: Run, fmt: Format, include_usage: bool) -> AsyncIterator[bytes]:
    """SSE body. If this generator is cancelled (client gone), the run is abandoned."""
    first = True
    try:
        async for event in run.stream:
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


async def collect(run: Run, request: Request) -> tuple[str, str, Usage]:
    """Gather the whole text, cancelling the sequence if the client disconnects first."""
    async def gather() -> tuple[str, TokenEvent]:
        parts: list[str] = []
        async for event in run.stream:
            parts.append(event.text)
            if event.finish_reason is not None:
                return "".join(parts), event
        raise RuntimeError("stream ended without a final event")

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work = asyncio.ensure_future(gather())
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not work.done():
        work.cancel()
        run.abandon()
        raise APIError(499, "client closed the request")
    text, final = work.result()
    await run.record(final)
    reason = final.finish_reason or FinishReason.ERROR
    if reason is FinishReason.ERROR:
        raise APIError(500, "the engine failed while generating")
    return text, reason.openai, final.usage or Usage(0, final.completion_tokens)
