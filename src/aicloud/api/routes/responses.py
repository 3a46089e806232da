"""OpenAI's Responses API: `POST /v1/responses` (streamed or not), and stored responses
(`GET`, `DELETE`, `input_items`), each visible only to the project that made it.

A response runs as one chat completion through `run_chat`, so every chat rule (limits,
budgets, fairness, tools, structured output, billing, cancellation on disconnect) holds
here unchanged; this module maps shapes (responses/items.py) and keeps the store.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterable, AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from aicloud.accounts.keys import Principal
from aicloud.api.deps import CloudDep, CurrentPrincipal, PoolDep, parse_body
from aicloud.api.errors import APIError, invalid, validation_message
from aicloud.api.event_stream import EventStream
from aicloud.api.openapi import request_body
from aicloud.api.routes.openai import SSE_HEADERS, deadline_of, run_chat
from aicloud.api.schemas import ChatCompletionRequest
from aicloud.responses.items import (
    CHAT_PARAMS,
    EventWriter,
    ResponseObject,
    chat_messages,
    chat_request,
    input_items,
    new_id,
    output_of,
)
from aicloud.responses.schema import ResponseCreate
from aicloud.services import Cloud

router = APIRouter(prefix="/v1")

# headers of the inner chat response that describe the body, not the request
BODY_HEADERS = {"content-length", "content-type"}


def _not_found(response_id: str, param: str | None = None) -> APIError:
    what = "Previous response" if param else "Response"
    return APIError(404, f"{what} with id '{response_id[:64]}' not found.", param=param,
                    code="not_found" if param is None else "previous_response_not_found")


def _as_responses_error(exc: APIError) -> APIError:
    """The chat layer names chat fields; the caller sent Responses fields."""
    exc.param = CHAT_PARAMS.get(exc.param or "", exc.param)
    return exc


def _chat_body(body: ResponseCreate, conversation: list[dict[str, Any]]
               ) -> ChatCompletionRequest:
    data = chat_request(body, chat_messages(body.instructions, conversation))
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        message, param = validation_message(exc.errors(include_url=False))
        raise _as_responses_error(invalid(message, param)) from None


def _with_ids(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stored input items get ids, as OpenAI lists them with ids."""
    prefix = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}
    return [item if item.get("id") else {"id": new_id(prefix.get(item.get("type", ""),
                                                                 "item")), **item}
            for item in items]


@router.post("/responses", response_model=None, **request_body(ResponseCreate))
async def create_response(request: Request, principal: CurrentPrincipal, pool: PoolDep,
                          cloud: CloudDep) -> JSONResponse | StreamingResponse:
    deadline_of(request)  # counted from arrival (run_chat keeps it)
    body = await parse_body(request, ResponseCreate)
    history: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        previous = await cloud.responses.get(principal.project_id, body.previous_response_id)
        if previous is None:
            raise _not_found(body.previous_response_id, "previous_response_id")
        history = previous.context
    items = _with_ids(input_items(body))
    conversation = history + items
    chat = _chat_body(body, conversation)
    try:
        result = await run_chat(request, principal, pool, chat, id_prefix="resp")
    except APIError as exc:
        raise _as_responses_error(exc) from None
    response = ResponseObject("", body)  # takes the chat completion's id, the ledger's key
    headers = {k: v for k, v in result.headers.items() if k not in BODY_HEADERS}
    if isinstance(result, StreamingResponse):
        return EventStream(
            _events(result.body_iterator, EventWriter(response), cloud, principal, items,
                    conversation),
            media_type="text/event-stream", headers={**headers, **SSE_HEADERS})
    completion = json.loads(bytes(result.body))
    response.id = completion["id"]
    response.output, finish = output_of(completion)
    response.finish(finish, completion.get("usage"))
    await _store(cloud, principal, response, items, conversation)
    return JSONResponse(response.json(), headers=headers)


async def _store(cloud: Cloud, principal: Principal, response: ResponseObject,
                 items: list[dict[str, Any]], conversation: list[dict[str, Any]]) -> None:
    if response.body.store:
        await cloud.responses.save(principal.project_id, response.json(), items,
                                   conversation + response.output)


def _sse(event: dict[str, Any]) -> bytes:
    data = json.dumps(event, ensure_ascii=False)
    return f"event: {event['type']}\ndata: {data}\n\n".encode()


async def _chat_chunks(body: AsyncIterable[Any]) -> AsyncIterator[dict[str, Any]]:
    """The chat stream's `data:` payloads, parsed back (one code path for every chat
    rule costs a JSON round trip per chunk, a few microseconds)."""
    buffer = b""
    async for raw in body:
        buffer += raw if isinstance(raw, bytes) else str(raw).encode()
        while b"\n\n" in buffer:
            frame, buffer = buffer.split(b"\n\n", 1)
            for line in frame.split(b"\n"):
                if line.startswith(b"data: ") and line[6:] != b"[DONE]":
                    yield json.loads(line[6:])


async def _events(chat: AsyncIterable[Any], writer: EventWriter, cloud: Cloud,
                  principal: Principal, items: list[dict[str, Any]],
                  conversation: list[dict[str, Any]]) -> AsyncIterator[bytes]:
    """Responses events for a chat stream. Closing this (the client left) closes the chat
    stream, which cancels the sequence and bills what it produced."""
    try:
        started = False
        async for chunk in _chat_chunks(chat):
            if not started:
                writer.response.id = chunk.get("id", "")
                for event in writer.start():
                    yield _sse(event)
                started = True
            if "error" in chunk:
                for event in writer.fail(chunk["error"]):
                    yield _sse(event)
                return
            for event in writer.chunk(chunk):
                yield _sse(event)
        closing = list(writer.finish())
        await _store(cloud, principal, writer.response, items, conversation)
        for event in closing:
            yield _sse(event)
    finally:
        with contextlib.suppress(Exception):
            await chat.aclose()  # type: ignore[attr-defined]


@router.get("/responses/{response_id}")
async def get_response(response_id: str, principal: CurrentPrincipal,
                       cloud: CloudDep) -> dict[str, Any]:
    stored = await cloud.responses.get(principal.project_id, response_id)
    if stored is None:
        raise _not_found(response_id)
    return stored.body


@router.delete("/responses/{response_id}")
async def delete_response(response_id: str, principal: CurrentPrincipal,
                          cloud: CloudDep) -> dict[str, Any]:
    if not await cloud.responses.delete(principal.project_id, response_id):
        raise _not_found(response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}


@router.get("/responses/{response_id}/input_items")
async def list_input_items(
    response_id: str, principal: CurrentPrincipal, cloud: CloudDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
    after: Annotated[str | None, Query(max_length=64)] = None,
) -> dict[str, Any]:
    stored = await cloud.responses.get(principal.project_id, response_id)
    if stored is None:
        raise _not_found(response_id)
    items = stored.input_items if order == "asc" else stored.input_items[::-1]
    if after is not None:
        ids = [item.get("id") for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    page = items[:limit]
    return {"object": "list", "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > limit}
