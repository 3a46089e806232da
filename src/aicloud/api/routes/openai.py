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
    Run,
    collect,
    first_event,
    open_run,
    stream_events,
    usage_json,
)
from aicloud.api.openapi import request_body
from aicloud.api.schemas import ChatCompletionRequest, CompletionRequest
from aicloud.engines.base import ChatMessage, Engine, EngineError, Usage
from aicloud.models.pool import ModelPool, UnknownModel
from aicloud.services import Cloud

router = APIRouter(prefix="/v1")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _engine(pool: ModelPool, model: str, principal: Principal) -> Engine:
    """A model outside the key's allow-list looks exactly like one that does not exist."""
    try:
        if not principal.may_use(model):
            raise UnknownModel(model)
        return pool.get(model)
    except UnknownModel:
        raise APIError(404, f"The model '{model[:128]}' does not exist or you do not have "
                       "access to it.", param="model", code="model_not_found") from None


@router.get("/models")
async def list_models(principal: CurrentPrincipal, pool: PoolDep) -> dict[str, Any]:
    return {"object": "list", "data": [
        {"id": c.id, "object": "model", "created": c.created, "owned_by": c.owned_by}
        for c in pool.cards() if principal.may_use(c.id)
    ]}


class ChatFormat:
    object_chunk = "chat.completion.chunk"

    def chunk(self, run: Run, text: str, finish: str | None, first: bool) -> dict[str, Any]:
        delta = {"role": "assistant", "content": text} if first else (
            {"content": text} if text else {})
        return {"id": run.request_id, "object": self.object_chunk, "created": run.created,
                "model": run.model, "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": finish}]}

    def whole(self, run: Run, text: str, finish: str, usage: Usage) -> dict[str, Any]:
        return {"id": run.request_id, "object": "chat.completion", "created": run.created,
                "model": run.model, "system_fingerprint": None,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": finish}],
                "usage": usage_json(usage)}


class TextFormat:
    object_chunk = "text_completion"

    def chunk(self, run: Run, text: str, finish: str | None, first: bool) -> dict[str, Any]:
        return {"id": run.request_id, "object": self.object_chunk, "created": run.created,
                "model": run.model, "system_fingerprint": None,
                "choices": [{"index": 0, "text": text, "logprobs": None,
                             "finish_reason": finish}]}

    def whole(self, run: Run, text: str, finish: str, usage: Usage) -> dict[str, Any]:
        return {**self.chunk(run, text, finish, True), "usage": usage_json(usage)}


async def _respond(request: Request, run: Run, fmt: ChatFormat | TextFormat,
                   stream: bool, include_usage: bool) -> StreamingResponse | JSONResponse:
    if stream:
        events, first = await first_event(run, request)
        return StreamingResponse(stream_events(run, fmt, include_usage, events, first),
                                 media_type="text/event-stream",
                                 headers={**SSE_HEADERS, **run.admission.headers})
    text, finish, usage = await collect(run, request)
    return JSONResponse(fmt.whole(run, text, finish, usage), headers=run.admission.headers)


def _include_usage(body: ChatCompletionRequest | CompletionRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


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
    engine = _engine(pool, body.model, principal)
    # cheap refusals before the prompt is tokenized: requests per minute, then its size
    requests = await admit_request(cloud, principal)
    messages = [ChatMessage(m.role, m.text, m.name) for m in body.messages]
    check_prompt_size(sum(len(m.content) + len(m.name or "") for m in messages),
                      engine.info().context_length, "messages")
    try:
        tokens = await engine.encode_chat(messages)
    except EngineError as exc:
        raise invalid(exc.message, exc.param or "messages", exc.code) from None
    run = await open_run(request, engine, principal, body.model, tokens, body,
                         body.completion_limit, id_prefix, requests)
    return await _respond(request, run, ChatFormat(), body.stream, _include_usage(body))


@router.post("/completions", response_model=None, **request_body(CompletionRequest))
async def completions(request: Request, principal: CurrentPrincipal,
                      pool: PoolDep, cloud: CloudDep) -> StreamingResponse | JSONResponse:
    body = await parse_body(request, CompletionRequest, text_fields=("prompt",))
    engine = _engine(pool, body.model, principal)
    requests = await admit_request(cloud, principal)
    prompt = body.prompt
    if isinstance(prompt, str):  # token ids need no tokenizing: the engine counts them
        check_prompt_size(len(prompt), engine.info().context_length, "prompt")
        tokens = await engine.encode_text(prompt)
    else:
        tokens = list(prompt)
    run = await open_run(request, engine, principal, body.model, tokens, body,
                         body.max_tokens if body.max_tokens is not None else 16, "cmpl",
                         requests)
    return await _respond(request, run, TextFormat(), body.stream, _include_usage(body))
