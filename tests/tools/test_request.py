"""A chat request's tool fields as a ToolSpec and engine messages (no server needed)."""

from __future__ import annotations

from typing import Any

import pytest

from aicloud.api.schemas import ChatCompletionRequest
from aicloud.api.tool_calls import engine_messages, tool_spec
from aicloud.engines.base import ChatMessage, ChatToolCall
from aicloud.tools import Mode, ToolError

ADD: dict[str, Any] = {"name": "add", "parameters": {"type": "object"}}
ASK = [{"role": "user", "content": "2 plus 3?"}]


def request(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": ASK, **fields})


def test_tools_and_their_choices() -> None:
    tools = [{"type": "function", "function": ADD}]
    assert tool_spec(request()) is None
    spec = tool_spec(request(tools=tools))
    assert spec is not None and spec.choice.mode is Mode.AUTO and spec.parallel
    spec = tool_spec(request(tools=tools, tool_choice={"type": "function",
                                                       "function": {"name": "add"}},
                             parallel_tool_calls=False))
    assert spec is not None and spec.choice.name == "add" and not spec.parallel
    assert not spec.many
    spec = tool_spec(request(tools=tools, tool_choice="none"))
    assert spec is not None and not spec.active


def test_legacy_functions_are_tools_with_one_call() -> None:
    spec = tool_spec(request(functions=[ADD], function_call={"name": "add"}))
    assert spec is not None and spec.legacy and spec.choice.mode is Mode.NAMED
    assert not spec.many
    spec = tool_spec(request(functions=[ADD]))
    assert spec is not None and spec.choice.mode is Mode.AUTO


@pytest.mark.parametrize(("fields", "param"), [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"parallel_tool_calls": True}, "parallel_tool_calls"),
    ({"function_call": "none"}, "function_call"),
    ({"tools": [{"type": "function", "function": ADD}], "functions": [ADD]}, "functions"),
    ({"functions": [ADD], "function_call": {"name": "sub"}}, "function_call"),
])
def test_refused_combinations_name_their_field(fields: dict, param: str) -> None:
    with pytest.raises(ToolError) as caught:
        tool_spec(request(**fields))
    assert caught.value.param == param


def test_history_keeps_calls_and_maps_legacy_function_messages() -> None:
    body = request(messages=[
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a", "type": "function",
             "function": {"name": "add", "arguments": '{"a":2}'}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": [{"type": "text", "text": "5"}]},
        {"role": "assistant", "function_call": {"name": "add", "arguments": "{}"}},
        {"role": "function", "name": "add", "content": "7"},
    ])
    messages = engine_messages(body.messages)
    assert messages[1] == ChatMessage("assistant", "", None,
                                      (ChatToolCall("call_a", "add", '{"a":2}'),))
    assert messages[2] == ChatMessage("tool", "5", None, (), "call_a")
    (legacy,) = messages[3].tool_calls
    assert messages[4] == ChatMessage("tool", "7", "add", (), legacy.id)


@pytest.mark.parametrize(("message", "param"), [
    ({"role": "user", "content": "x", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
     "messages[1].tool_calls"),
    ({"role": "user", "content": "x", "tool_call_id": "c"}, "messages[1].tool_call_id"),
    ({"role": "function", "content": "x"}, "messages[1].name"),
    ({"role": "function", "name": "add", "content": "x"}, "messages[1].name"),
])
def test_misplaced_tool_fields_are_refused(message: dict, param: str) -> None:
    with pytest.raises(ToolError) as caught:
        engine_messages(request(messages=[*ASK, message]).messages)
    assert caught.value.param == param
