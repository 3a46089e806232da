"""The OpenAI-compatible surface: /v1/models, /v1/chat/completions, /v1/completions."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from aicloud.accounts.keys import Principal
from aicloud.api.deps import CurrentPrincipal, PoolDep, parse_body
from aicloud.api.errors import APIError, invalid
from aicloud.api.generation import (
    Format,
    Run,
    collect,
    first_event,
    open_run,
    stream_events,
    usage_json,
)
from aicloud.api.schemas import ChatCompletionRequest, CompletionRequest
from aicloud.api.tool_calls import chat_prompt
from aicloud.engines.base import Engine, EngineError, Usage
from aicloud.models.pool import ModelPool, UnknownModel

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


async def _respond(request: Request, run: Run, fmt: Format,
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


@router.post("/chat/completions", response_model=None)
async def chat_completions(request: Request, principal: CurrentPrincipal,
                           pool: PoolDep) -> StreamingResponse | JSONResponse:
    body = await parse_body(request, ChatCompletionRequest)
    engine = _engine(pool, body.model, principal)
    prompt = await chat_prompt(body, engine)
    try:
        tokens = await engine.encode_chat(prompt.messages, prompt.tools)
    except EngineError as exc:
        raise invalid(exc.message, exc.param or "messages", exc.code) from None
    run = await open_run(request, engine, principal, body.model, tokens, body,
                         body.completion_limit, "chatcmpl", prompt.constraint)
    fmt = prompt.answer_format() or ChatFormat()
    return await _respond(request, run, fmt, body.stream, _include_usage(body))


@router.post("/completions", response_model=None)
async def completions(request: Request, principal: CurrentPrincipal,
                      pool: PoolDep) -> StreamingResponse | JSONResponse:
    body = await parse_body(request, CompletionRequest)
    engine = _engine(pool, body.model, principal)
    prompt = body.prompt
    tokens = await engine.encode_text(prompt) if isinstance(prompt, str) else list(prompt)
    run = await open_run(request, engine, principal, body.model, tokens, body,
                         body.max_tokens if body.max_tokens is not None else 16, "cmpl")
    return await _respond(request, run, TextFormat(), body.stream, _include_usage(body))
