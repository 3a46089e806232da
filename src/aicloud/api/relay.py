"""Chat and text completions of models served by a provider (engines with RELAY): the
caller's OpenAI request goes upstream as it came, and the provider's chunks come back one
by one under our id and model name, so tools, JSON schema and anything else the provider
supports pass through. Everything around it is the local path's: RPM/TPM, the budget hold
(from the price and the request's bound, before anything is sent), the progress journal,
the usage row and its settle, billing of what was streamed when the client goes away.

Nothing is tokenized: the hold takes the prompt's UTF-8 bytes as the bound of its tokens
(a token of a byte-level vocabulary covers at least one byte) and `max_tokens`, or the
model's context, as the bound of the answer. Fallbacks (`options["fallbacks"]` of the
catalog entry) are tried in order when a provider is unavailable before its first chunk;
a local fallback runs the local route.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import Request

from aicloud.accounts.keys import Principal
from aicloud.api.admission import admit, check_prompt_size
from aicloud.api.errors import APIError, error_body, invalid
from aicloud.api.event_stream import EventStream
from aicloud.api.generation import (
    Run,
    _unwind,
    begin,
    failed,
    refused,
    serving,
    sse,
    tenant_of,
    until_disconnect,
    usage_json,
)
from aicloud.api.schemas import SamplingFields
from aicloud.engines.base import (
    RELAY,
    Engine,
    EngineError,
    EngineUnavailable,
    GenerationRequest,
    RelayBody,
    TokenEvent,
)
from aicloud.engines.upstream import estimate_tokens
from aicloud.services import Cloud

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
CHAT, TEXT = "chat/completions", "completions"
OBJECTS = {CHAT: ("chat.completion", "chat.completion.chunk"),
           TEXT: ("text_completion", "text_completion")}
# the request's text, for the bound of its prompt tokens
PROMPT_FIELDS = ("messages", "prompt", "tools", "functions", "response_format")
MAX_FALLBACKS = 8

Local = Callable[[str], Awaitable[StreamingResponse | JSONResponse]]
Resolve = Callable[[str], Awaitable[Engine]]


async def fallbacks_of(cloud: Cloud, model: str) -> list[str]:
    entry = await cloud.catalog.find(model)
    names = entry.options.get("fallbacks", []) if entry is not None else []
    return [n for n in names if isinstance(n, str)][:MAX_FALLBACKS]


async def relay_with_fallbacks(request: Request, principal: Principal, body: SamplingFields,
                               endpoint: str, prefix: str, engine: Engine, resolve: Resolve,
                               local: Local) -> StreamingResponse | JSONResponse:
    """Try `body.model` on `engine` (the route leased it), then its fallbacks, while each
    is unavailable; `resolve` finds a fallback's engine the caller may use (raising the 404
    otherwise), `local` runs a local model's route."""
    cloud: Cloud = request.app.state.cloud
    try:
        return await relay(request, principal, engine, body.model, body, endpoint, prefix)
    except EngineUnavailable as exc:
        unavailable = exc  # only now are the fallbacks read: nothing on the happy path
    names = [n for n in dict.fromkeys(await fallbacks_of(cloud, body.model))
             if n != body.model]
    for name in names:
        try:
            engine = await resolve(name)
        except APIError:
            continue  # a fallback the caller may not use, or one that is gone
        log.warning("model %s unavailable (%s); trying its fallback %s", body.model,
                    unavailable.message, name)
        try:
            if engine.info().can(RELAY):
                return await relay(request, principal, engine, name, body, endpoint, prefix)
            return await local(name)
        except EngineUnavailable as exc:
            unavailable = exc
    raise unavailable


def upstream_fields(body: SamplingFields) -> dict[str, Any]:
    """The caller's request as they sent it (the fields they set), for the provider."""
    return body.model_dump(mode="json", by_alias=True, exclude_unset=True)


def prompt_bound(fields: dict[str, Any]) -> int:
    material = {k: fields[k] for k in PROMPT_FIELDS if k in fields}
    return len(json.dumps(material, ensure_ascii=False).encode())


def completion_bound(fields: dict[str, Any], endpoint: str, context: int) -> int:
    """`max_completion_tokens` or `max_tokens`; on /v1/completions 16, OpenAI's default
    there (sent upstream, so every provider stops where the hold does); else the context."""
    for name in ("max_completion_tokens", "max_tokens"):
        if isinstance(fields.get(name), int):
            return int(fields[name])
    if endpoint == TEXT:
        fields["max_tokens"] = 16
        return 16
    return context


async def relay(request: Request, principal: Principal, engine: Engine, model: str,
                body: SamplingFields, endpoint: str, prefix: str
                ) -> StreamingResponse | JSONResponse:
    if body.choices != 1:
        raise invalid(f"model {model} is served by a provider here: n must be 1", "n")
    fields = upstream_fields(body)
    prompts = fields.get("prompt")
    if isinstance(prompts, list) and prompts and not isinstance(prompts[0], int) \
            and len(prompts) > 1:
        raise invalid(f"model {model} is served by a provider here: one prompt per request",
                      "prompt")
    context = engine.info().context_length
    bound = prompt_bound(fields)
    check_prompt_size(bound, context, "messages" if endpoint == CHAT else "prompt")
    most = completion_bound(fields, endpoint, context)
    run = await open_relay(request, principal, engine, model, body,
                           RelayBody(endpoint, fields, estimate_tokens(bound)), bound, most,
                           prefix)
    await begin(run, request)
    headers = {**run.admission.headers, "x-request-id": run.request_id}
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if body.stream:
        return EventStream(relay_events(run, endpoint, include_usage),
                           media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
    return JSONResponse(await relay_whole(run, request, endpoint), headers=headers)


async def open_relay(request: Request, principal: Principal, engine: Engine, model: str,
                     body: SamplingFields, relayed: RelayBody, bound: int, most: int,
                     prefix: str) -> Run:
    """As `generation.open_run` for one choice: admit (RPM, TPM, hold), then send."""
    shared = serving(request)
    cloud = shared.cloud
    request_id = f"{prefix}-{secrets.token_hex(12)}"
    admission = await admit(cloud, principal, model, request_id, bound, most)
    run = Run(request_id, model, admission, engine, 1, cloud, shared.background,
              shared.telemetry)
    generation = GenerationRequest(
        request_id=request_id, prompt_tokens=[], max_tokens=most,
        tenant=tenant_of(principal, shared.fair_share_by),
        priority=body.priority, weight=principal.weight, relay=relayed)
    try:
        await run.start(0, generation)
    except BaseException as exc:
        await _unwind(run)
        if isinstance(exc, EngineError):
            raise refused(exc, "upstream_invalid_request") from None
        raise
    run.progress = cloud.journal.track(request_id, principal, model, relayed.prompt_estimate,
                                       admission.rates, admission.hold, run.started_at)
    return run


def _envelope(run: Run, kind: str) -> dict[str, Any]:
    return {"id": run.request_id, "object": kind, "created": run.created, "model": run.model,
            "system_fingerprint": None}


def chunk_frame(run: Run, kind: str) -> tuple[bytes, bytes]:
    """The bytes of an SSE chunk around its one choice, encoded once per stream: each
    relayed chunk encodes only the provider's choice (what `sse` of the whole envelope
    would write, byte for byte)."""
    whole = sse({**_envelope(run, kind), "choices": [0]})
    head, _, tail = whole.rpartition(b"0")
    return head, tail


def cut_off() -> bytes:
    return sse(error_body(502, "the provider's stream broke off; the answer is incomplete",
                          code="upstream_error"))


async def relay_events(run: Run, endpoint: str, include_usage: bool) -> AsyncIterator[bytes]:
    """The provider's chunks under our envelope, as they come; the usage row is written
    before the last chunk; a cut stream ends with an error event (what came is billed)."""
    kind = OBJECTS[endpoint][1]
    head, tail = chunk_frame(run, kind)
    try:
        async with contextlib.aclosing(run.events()) as events:
            async for _, event in events:
                run.observe(0, event)
                if event.upstream is not None:
                    choice = json.dumps({**event.upstream, "index": 0}, ensure_ascii=False)
                    yield head + choice.encode() + tail
                if event.finish_reason is None:
                    continue
                await run.record([event])
                if failed(event):
                    yield cut_off()
                    return
                if include_usage and event.usage is not None:
                    yield sse({**_envelope(run, kind), "choices": [],
                               "usage": usage_json(event.usage)})
        yield sse("[DONE]")
    finally:
        run.abandon()


class Whole:
    """A streamed answer put back together as the provider's non-streamed one would be:
    content and refusal joined, tool calls merged by index, logprobs concatenated."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.text: list[str] = []
        self.refusal: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}
        self.logprobs: list[Any] = []
        self.finish: str | None = None

    def add(self, choice: dict[str, Any]) -> None:
        self.finish = choice.get("finish_reason") or self.finish
        lp = choice.get("logprobs")
        if isinstance(lp, dict) and isinstance(lp.get("content"), list):
            self.logprobs.extend(lp["content"])
        if self.endpoint == TEXT:
            self.text.append(choice.get("text") or "")
            return
        delta = choice.get("delta") or {}
        self.text.append(delta.get("content") or "")
        self.refusal.append(delta.get("refusal") or "")
        for call in delta.get("tool_calls") or ():
            self._merge(call)

    def _merge(self, call: dict[str, Any]) -> None:
        whole = self.calls.setdefault(int(call.get("index", len(self.calls))), {
            "id": "", "type": "function", "function": {"name": "", "arguments": ""}})
        whole["id"] = call.get("id") or whole["id"]
        function = call.get("function") or {}
        whole["function"]["name"] += function.get("name") or ""
        whole["function"]["arguments"] += function.get("arguments") or ""

    def choice(self) -> dict[str, Any]:
        logprobs = {"content": self.logprobs, "refusal": None} if self.logprobs else None
        if self.endpoint == TEXT:
            return {"index": 0, "text": "".join(self.text), "logprobs": None,
                    "finish_reason": self.finish or "stop"}
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.text) or None,
                                   "refusal": "".join(self.refusal) or None}
        if self.calls:
            message["tool_calls"] = [self.calls[i] for i in sorted(self.calls)]
        elif message["content"] is None:
            message["content"] = ""
        return {"index": 0, "message": message, "logprobs": logprobs,
                "finish_reason": self.finish or "stop"}


async def relay_whole(run: Run, request: Request, endpoint: str) -> dict[str, Any]:
    whole = Whole(endpoint)

    async def drain() -> TokenEvent:
        async with contextlib.aclosing(run.events()) as events:
            async for _, event in events:
                run.observe(0, event)
                if event.upstream is not None:
                    whole.add(dict(event.upstream))
                if event.finish_reason is not None:
                    return event
        raise RuntimeError("the stream ended without a final event")

    final = await until_disconnect(run, request, drain())
    await run.record([final])
    if failed(final):
        raise APIError(502, "the provider's stream broke off before the answer was complete",
                       code="upstream_error")
    assert final.usage is not None
    return {**_envelope(run, OBJECTS[endpoint][0]), "choices": [whole.choice()],
            "usage": usage_json(final.usage)}
