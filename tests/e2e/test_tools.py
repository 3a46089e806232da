"""Tools through the official openai client (and LangChain) against a live server with the
bundled model, whose template knows no tools: the fallback format, forced by the grammar.

The assertions are about format and validity, never the small model's judgment: every call
names a declared function and its arguments parse and match that function's schema.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState

from tests.conftest import Server

MODEL = "smollm2-135m-instruct"
WEATHER_PARAMS: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 24},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False,
}
ADD_PARAMS: dict[str, Any] = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"], "additionalProperties": False,
}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_PARAMS,
                                      "description": "Current weather in a city"}},
    {"type": "function", "function": {"name": "add", "parameters": ADD_PARAMS,
                                      "description": "Add two integers"}},
]
SCHEMAS = {"get_weather": WEATHER_PARAMS, "add": ADD_PARAMS}
ASK = [{"role": "user", "content": "What is the weather in Paris, and what is 2 plus 3?"}]


@pytest.fixture
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=server.keys["alpha"],
                         max_retries=0, timeout=600)


def check_calls(calls: Any, names: set[str] | None = None) -> list[tuple[str, dict]]:
    """Every call names a declared function and its arguments match that schema."""
    out = []
    for call in calls or []:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in (names or SCHEMAS)
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
        out.append((call.function.name, arguments))
    return out


def test_required_forces_valid_calls(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                          tool_choice="required", max_tokens=100,
                                          temperature=0)
    choice = resp.choices[0]
    assert choice.finish_reason in ("tool_calls", "length")
    calls = choice.message.tool_calls
    assert calls and choice.message.content is None
    assert len({c.id for c in calls}) == len(calls)
    # a call cut by max_tokens comes back as far as it got, as OpenAI's do
    check_calls(calls if choice.finish_reason == "tool_calls" else calls[:-1])


def test_named_function_is_the_one_call(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, max_tokens=60, temperature=0,
        tool_choice={"type": "function", "function": {"name": "add"}})
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [name for name, _ in check_calls(choice.message.tool_calls)] == ["add"]


@pytest.mark.parametrize("seed", range(3))
def test_auto_answers_in_text_or_valid_calls(client: openai.OpenAI, seed: int) -> None:
    resp = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                          max_tokens=60, temperature=1.0, seed=seed)
    choice = resp.choices[0]
    calls = check_calls(choice.message.tool_calls)
    if calls and choice.finish_reason != "length":
        assert choice.finish_reason == "tool_calls"
    if not calls:
        assert isinstance(choice.message.content, str)
        assert "<tool_call>" not in choice.message.content or choice.finish_reason == "length"


def test_streamed_named_call_through_the_stream_helper(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(
            model=MODEL, messages=ASK, tools=TOOLS, max_tokens=80, temperature=0,
            tool_choice={"type": "function", "function": {"name": "get_weather"}}) as stream:
        done = [e for e in stream if e.type == "tool_calls.function.arguments.done"]
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.role == "assistant"
    calls = check_calls(choice.message.tool_calls, {"get_weather"})
    assert [(e.name, json.loads(e.arguments)) for e in done] == calls


def test_streamed_parallel_calls_assemble_by_index(client: openai.OpenAI) -> None:
    state = ChatCompletionStreamState()
    for chunk in client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                                tool_choice="required", max_tokens=100,
                                                temperature=0, stream=True):
        state.handle_chunk(chunk)
    # the snapshot, since the helper's final parse refuses an answer cut by max_tokens
    choice = state.current_completion_snapshot.choices[0]
    calls = choice.message.tool_calls
    assert calls and choice.finish_reason in ("tool_calls", "length")
    whole = calls if choice.finish_reason == "tool_calls" else calls[:-1]
    check_calls(whole)
    assert all(c.function.name in SCHEMAS for c in calls)


def test_no_parallel_calls_when_refused(client: openai.OpenAI) -> None:
    for stream in (False, True):
        raw = client.chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", stream=stream,
            parallel_tool_calls=False, max_tokens=80, temperature=0)
        if stream:
            indexes = {tc.index for chunk in raw for tc in chunk.choices[0].delta.tool_calls or []}
            assert indexes == {0}
        else:
            assert len(check_calls(raw.choices[0].message.tool_calls)) == 1
            assert raw.choices[0].finish_reason == "tool_calls"


def test_two_turns_send_the_tool_result_back(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, max_tokens=80, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    message = first.choices[0].message
    (call,) = message.tool_calls
    history = [*ASK, message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18}'}]
    second = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS,
                                            max_tokens=30, temperature=0)
    check_calls(second.choices[0].message.tool_calls)
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    final = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS,
                                           tool_choice="none", max_tokens=24, temperature=0)
    assert final.choices[0].message.tool_calls is None
    assert final.choices[0].message.content
    assert final.choices[0].finish_reason in ("stop", "length")


def test_legacy_functions_answer_with_function_call(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model=MODEL, messages=ASK, functions=[t["function"] for t in TOOLS],
        function_call={"name": "add"}, max_tokens=60, temperature=0)
    choice = resp.choices[0]
    assert choice.finish_reason == "function_call" and choice.message.tool_calls is None
    assert choice.message.function_call.name == "add"
    jsonschema.validate(json.loads(choice.message.function_call.arguments), ADD_PARAMS)
    history = [*ASK, {"role": "assistant", "content": None,
                      "function_call": choice.message.function_call.model_dump()},
               {"role": "function", "name": "add", "content": "5"}]
    again = client.chat.completions.create(model=MODEL, messages=history, max_tokens=8,
                                           functions=[t["function"] for t in TOOLS],
                                           function_call="none")
    assert again.choices[0].message.function_call is None


BAD = [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "nonsense"}}}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "string"}}}]}, "tools[0].function.parameters"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"parallel_tool_calls": False}, "parallel_tool_calls"),
    ({"function_call": "auto"}, "function_call"),
    ({"tools": TOOLS, "functions": [TOOLS[0]["function"]]}, "functions"),
    ({"messages": [*ASK, {"role": "tool", "tool_call_id": "call_x", "content": "1"}]},
     "messages[1].tool_call_id"),
    ({"messages": [*ASK, {"role": "tool", "content": "1"}]}, "messages[1].tool_call_id"),
    ({"messages": [*ASK, {"role": "function", "name": "add", "content": "1"}]},
     "messages[1].name"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": [{
        "id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{}"}}]}]},
     "messages[0].tool_calls"),
]


@pytest.mark.parametrize(("extra", "param"), BAD, ids=[p for _, p in BAD])
def test_bad_tool_requests_are_400s_naming_the_field(server: Server, extra: dict,
                                                     param: str) -> None:
    body = {"model": MODEL, "messages": ASK, "max_tokens": 4, **extra}
    resp = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {server.keys['alpha']}"})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert httpx.get(f"{server.base_url}/healthz", timeout=5).status_code == 200


def test_langchain_bind_tools(server: Server) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(model=MODEL, base_url=f"{server.base_url}/v1",
                                      api_key=server.keys["alpha"], temperature=0,
                                      max_tokens=60, max_retries=0, timeout=600)

    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    reply = llm.bind_tools([add], tool_choice="add").invoke("What is 2 plus 3?")
    (call,) = reply.tool_calls
    assert call["name"] == "add"
    jsonschema.validate(call["args"], ADD_PARAMS)  # LangChain's schema is open; ours closed
    assert add(**call["args"]) == call["args"]["a"] + call["args"]["b"]
