"""Translating between Responses items and chat completions.

A response is run as one chat completion, so tools, structured output, limits, budgets,
fairness and billing behave exactly as on `/v1/chat/completions`; this module only maps
the shapes: items and `instructions` to chat messages, the chat answer back to output
items, and the chat stream's chunks to Responses' typed events.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aicloud.responses.schema import (
    FunctionCallItem,
    FunctionCallOutputItem,
    Item,
    MessageItem,
    ResponseCreate,
)

# what the chat validator calls a field, and what the caller of /v1/responses sent
CHAT_PARAMS = {
    "messages": "input",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text.format",
    "logprobs": "include",
    "cache_salt": "prompt_cache_key",
}


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


def input_items(body: ResponseCreate) -> list[dict[str, Any]]:
    """The request's own input as stored items (a string is one user message)."""
    if isinstance(body.input, str):
        return [{"type": "message", "role": "user",
                 "content": [{"type": "input_text", "text": body.input}]}]
    return [item.model_dump(mode="json", exclude_none=True) for item in body.input]


def parse_item(raw: dict[str, Any]) -> Item:
    kind = raw.get("type", "message")
    if kind == "function_call":
        return FunctionCallItem.model_validate(raw)
    if kind == "function_call_output":
        return FunctionCallOutputItem.model_validate(raw)
    return MessageItem.model_validate(raw)


def chat_messages(instructions: str | None, items: list[dict[str, Any]]
                  ) -> list[dict[str, Any]]:
    """Chat messages for a conversation of stored items. Consecutive function calls become
    one assistant message with several `tool_calls`, joined to the assistant text right
    before them, as a chat model would have produced them."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    for item in map(parse_item, items):
        if isinstance(item, MessageItem):
            messages.append({"role": item.role, "content": item.text})
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id,
                             "content": item.text})
        else:
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_call_id" not in last:
                last.setdefault("tool_calls", []).append(call)
                if not last.get("content"):
                    last["content"] = None
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    return messages


def chat_request(body: ResponseCreate, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat completion that runs this response (only the fields that were set)."""
    chat: dict[str, Any] = {"model": body.model, "messages": messages, "stream": body.stream}
    if body.stream:
        chat["stream_options"] = {"include_usage": True}
    optional = {
        "max_completion_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "parallel_tool_calls": body.parallel_tool_calls,
        "user": body.user or body.safety_identifier,
        "service_tier": body.service_tier,
        # OpenAI's cache routing key: here it partitions the prefix cache further
        "cache_salt": body.prompt_cache_key,
    }
    chat.update({k: v for k, v in optional.items() if v is not None})
    if body.tools:
        chat["tools"] = [{"type": "function", "function": tool.model_dump(
            exclude_none=True, exclude={"type"})} for tool in body.tools]
    if body.tool_choice is not None:
        chat["tool_choice"] = body.tool_choice if isinstance(body.tool_choice, str) else {
            "type": "function", "function": {"name": body.tool_choice.name}}
    fmt = body.format
    if fmt is not None and fmt.type != "text":
        chat["response_format"] = {"type": fmt.type} if fmt.type == "json_object" else {
            "type": "json_schema", "json_schema": {
                k: v for k, v in {"name": fmt.name, "schema": fmt.schema_,
                                  "description": fmt.description,
                                  "strict": fmt.strict}.items() if v is not None}}
    if body.wants_logprobs:
        chat["logprobs"] = True
        if body.top_logprobs is not None:
            chat["top_logprobs"] = body.top_logprobs
    return chat


def usage(chat_usage: dict[str, Any] | None) -> dict[str, Any] | None:
    if chat_usage is None:
        return None
    cached = (chat_usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {
        "input_tokens": chat_usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": chat_usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": chat_usage["total_tokens"],
    }


@dataclass(slots=True)
class ResponseObject:
    """The response being built: its settings echo the request, as OpenAI's do."""

    id: str
    body: ResponseCreate
    created_at: int = field(default_factory=lambda: int(time.time()))
    output: list[dict[str, Any]] = field(default_factory=list)
    status: str = "in_progress"
    usage: dict[str, Any] | None = None
    incomplete: bool = False
    error: dict[str, Any] | None = None

    def finish(self, finish_reason: str | None, chat_usage: dict[str, Any] | None) -> None:
        self.incomplete = finish_reason == "length"
        self.status = "incomplete" if self.incomplete else "completed"
        self.usage = usage(chat_usage)
        for item in self.output:
            item["status"] = "incomplete" if self.incomplete and item["type"] == "message" \
                else "completed"

    def json(self) -> dict[str, Any]:
        body = self.body
        fmt = body.format
        tool_choice: Any = body.tool_choice or "auto"
        if not isinstance(tool_choice, str):
            tool_choice = {"type": "function", "name": tool_choice.name}
        return {
            "id": self.id, "object": "response", "created_at": self.created_at,
            "status": self.status, "error": self.error,
            "incomplete_details": {"reason": "max_output_tokens"} if self.incomplete else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "model": body.model, "output": self.output,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id,
            "temperature": body.temperature, "top_p": body.top_p,
            "tool_choice": tool_choice,
            "tools": [t.model_dump(mode="json") for t in body.tools or []],
            "text": {"format": fmt.model_dump(mode="json", by_alias=True, exclude_none=True)
                     if fmt else {"type": "text"}},
            "truncation": "disabled", "top_logprobs": body.top_logprobs,
            "usage": self.usage, "user": body.user, "metadata": body.metadata or {},
            "service_tier": body.service_tier, "store": body.store,
        }


def message_item(text: str, logprobs: list[dict[str, Any]] | None,
                 status: str = "completed") -> dict[str, Any]:
    return {"id": new_id("msg"), "type": "message", "role": "assistant", "status": status,
            "content": [text_part(text, logprobs)]}


def text_part(text: str, logprobs: list[dict[str, Any]] | None) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [],
            "logprobs": logprobs or []}


def call_item(call_id: str, name: str, arguments: str, status: str = "completed"
              ) -> dict[str, Any]:
    return {"id": new_id("fc"), "type": "function_call", "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def output_of(completion: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    """Output items of a whole chat completion, and its finish reason."""
    choice = completion["choices"][0]
    message = choice["message"]
    items: list[dict[str, Any]] = []
    logprobs = (choice.get("logprobs") or {}).get("content")
    if message.get("content") or not message.get("tool_calls"):
        items.append(message_item(message.get("content") or "", logprobs))
    for call in message.get("tool_calls") or []:
        items.append(call_item(call["id"], call["function"]["name"],
                               call["function"]["arguments"]))
    return items, choice.get("finish_reason")


class EventWriter:
    """Turns chat chunks into Responses' streaming events, in the order OpenAI sends them:
    an item is added before its deltas and done after them, and `response.completed`
    carries the whole response."""

    def __init__(self, response: ResponseObject) -> None:
        self.response = response
        self._seq = 0
        self._text: dict[str, Any] | None = None  # the open message item
        self._calls: dict[int, dict[str, Any]] = {}  # chat tool-call index -> open item
        self._finish: str | None = None

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        self._seq += 1
        return {"type": kind, "sequence_number": self._seq - 1, **fields}

    def start(self) -> Iterator[dict[str, Any]]:
        snapshot = self.response.json()
        yield self.event("response.created", response=snapshot)
        yield self.event("response.in_progress", response=snapshot)

    def chunk(self, chunk: dict[str, Any]) -> Iterator[dict[str, Any]]:
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                logprobs = (choice.get("logprobs") or {}).get("content") or []
                yield from self._text_delta(delta["content"], logprobs)
            for call in delta.get("tool_calls") or []:
                yield from self._call_delta(call)
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
        if chunk.get("usage") is not None:
            self.response.usage = chunk["usage"]

    def _text_delta(self, text: str, logprobs: list[dict[str, Any]]
                    ) -> Iterator[dict[str, Any]]:
        index = len(self.response.output)
        if self._text is None:
            self._text = message_item("", [], status="in_progress")
            self.response.output.append(self._text)
            yield self.event("response.output_item.added", output_index=index,
                             item={**self._text, "content": []})
            yield self.event("response.content_part.added", item_id=self._text["id"],
                             output_index=index, content_index=0, part=text_part("", []))
        index = self.response.output.index(self._text)
        part = self._text["content"][0]
        part["text"] += text
        part["logprobs"].extend(logprobs)
        yield self.event("response.output_text.delta", item_id=self._text["id"],
                         output_index=index, content_index=0, delta=text,
                         logprobs=[_delta_logprob(lp) for lp in logprobs])

    def _call_delta(self, call: dict[str, Any]) -> Iterator[dict[str, Any]]:
        function = call.get("function") or {}
        item = self._calls.get(call.get("index", 0))
        if item is None:
            item = call_item(call.get("id") or new_id("call"), function.get("name") or "", "",
                             status="in_progress")
            self._calls[call.get("index", 0)] = item
            self.response.output.append(item)
            yield self.event("response.output_item.added",
                             output_index=len(self.response.output) - 1, item=dict(item))
        if function.get("arguments"):
            item["arguments"] += function["arguments"]
            yield self.event("response.function_call_arguments.delta", item_id=item["id"],
                             output_index=self.response.output.index(item),
                             delta=function["arguments"])

    def finish(self) -> Iterator[dict[str, Any]]:
        """Close every open item, then the response itself."""
        chat_usage = self.response.usage
        self.response.finish(self._finish, chat_usage)
        for index, item in enumerate(self.response.output):
            if item["type"] == "message":
                part = item["content"][0]
                yield self.event("response.output_text.done", item_id=item["id"],
                                 output_index=index, content_index=0, text=part["text"],
                                 logprobs=[_delta_logprob(lp) for lp in part["logprobs"]])
                yield self.event("response.content_part.done", item_id=item["id"],
                                 output_index=index, content_index=0, part=part)
            else:
                yield self.event("response.function_call_arguments.done", item_id=item["id"],
                                 output_index=index, name=item["name"],
                                 arguments=item["arguments"])
            yield self.event("response.output_item.done", output_index=index, item=item)
        kind = "response.incomplete" if self.response.incomplete else "response.completed"
        yield self.event(kind, response=self.response.json())

    def fail(self, error: dict[str, Any]) -> Iterator[dict[str, Any]]:
        self.response.status = "failed"
        self.response.error = {"code": error.get("code") or "server_error",
                               "message": error.get("message", "")}
        yield self.event("error", code=error.get("code"), message=error.get("message", ""),
                         param=error.get("param"))
        yield self.event("response.failed", response=self.response.json())


def _delta_logprob(lp: dict[str, Any]) -> dict[str, Any]:
    """Stream events carry logprobs without the bytes."""
    return {"token": lp["token"], "logprob": lp["logprob"],
            "top_logprobs": [{"token": t["token"], "logprob": t["logprob"]}
                             for t in lp.get("top_logprobs") or []]}
