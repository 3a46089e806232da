"""The OpenAI-compatible surface: /v1/models, /v1/chat/completions, /v1/completions."""

from __future__ import annotations

import math
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from aicloud.accounts.keys import Principal
from aicloud.api.admission import admit_request, check_prompt_size
from aicloud.api.deps import CurrentPrincipal, PoolDep, parse_body
from aicloud.api.errors import APIError, invalid
from aicloud.api.event_stream import EventStream
from aicloud.api.generation import (
    Completed,
    Format,
    Run,
    Serving,
    begin,
    collect,
    open_run,
    serving,
    stream_events,
    usage_json,
)
from aicloud.api.model_leases import hold
from aicloud.api.openapi import request_body
from aicloud.api.relay import CHAT, TEXT, relay_with_fallbacks
from aicloud.api.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from aicloud.api.tool_calls import chat_prompt
from aicloud.engines.base import (
    RELAY,
    Constraint,
    Engine,
    EngineError,
    Logprob,
    TokenLogprobs,
    Usage,
)
from aicloud.models.pool import Lease, ModelCard, ModelPool, UnknownModel
from aicloud.structured import SchemaError, constraint_for

router = APIRouter(prefix="/v1")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _no_such_model(model: str) -> APIError:
    return APIError(404, f"The model '{model[:128]}' does not exist or you do not have "
                    "access to it.", param="model", code="model_not_found")


KEEP_ALIVE_HEADER = "X-Keep-Alive"
REQUEST_TIMEOUT_HEADER = "X-Request-Timeout"


def _seconds(raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        return math.nan


def keep_alive_of(request: Request) -> float | None:
    """`X-Keep-Alive: SECONDS`: how long the model should stay loaded once idle (OpenAI's
    request schema has no such field, so it travels as a header, like Ollama's keep_alive)."""
    raw = request.headers.get(KEEP_ALIVE_HEADER)
    if raw is None:
        return None
    seconds = _seconds(raw)
    if not math.isfinite(seconds) or seconds < 0:
        raise invalid(f"{KEEP_ALIVE_HEADER} must be a number of seconds (0 or more)",
                      KEEP_ALIVE_HEADER)
    return seconds


def deadline_of(request: Request) -> float | None:
    """`X-Request-Timeout: SECONDS`: the caller wants its answer within that long of its
    arrival, or a 503 at once rather than a late one. The deadline (time.monotonic()) is
    fixed at the first call, which the routes make on arrival, so a fallback model or a
    Responses call keeps it."""
    if hasattr(request.state, "deadline"):
        fixed: float | None = request.state.deadline
        return fixed
    raw = request.headers.get(REQUEST_TIMEOUT_HEADER)
    deadline = None
    if raw is not None:
        seconds = _seconds(raw)
        if not math.isfinite(seconds) or seconds <= 0:
            raise invalid(f"{REQUEST_TIMEOUT_HEADER} must be a number of seconds (more than "
                          "0)", REQUEST_TIMEOUT_HEADER)
        deadline = time.monotonic() + seconds
    request.state.deadline = deadline
    return deadline


async def lease_for(pool: ModelPool, model: str, principal: Principal,
                    keep_alive: float | None = None, deadline: float | None = None) -> Lease:
    """The model, loaded, held for the caller until the lease is released (503 if it is
    not ready by `deadline`); a model outside the key's allow-list or its organization's
    looks exactly like one that does not exist."""
    try:
        return await pool.lease(model, principal.organization_id, principal.may_use,
                                keep_alive, deadline)
    except UnknownModel:
        raise _no_such_model(model) from None


def cold_since_of(request: Request) -> float | None:
    """When the request began waiting for its model's load, if it had to."""
    cold: float | None = getattr(request.state, "cold_since", None)
    return cold


async def engine_for(request: Request, pool: ModelPool, model: str,
                     principal: Principal, deadline: float | None = None) -> Engine:
    """The model, loaded (a request for an unloaded one waits for its load, until
    `deadline` if it has one). A model outside the key's allow-list or its organization's
    looks exactly like one that does not exist."""
    lease = await lease_for(pool, model, principal, keep_alive_of(request), deadline)
    hold(request, lease)
    if lease.cold_since is not None:
        request.state.cold_since = lease.cold_since
    return lease.model


def _model_json(card: ModelCard) -> dict[str, Any]:
    """OpenAI's model object, plus what the model can do ("generate", "embed")."""
    return {"id": card.id, "object": "model", "created": card.created,
            "owned_by": card.owned_by, "capabilities": list(card.capabilities)}


@router.get("/models")
async def list_models(principal: CurrentPrincipal, pool: PoolDep) -> dict[str, Any]:
    """Every model the caller may use, loaded or not."""
    return {"object": "list", "data": [
        _model_json(c) for c in await pool.cards(principal.organization_id, principal.may_use)
    ]}


def _chat_logprob(lp: Logprob) -> dict[str, Any]:
    return {"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.raw)}


@router.get("/models/{model:path}")
async def retrieve_model(model: str, principal: CurrentPrincipal,
                         pool: PoolDep) -> dict[str, Any]:
    entry = await pool.find(model)
    cards = await pool.cards(principal.organization_id, principal.may_use)
    card = next((c for c in cards if entry is not None and c.id == entry.id), None)
    if card is None:
        raise _no_such_model(model)
    return _model_json(card)


class ChatFormat:
    """`logprobs`: OpenAI's `choices[].logprobs.content[]`, one entry per token."""

    object_chunk = "chat.completion.chunk"

    def __init__(self, logprobs: bool = False) -> None:
        self.logprobs = logprobs

    def _logprobs(self, tokens: list[TokenLogprobs], *, whole: bool) -> dict[str, Any] | None:
        if not self.logprobs or not (tokens or whole):
            return None
        return {"content": [{**_chat_logprob(t.chosen),
                             "top_logprobs": [_chat_logprob(a) for a in t.top]}
                            for t in tokens], "refusal": None}

    def chunk(self, run: Run, index: int, text: str, finish: str | None, first: bool,
              logprobs: list[TokenLogprobs]) -> dict[str, Any]:
        delta = {"role": "assistant", "content": text} if first else (
            {"content": text} if text else {})
        return {"id": run.request_id, "object": self.object_chunk, "created": run.created,
                "model": run.model, "system_fingerprint": None,
                "choices": [{"index": index, "delta": delta,
                             "logprobs": self._logprobs(logprobs, whole=False),
                             "finish_reason": finish}]}

    def whole(self, run: Run, choices: list[Completed], usage: Usage) -> dict[str, Any]:
        return {"id": run.request_id, "object": "chat.completion", "created": run.created,
                "model": run.model, "system_fingerprint": None,
                "choices": [{"index": c.index,
                             "message": {"role": "assistant", "content": c.text},
                             "logprobs": self._logprobs(c.logprobs, whole=True),
                             "finish_reason": c.finish} for c in choices],
                "usage": usage_json(usage)}


class TextFormat:
    """`logprobs`: the legacy `{tokens, token_logprobs, top_logprobs, text_offset}`, where
    `top_logprobs` maps the k best tokens and the chosen one to their logprobs. `echo`:
    each prompt's text, put before its choices' text."""

    object_chunk = "text_completion"

    def __init__(self, n: int = 1, logprobs: int | None = None,
                 echo: list[str] | None = None) -> None:
        self.n = n
        self.logprobs = logprobs
        self.echo = echo
        self._offsets: dict[int, int] = {}  # streamed text so far, per choice

    def _logprobs(self, tokens: list[TokenLogprobs], offset: int) -> dict[str, Any]:
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t.chosen.token)
        return {"tokens": [t.chosen.token for t in tokens],
                "token_logprobs": [t.chosen.logprob for t in tokens],
                "top_logprobs": [{**{a.token: a.logprob for a in t.top},
                                  t.chosen.token: t.chosen.logprob} for t in tokens],
                "text_offset": offsets}

    def _prefix(self, index: int) -> str:
        return self.echo[index // self.n] if self.echo else ""

    def _choice(self, index: int, text: str, finish: str | None,
                logprobs: dict[str, Any] | None) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def _envelope(self, run: Run, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": run.request_id, "object": self.object_chunk, "created": run.created,
                "model": run.model, "system_fingerprint": None, "choices": choices}

    def chunk(self, run: Run, index: int, text: str, finish: str | None, first: bool,
              logprobs: list[TokenLogprobs]) -> dict[str, Any]:
        if first:
            text = self._prefix(index) + text
        lps = None
        if self.logprobs is not None and logprobs:
            offset = self._offsets.get(index, 0)
            lps = self._logprobs(logprobs, offset)
            self._offsets[index] = offset + sum(len(t.chosen.token) for t in logprobs)
        return self._envelope(run, [self._choice(index, text, finish, lps)])

    def whole(self, run: Run, choices: list[Completed], usage: Usage) -> dict[str, Any]:
        return {**self._envelope(run, [self._choice(
            c.index, self._prefix(c.index) + c.text, c.finish,
            None if self.logprobs is None else self._logprobs(c.logprobs, 0))
            for c in choices]), "usage": usage_json(usage)}


async def _respond(request: Request, run: Run, fmt: Format,
                   stream: bool, include_usage: bool) -> StreamingResponse | JSONResponse:
    await begin(run, request)
    if stream:
        return EventStream(stream_events(run, fmt, include_usage),
                           media_type="text/event-stream",
                           headers={**SSE_HEADERS, **_headers(run)})
    choices, usage = await collect(run, request)
    return JSONResponse(fmt.whole(run, choices, usage), headers=_headers(run))


def _headers(run: Run) -> dict[str, str]:
    """Rate-limit headers, and the completion id as the request id (the openai SDK's
    `_request_id`), so a client can quote either to find the usage row."""
    return {**run.admission.headers, "x-request-id": run.request_id}


def _include_usage(body: ChatCompletionRequest | CompletionRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


async def _constraint(body: SamplingFields) -> Constraint | None:
    """Compiled before admission and queueing: a schema that cannot run is a 400."""
    fmt = body.response_format
    if fmt is None:
        return None
    try:
        return await constraint_for(fmt.type, fmt.schema_document)
    except SchemaError as exc:
        raise invalid(exc.message, "response_format") from None


@router.post("/chat/completions", response_model=None,
             **request_body(ChatCompletionRequest))
async def chat_completions(request: Request, principal: CurrentPrincipal,
                           pool: PoolDep) -> StreamingResponse | JSONResponse:
    deadline_of(request)  # counted from arrival
    body = await parse_body(request, ChatCompletionRequest, text_fields=("messages",))
    return await run_chat(request, principal, pool, body)


async def run_chat(request: Request, principal: Principal, pool: ModelPool,
                   body: ChatCompletionRequest, id_prefix: str = "chatcmpl"
                   ) -> StreamingResponse | JSONResponse:
    """One chat completion, whoever asked for it (the chat route, or a Responses call,
    whose ledger rows then carry the response's id)."""
    deadline = deadline_of(request)
    engine = await engine_for(request, pool, body.model, principal, deadline)
    if engine.info().can(RELAY):  # a provider's model: relayed as sent, nothing rendered
        return await relay_with_fallbacks(
            request, principal, body, CHAT, id_prefix, engine,
            lambda name: engine_for(request, pool, name, principal, deadline),
            lambda name: run_chat(request, principal, pool,
                                  body.model_copy(update={"model": name}), id_prefix))
    run, fmt = await open_chat(serving(request), principal, engine, body, id_prefix,
                               cold_since=cold_since_of(request), deadline=deadline)
    return await _respond(request, run, fmt, body.stream, _include_usage(body))


def not_local(model: str) -> APIError:
    """A provider's model is relayed by the HTTP routes only: a batch line runs on a local
    engine, whose scheduler can put it behind interactive work."""
    return invalid(f"model {model} is served by a partner provider, which batches cannot "
                   "use yet", "model")


async def open_chat(serving: Serving, principal: Principal, engine: Engine,
                    body: ChatCompletionRequest, id_prefix: str = "chatcmpl",
                    batch_line: str | None = None, cold_since: float | None = None,
                    deadline: float | None = None) -> tuple[Run, Format]:
    """Check, tokenize and admit a chat completion and start it on `engine` (leased from
    the pool by the caller): the part an HTTP request and a batch line share (see
    `open_run` for `batch_line` and `deadline`)."""
    cloud = serving.cloud
    if engine.info().can(RELAY):
        raise not_local(body.model)
    # cheap refusals before the prompt is tokenized: requests per minute, then its size
    requests = await admit_request(cloud, principal)
    prompt = await chat_prompt(body, engine)  # tools: checked, compiled, rendered as text
    # a grammar from the tools (which refuse a JSON response_format beside them) or from
    # response_format
    constraint = prompt.constraint or await _constraint(body)
    check_prompt_size(sum(len(m.content) + len(m.name or "") for m in prompt.messages),
                      engine.info().context_length, "messages")
    try:
        tokens = await engine.encode_chat(prompt.messages, prompt.tools)
    except EngineError as exc:
        raise invalid(exc.message, exc.param or "messages", exc.code) from None
    # billed, priced and answered as the catalog's id, whichever alias the caller used
    run = await open_run(serving, engine, principal, engine.info().model_id, [tokens], body,
                         body.completion_limit, id_prefix, body.top_logprobs_wanted,
                         requests, constraint, batch_line, cold_since, deadline)
    plain = ChatFormat(bool(body.logprobs))
    return run, prompt.answer_format(plain) or plain


@router.post("/completions", response_model=None, **request_body(CompletionRequest))
async def completions(request: Request, principal: CurrentPrincipal,
                      pool: PoolDep) -> StreamingResponse | JSONResponse:
    deadline_of(request)  # counted from arrival
    body = await parse_body(request, CompletionRequest, text_fields=("prompt",))
    return await run_completion(request, principal, pool, body)


async def run_completion(request: Request, principal: Principal, pool: ModelPool,
                         body: CompletionRequest) -> StreamingResponse | JSONResponse:
    deadline = deadline_of(request)
    engine = await engine_for(request, pool, body.model, principal, deadline)
    if engine.info().can(RELAY):
        return await relay_with_fallbacks(
            request, principal, body, TEXT, "cmpl", engine,
            lambda name: engine_for(request, pool, name, principal, deadline),
            lambda name: run_completion(request, principal, pool,
                                        body.model_copy(update={"model": name})))
    run, fmt = await open_completion(serving(request), principal, engine, body,
                                     cold_since=cold_since_of(request), deadline=deadline)
    return await _respond(request, run, fmt, body.stream, _include_usage(body))


async def open_completion(serving: Serving, principal: Principal, engine: Engine,
                          body: CompletionRequest, batch_line: str | None = None,
                          cold_since: float | None = None, deadline: float | None = None
                          ) -> tuple[Run, Format]:
    """Check, tokenize and admit a text completion and start it (see `open_chat`)."""
    cloud = serving.cloud
    if engine.info().can(RELAY):
        raise not_local(body.model)
    constraint = await _constraint(body)
    prompts = body.prompts
    if body.echo and not all(isinstance(p, str) for p in prompts):
        raise invalid("echo needs text prompts (not token ids)", "echo")
    # cheap refusals before any prompt is tokenized: requests per minute, then the size
    # (token ids need no tokenizing: the engine counts them)
    requests = await admit_request(cloud, principal)
    context = engine.info().context_length
    for prompt in prompts:
        if isinstance(prompt, str):
            check_prompt_size(len(prompt), context, "prompt")
    tokens = [await engine.encode_text(p) if isinstance(p, str) else list(p) for p in prompts]
    run = await open_run(serving, engine, principal, engine.info().model_id, tokens, body,
                         body.max_tokens if body.max_tokens is not None else 16, "cmpl",
                         body.logprobs, requests, constraint, batch_line, cold_since,
                         deadline)
    echo = [p for p in prompts if isinstance(p, str)] if body.echo else None
    return run, TextFormat(body.choices, body.logprobs, echo)
