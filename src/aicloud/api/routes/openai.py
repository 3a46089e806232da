"""The OpenAI-compatible surface: /v1/models, /v1/chat/completions, /v1/completions."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from aicloud.accounts.keys import Principal
from aicloud.api.admission import admit_request, check_prompt_size
from aicloud.api.deps import CloudDep, CurrentPrincipal, PoolDep, parse_body
from aicloud.api.errors import APIError, invalid
from aicloud.api.generation import (
    Completed,
    Format,
    Run,
    begin,
    collect,
    open_run,
    stream_events,
    usage_json,
)
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
from aicloud.models.pool import ModelCard, ModelPool, UnknownModel
from aicloud.services import Cloud
from aicloud.structured import SchemaError, constraint_for

router = APIRouter(prefix="/v1")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _no_such_model(model: str) -> APIError:
    return APIError(404, f"The model '{model[:128]}' does not exist or you do not have "
                    "access to it.", param="model", code="model_not_found")


def engine_for(pool: ModelPool, model: str, principal: Principal) -> Engine:
    """A model outside the key's allow-list looks exactly like one that does not exist."""
    try:
        if not principal.may_use(model):
            raise UnknownModel(model)
        return pool.get(model)
    except UnknownModel:
        raise _no_such_model(model) from None


def _model_json(card: ModelCard) -> dict[str, Any]:
    """OpenAI's model object, plus what the model can do ("generate", "embed")."""
    return {"id": card.id, "object": "model", "created": card.created,
            "owned_by": card.owned_by, "capabilities": list(card.capabilities)}


@router.get("/models")
async def list_models(principal: CurrentPrincipal, pool: PoolDep) -> dict[str, Any]:
    return {"object": "list", "data": [
        _model_json(c) for c in pool.cards() if principal.may_use(c.id)
    ]}


def _chat_logprob(lp: Logprob) -> dict[str, Any]:
    return {"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.raw)}


@router.get("/models/{model:path}")
async def retrieve_model(model: str, principal: CurrentPrincipal,
                         pool: PoolDep) -> dict[str, Any]:
    card = next((c for c in pool.cards() if c.id == model), None)
    if card is None or not principal.may_use(model):
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
        return StreamingResponse(stream_events(run, fmt, include_usage),
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
    body = await parse_body(request, ChatCompletionRequest, text_fields=("messages",))
    return await run_chat(request, principal, pool, body)


async def run_chat(request: Request, principal: Principal, pool: ModelPool,
                   body: ChatCompletionRequest, id_prefix: str = "chatcmpl"
                   ) -> StreamingResponse | JSONResponse:
    """One chat completion, whoever asked for it (the chat route, or a Responses call,
    whose ledger rows then carry the response's id)."""
    cloud: Cloud = request.app.state.cloud
    engine = engine_for(pool, body.model, principal)
    if engine.info().can(RELAY):  # a provider's model: relayed as sent, nothing rendered
        return await relay_with_fallbacks(
            request, principal, body, CHAT, id_prefix,
            lambda name: engine_for(pool, name, principal),
            lambda name: run_chat(request, principal, pool,
                                  body.model_copy(update={"model": name}), id_prefix))
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
    run = await open_run(request, engine, principal, body.model, [tokens], body,
                         body.completion_limit, id_prefix, body.top_logprobs_wanted,
                         requests, constraint)
    plain = ChatFormat(bool(body.logprobs))
    fmt = prompt.answer_format(plain) or plain
    return await _respond(request, run, fmt, body.stream, _include_usage(body))


@router.post("/completions", response_model=None, **request_body(CompletionRequest))
async def completions(request: Request, principal: CurrentPrincipal,
                      pool: PoolDep, cloud: CloudDep) -> StreamingResponse | JSONResponse:
    body = await parse_body(request, CompletionRequest, text_fields=("prompt",))
    return await run_completion(request, principal, pool, cloud, body)


async def run_completion(request: Request, principal: Principal, pool: ModelPool,
                         cloud: Cloud, body: CompletionRequest
                         ) -> StreamingResponse | JSONResponse:
    engine = engine_for(pool, body.model, principal)
    if engine.info().can(RELAY):
        return await relay_with_fallbacks(
            request, principal, body, TEXT, "cmpl",
            lambda name: engine_for(pool, name, principal),
            lambda name: run_completion(request, principal, pool, cloud,
                                        body.model_copy(update={"model": name})))
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
    run = await open_run(request, engine, principal, body.model, tokens, body,
                         body.max_tokens if body.max_tokens is not None else 16, "cmpl",
                         body.logprobs, requests, constraint)
    echo = [p for p in prompts if isinstance(p, str)] if body.echo else None
    fmt = TextFormat(body.choices, body.logprobs, echo)
    return await _respond(request, run, fmt, body.stream, _include_usage(body))
