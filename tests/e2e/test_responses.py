"""The Responses API with the official openai client against a live server."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from tests.conftest import Server
from tests.e2e.test_openai_api import MODEL, usage_row


@pytest.fixture
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=server.keys["alpha"],
                         max_retries=0, timeout=120)


def test_text_response_is_billed_like_a_chat(client: openai.OpenAI, server: Server) -> None:
    resp = client.responses.create(model=MODEL, input="Say hello in five words.",
                                   instructions="You are terse.", max_output_tokens=16,
                                   temperature=0)
    assert resp.object == "response" and resp.id.startswith("resp-")
    assert resp.status in ("completed", "incomplete")
    assert resp.output[0].type == "message" and resp.output[0].role == "assistant"
    assert resp.output_text.strip()
    assert resp.instructions == "You are terse." and resp.max_output_tokens == 16
    assert resp.usage is not None
    assert resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens
    assert 0 < resp.usage.output_tokens <= 16
    # the ledger row is keyed by the response's id, with the engine's counts
    row = usage_row(server, resp.id)
    assert row is not None
    assert row["prompt_tokens"] == resp.usage.input_tokens
    assert row["completion_tokens"] == resp.usage.output_tokens


def test_length_ends_incomplete(client: openai.OpenAI) -> None:
    resp = client.responses.create(model=MODEL, input="Count from one to one hundred.",
                                   max_output_tokens=4, temperature=0)
    assert resp.status == "incomplete"
    assert resp.incomplete_details is not None
    assert resp.incomplete_details.reason == "max_output_tokens"
    assert resp.usage is not None and resp.usage.output_tokens == 4


def test_stream_events_in_order_and_match_the_stored_response(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model=MODEL, input="Name a colour.",
                                          max_output_tokens=12, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    for kind in ("response.output_item.added", "response.content_part.added",
                 "response.output_text.delta", "response.output_text.done",
                 "response.content_part.done", "response.output_item.done"):
        assert kind in kinds, kind
    assert kinds.index("response.output_item.added") < kinds.index(
        "response.output_text.delta") < kinds.index("response.output_text.done")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert final.output_text == text
    assert final.usage is not None and final.usage.output_tokens > 0
    stored = client.responses.retrieve(final.id)
    assert stored.output_text == text and stored.usage == final.usage


def test_stream_helper_assembles_the_text(client: openai.OpenAI) -> None:
    # an answer that ends by itself (one cut by max_output_tokens ends `incomplete`, which
    # the helper refuses, as it does with OpenAI's own)
    with client.responses.stream(model=MODEL, input="Answer with one word: is water wet?",
                                 max_output_tokens=200, temperature=0) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.output_text == "".join(deltas)


def test_previous_response_id_continues_the_conversation(client: openai.OpenAI,
                                                        server: Server) -> None:
    first = client.responses.create(model=MODEL, input="My name is Ada. Say OK.",
                                    max_output_tokens=8, temperature=0)
    second = client.responses.create(model=MODEL, input="What is my name?",
                                     previous_response_id=first.id, max_output_tokens=8,
                                     temperature=0)
    assert second.previous_response_id == first.id
    # the history (first input, first output, new input) was in the prompt
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    items = client.responses.input_items.list(second.id)
    assert [i.type for i in items.data] == ["message"]
    assert items.data[0].content[0].text == "What is my name?"


def test_stored_responses_are_per_project(client: openai.OpenAI, server: Server) -> None:
    mine = client.responses.create(model=MODEL, input="Hi.", max_output_tokens=4)
    other = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=server.new_key("beta"),
                          max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(mine.id)
    with pytest.raises(openai.NotFoundError) as exc:
        other.responses.create(model=MODEL, input="Go on.", previous_response_id=mine.id)
    assert exc.value.body["param"] == "previous_response_id"
    client.responses.delete(mine.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(mine.id)


def test_store_false_keeps_nothing(client: openai.OpenAI) -> None:
    resp = client.responses.create(model=MODEL, input="Hi.", max_output_tokens=4,
                                   store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(resp.id)


def test_function_call_items_become_chat_history(client: openai.OpenAI) -> None:
    """A function call and its output in the input run as an assistant tool call and a
    tool message (the answer is plain text; no tools are offered)."""
    resp = client.responses.create(model=MODEL, max_output_tokens=8, temperature=0, input=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather",
         "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "Sunny, 21 C"},
    ])
    assert resp.output[0].type == "message"


@pytest.mark.parametrize(("extra", "param"), [
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"background": True}, "background"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"input": [{"type": "input_image", "image_url": "x"}]}, "input"),
    ({"truncation": "auto"}, "truncation"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"text": {"format": {"type": "json_schema"}}}, "text"),
])
def test_bad_requests_name_the_field(server: Server, extra: dict, param: str) -> None:
    body = {"model": MODEL, "input": "Hi.", **extra}
    r = httpx.post(f"{server.base_url}/v1/responses", json=body, timeout=60,
                   headers={"Authorization": f"Bearer {server.keys['alpha']}"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_unknown_response_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_doesnotexist")


def test_prompt_cache_key_partitions_the_prefix_cache(client: openai.OpenAI) -> None:
    """`prompt_cache_key` reuses a cached prompt only for the same key (it is the chat
    layer's `cache_salt`)."""
    prompt = "Describe, in one line, the colour of a ripe lemon on a sunny kitchen table."

    def cached(key: str) -> int:
        resp = client.responses.create(model=MODEL, input=prompt, max_output_tokens=2,
                                       prompt_cache_key=key, temperature=0)
        assert resp.usage is not None
        return resp.usage.input_tokens_details.cached_tokens

    cached("alpha-one")
    assert cached("alpha-one") > 0
    assert cached("alpha-two") == 0


WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"], "additionalProperties": False},
           "strict": True}


def test_forced_tool_call_is_a_function_call_item(client: openai.OpenAI) -> None:
    resp = client.responses.create(model=MODEL, input="What is the weather in Paris?",
                                   tools=[WEATHER], tool_choice="required",
                                   parallel_tool_calls=False, max_output_tokens=64,
                                   temperature=0)
    calls = [item for item in resp.output if item.type == "function_call"]
    assert calls and resp.status == "completed"
    assert calls[0].name == "get_weather" and calls[0].call_id
    assert set(json.loads(calls[0].arguments)) == {"city"}
    # the result goes back as a function_call_output item on the same conversation
    follow = client.responses.create(
        model=MODEL, previous_response_id=resp.id, max_output_tokens=16, temperature=0,
        tools=[WEATHER], tool_choice="none",
        input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                "output": "Sunny, 21 C"}])
    assert follow.output[0].type == "message"


def test_streamed_tool_call_events(client: openai.OpenAI) -> None:
    events = list(client.responses.create(
        model=MODEL, input="Weather in Rome?", tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"}, parallel_tool_calls=False,
        max_output_tokens=64, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert done.name == "get_weather" and set(json.loads(done.arguments)) == {"city"}
    final = events[-1]
    assert final.type == "response.completed"
    assert [i.type for i in final.response.output] == ["function_call"]
    assert final.response.output[0].arguments == done.arguments


class City(BaseModel):
    # bounded, so a small model's rambling string cannot run into max_output_tokens (what
    # it says depends on the weight format the machine serves); the bound is enforced
    # while decoding, as any schema is
    name: str = Field(max_length=40)
    country: str = Field(max_length=40)


def test_text_format_json_schema_parses(client: openai.OpenAI) -> None:
    resp = client.responses.parse(model=MODEL, input="Name a city in France.",
                                  text_format=City, max_output_tokens=64, temperature=0)
    assert isinstance(resp.output_parsed, City)
    assert resp.text.format.type == "json_schema"
