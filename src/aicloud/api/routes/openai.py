"""The OpenAI-compatible surface: /v1/models, /v1/chat/completions, /v1/completions."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from aicloud.accounts.keys import Principal
from aicloud.api.deps import CurrentPrincipal, PoolDep, parse_body
from aicloud.api.errors import APIError, invalid
from aicloud.api.generation import (
    Run,
    collect,
    first_event,
    open_run,
    stream_events,
    usage_json,
)
from aicloud.api.schemas import ChatCompletionRequest, CompletionRequest
from aicloud.engines.base import ChatMessage, Engine, EngineError, Usage
from aicloud.models.pool import ModelCard, ModelPool, UnknownModel

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


@router.get("/models/{model:path}")
async def retrieve_model(model: str, principal: CurrentPrincipal,
                         pool: PoolDep) -> dict[str, Any]:
    card = next((c for c in pool.cards() if c.id == model), None)
    if card is None or not principal.may_use(model):
        raise _no_such_model(model)
    return _model_json(card)


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
                                 headers={**SSE_HEADERS, **_headers(run)})
    text, finish, usage = await collect(run, request)
    return JSONResponse(fmt.whole(run, text, finish, usage), headers=_headers(run))


def _headers(run: Run) -> dict[str, str]:
    """Rate-limit headers, and the completion id as the request id (the openai SDK's
    `_request_id`), so a client can quote either to find the usage row."""
    return {**run.admission.headers, "x-request-id": run.request_id}


def _include_usage(body: ChatCompletionRequest | CompletionRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


@router.post("/chat/completions", response_model=None)
async def chat_completions(request: Request, principal: CurrentPrincipal,
                           pool: PoolDep) -> StreamingResponse | JSONResponse:
    body = await parse_body(request, ChatCompletionRequest)
    engine = engine_for(pool, body.model, principal)
    messages = [ChatMessage(m.role, m.text, m.name) for m in body.messages]
    try:
        tokens = await engine.encode_chat(messages)
    except EngineError as exc:
        raise invalid(exc.message, exc.param or "messages", exc.code) from None
    run = await open_run(request, engine, principal, body.model, tokens, body,
                         body.completion_limit, "chatcmpl")
    return await _respond(request, run, ChatFormat(), body.stream, _include_usage(body))


@router.post("/completions", response_model=None)
async def completions(request: Request, principal: CurrentPrincipal,
                      pool: PoolDep) -> StreamingResponse | JSONResponse:
    body = await parse_body(request, CompletionRequest)
    engine = engine_for(pool, body.model, principal)
    prompt = body.prompt
    tokens = await engine.encode_text(prompt) if isinstance(prompt, str) else list(prompt)
    run = await open_run(request, engine, principal, body.model, tokens, body,
                         body.max_tokens if body.max_tokens is not None else 16, "cmpl")
    return await _respond(request, run, TextFormat(), body.stream, _include_usage(body))
