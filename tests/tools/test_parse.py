"""Reading calls back: whole text and streamed deltas agree, and no partial trigger is
ever sent as content."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable

import pytest

from aicloud.tools import FALLBACK, HERMES, LLAMA3_JSON, MISTRAL, CallFormat, StreamParser, parse

WEATHER = '{"name":"get_weather","arguments":{"city":"Paris","days":[1,2]}}'
ADD = '{"name":"add","arguments":{"a":1,"b":{"c":"}{\\"]"}}}'



def _counter() -> Callable[[], str]:
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def layout(fmt: CallFormat, *calls: str) -> str:
    key = fmt.arguments_key
    bodies = [c.replace('"arguments"', f'"{key}"') for c in calls]
    inner = (fmt.after + fmt.between + fmt.before).join(bodies)
    return fmt.first + inner + fmt.after + fmt.last


def streamed(fmt: CallFormat, text: str, step: int = 1) -> tuple[str, list[dict], list[str]]:
    """Feed `text` in pieces of `step` characters; return the content, the calls as the
    openai client assembles them, and every content delta."""
    parser = StreamParser(fmt, _counter())
    content, pieces = "", []
    calls: list[dict] = []
    chunks = [text[i:i + step] for i in range(0, len(text), step)] + [""]
    for n, piece in enumerate(chunks):
        delta = parser.feed(piece, final=n == len(chunks) - 1)
        if delta.content:
            pieces.append(delta.content)
            content += delta.content
        for tc in delta.tool_calls:
            if tc["index"] == len(calls):
                assert tc["id"] and tc["type"] == "function" and tc["function"]["name"]
                calls.append({"id": tc["id"], "name": tc["function"]["name"],
                              "arguments": tc["function"]["arguments"]})
            else:
                assert set(tc) == {"index", "function"}
                calls[tc["index"]]["arguments"] += tc["function"]["arguments"]
    return content, calls, pieces


@pytest.mark.parametrize("fmt", [HERMES, MISTRAL, LLAMA3_JSON], ids=lambda f: f.name)
@pytest.mark.parametrize("step", [1, 3, 1000])
def test_stream_and_whole_agree_on_two_calls(fmt: CallFormat, step: int) -> None:
    text = layout(fmt, WEATHER, ADD)
    whole = parse(text, fmt, _counter())
    assert whole.content is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in whole.calls] == [("get_weather", {"city": "Paris", "days": [1, 2]}),
                                      ("add", {"a": 1, "b": {"c": '}{"]'}})]
    assert len({c["id"] for c in whole.calls}) == 2
    content, calls, _ = streamed(fmt, text, step)
    assert content == ""
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in whole.calls]


@pytest.mark.parametrize("step", [1, 2, 5])
def test_text_before_a_call_is_content_and_the_tag_never_leaks(step: int) -> None:
    text = "Let me look that up.\n" + layout(HERMES, WEATHER)
    whole = parse(text, HERMES)
    assert whole.content == "Let me look that up."
    content, calls, pieces = streamed(HERMES, text, step)
    assert content == "Let me look that up."
    assert all("<" not in p for p in pieces)
    assert [c["name"] for c in calls] == ["get_weather"]


def test_plain_answer_is_unchanged_even_with_a_trigger_prefix_at_the_end() -> None:
    text = "Use a <b> tag, or end with <tool_"
    assert parse(text, HERMES).content == text
    assert parse(text, HERMES).calls == []
    content, calls, _ = streamed(HERMES, text)
    assert content == text and calls == []
    spaced = "  two spaces around  \n"
    assert streamed(HERMES, spaced)[0] == spaced


def test_llama3_text_not_starting_with_a_brace_is_content() -> None:
    text = 'The JSON is {"name":"x"}'
    assert parse(text, LLAMA3_JSON).content == text
    assert streamed(LLAMA3_JSON, text)[0] == text


def test_a_truncated_call_streams_the_arguments_it_has() -> None:
    text = layout(HERMES, WEATHER)[:-20]  # cut inside the arguments (max_tokens)
    whole = parse(text, HERMES)
    assert [c["function"]["name"] for c in whole.calls] == ["get_weather"]
    _, calls, _ = streamed(HERMES, text)
    assert calls[0]["arguments"] == whole.calls[0]["function"]["arguments"]
    assert whole.calls[0]["function"]["arguments"].startswith('{"city":"Paris"')


def test_a_trigger_without_a_call_is_content() -> None:
    text = "<tool_call>\nnot json"
    assert parse(text, HERMES).content == text
    assert streamed(HERMES, text)[0] == text


def test_unforced_text_in_another_key_order_is_read_once_complete() -> None:
    text = '<tool_call>\n{"arguments": {"x": 1}, "name": "f"}\n</tool_call>'
    whole = parse(text, FALLBACK)
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in whole.calls] == [
        ("f", '{"x": 1}')]
    assert [(c["name"], c["arguments"]) for c in streamed(FALLBACK, text)[1]] == [
        ("f", '{"x": 1}')]
