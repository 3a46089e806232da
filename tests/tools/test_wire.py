"""The chat JSON for a request with tools, fed to the openai package's own stream
assembler: what a client rebuilds from the chunks equals the non-streamed answer."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from aicloud.api.generation import Completed
from aicloud.api.routes.openai import ChatFormat
from aicloud.api.tool_calls import ToolChatFormat
from aicloud.engines.base import Usage
from aicloud.tools import FALLBACK, CallFormat

RUN: Any = SimpleNamespace(request_id="chatcmpl-test", created=1_700_000_000, model="m")
TOOLS: list[Any] = [{"type": "function", "function": {
    "name": name, "strict": True, "parameters": {"type": "object", "properties": {}}}}
    for name in ("get_weather", "add")]
TEXT = ('<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name":"add","arguments":{"a":1,"b":[2,"}"]}}\n</tool_call>')


def stream(fmt: ToolChatFormat, text: str, step: int, finish: str = "stop") -> list[dict]:
    """The chunks `api.generation.stream_events` makes of `text` arriving `step` characters
    at a time: the first always, then any with text, then the finish."""
    pieces = [text[i:i + step] for i in range(0, len(text), step)]
    chunks = [fmt.chunk(RUN, 0, piece, None, n == 0, []) for n, piece in enumerate(pieces)]
    return [*chunks, fmt.chunk(RUN, 0, "", finish, False, [])]


def assemble(chunks: list[dict]) -> Any:
    state = ChatCompletionStreamState(input_tools=TOOLS)
    for chunk in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    return state.get_final_completion()


def whole(fmt: CallFormat, text: str, finish: str = "stop") -> ChatCompletion:
    body = ToolChatFormat(fmt, ChatFormat()).whole(RUN, [Completed(0, text, finish, [])],
                                                  Usage(10, 20))
    return ChatCompletion.model_validate(body)


@pytest.mark.parametrize("step", [1, 4, 10_000])
def test_streamed_calls_assemble_to_the_whole_answer(step: int) -> None:
    done = assemble(stream(ToolChatFormat(FALLBACK, ChatFormat()), TEXT, step))
    message = done.choices[0].message
    assert done.choices[0].finish_reason == "tool_calls"
    assert message.role == "assistant" and not message.content
    calls = message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": [2, "}"]})]
    assert calls[1].function.parsed_arguments == {"a": 1, "b": [2, "}"]}
    assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id
    reference = whole(FALLBACK, TEXT)
    assert reference.choices[0].finish_reason == "tool_calls"
    assert reference.choices[0].message.content is None
    assert [(c.function.name, c.function.arguments) for c in reference.choices[0].message
            .tool_calls] == [(c.function.name, c.function.arguments) for c in calls]


def test_a_text_answer_is_plain_content_with_finish_stop() -> None:
    text = "It is sunny <b>today</b>."
    done = assemble(stream(ToolChatFormat(FALLBACK, ChatFormat()), text, 1))
    assert done.choices[0].message.content == text
    assert done.choices[0].message.tool_calls is None
    assert done.choices[0].finish_reason == "stop"
    assert whole(FALLBACK, text).choices[0].message.content == text


def test_content_before_a_call_and_length_cut_keep_their_finish() -> None:
    text = "Checking.\n" + TEXT[:60]
    chunks = stream(ToolChatFormat(FALLBACK, ChatFormat()), text, 3, finish="length")
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    contents = [c["choices"][0]["delta"].get("content") or "" for c in chunks]
    assert "".join(contents) == "Checking."
    assert whole(FALLBACK, text, "length").choices[0].finish_reason == "length"


def test_legacy_function_call_streams_and_answers_in_the_old_shape() -> None:
    text = TEXT.split("\n<tool_call>", 1)[0]
    fmt = ToolChatFormat(FALLBACK, ChatFormat(), legacy=True)
    chunks = stream(fmt, text, 5)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert not any("tool_calls" in d for d in deltas)
    assert "".join(d.get("function_call", {}).get("arguments", "") for d in deltas) == \
        '{"city":"Paris"}'
    assert [d["function_call"]["name"] for d in deltas if "name" in d.get("function_call", {})
            ] == ["get_weather"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "function_call"
    body = ToolChatFormat(FALLBACK, ChatFormat(), legacy=True).whole(
        RUN, [Completed(0, text, "stop", [])], Usage(1, 1))
    choice = body["choices"][0]
    assert choice["finish_reason"] == "function_call"
    assert choice["message"]["function_call"] == {"name": "get_weather",
                                                  "arguments": '{"city":"Paris"}'}
    assert "tool_calls" not in choice["message"]
