"""Constrained decoding in the llama.cpp batcher, on the real bundled model."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest

from aicloud.engines.base import (
    ChatMessage,
    Constraint,
    EngineError,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
)
from aicloud.engines.llamacpp.engine import LlamaCppEngine
from aicloud.engines.llamacpp.model import ContextConfig
from aicloud.structured import compile_constraint
from tests.conftest import LoopThread
from tests.engines.checks import running_engine

GREEDY = SamplingParams(temperature=0.0)
SLOTS = 4
CITY = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 30},
    "country": {"type": "string", "maxLength": 30},
    "population": {"type": "integer", "minimum": 0, "maximum": 100_000_000},
}, "required": ["city", "country", "population"], "additionalProperties": False}
COLOURS = {"type": "object", "properties": {
    "colours": {"type": "array", "items": {"enum": ["red", "green", "blue", "yellow"]},
                "minItems": 1, "maxItems": 3},
    "favourite": {"enum": ["red", "green", "blue", "yellow"]},
}, "required": ["colours", "favourite"], "additionalProperties": False}


@pytest.fixture(scope="module")
def engine(loop_thread: LoopThread) -> Iterator[LlamaCppEngine]:
    yield from running_engine(loop_thread,
                              ContextConfig(sequences=SLOTS, context_per_sequence=1024))


def schema_constraint(schema: dict[str, Any]) -> Constraint:
    constraint = compile_constraint("json_schema", schema)
    assert constraint is not None
    return constraint


async def run(engine: LlamaCppEngine, prompt: str, constraint: Constraint | None,
              max_tokens: int = 64, sampling: SamplingParams = GREEDY
              ) -> tuple[list[TokenEvent], str]:
    tokens = await engine.encode_chat([ChatMessage("user", prompt)])
    stream = await engine.generate(GenerationRequest("t", tokens, sampling, max_tokens,
                                                     constraint=constraint))
    events = [e async for e in stream]
    return events, "".join(e.text for e in events)


def check_city(text: str) -> None:
    value = json.loads(text)
    assert set(value) == {"city", "country", "population"}
    assert isinstance(value["city"], str) and len(value["city"]) <= 30
    assert isinstance(value["population"], int) and 0 <= value["population"] <= 100_000_000


def test_output_matches_the_schema_and_ends_when_it_is_complete(
        engine: LlamaCppEngine, loop_thread: LoopThread) -> None:
    events, text = loop_thread.run(run(engine, "Tell me about Paris.", schema_constraint(CITY),
                                       max_tokens=120))
    check_city(text)
    assert text == json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False)
    final = events[-1]
    assert final.finish_reason is FinishReason.STOP
    # the closing brace ends it: no end-of-text token is sampled and billed after it
    assert final.usage is not None and final.completion_tokens == final.usage.completion_tokens


def test_sampled_outputs_always_match(engine: LlamaCppEngine, loop_thread: LoopThread) -> None:
    """Temperature 1 and several seeds, in one batch: each text is a valid instance."""
    async def many() -> list[tuple[list[TokenEvent], str]]:
        return await asyncio.gather(*(
            run(engine, "Pick some colours.", schema_constraint(COLOURS), 60,
                SamplingParams(temperature=1.0, seed=seed)) for seed in range(SLOTS)))

    for events, text in loop_thread.run(many()):
        assert events[-1].finish_reason is FinishReason.STOP
        value = json.loads(text)
        assert 1 <= len(value["colours"]) <= 3 and value["favourite"] in COLOURS[
            "properties"]["favourite"]["enum"]


def test_max_tokens_inside_the_json_is_length(engine: LlamaCppEngine,
                                              loop_thread: LoopThread) -> None:
    events, text = loop_thread.run(run(engine, "Tell me about Rome.", schema_constraint(CITY),
                                       max_tokens=4))
    assert events[-1].finish_reason is FinishReason.LENGTH
    assert events[-1].completion_tokens == 4
    assert text.startswith('{"')
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_constrained_greedy_text_is_the_same_alone_and_in_a_batch(
        engine: LlamaCppEngine, loop_thread: LoopThread) -> None:
    """Masks change which tokens may be sampled, never the logits of another row: a
    constrained or free request gets the same text alone and beside any others."""
    cases = [("Tell me about Paris.", schema_constraint(CITY)),
             ("Hi", None),
             ("Pick some colours.", schema_constraint(COLOURS)),
             ("Describe Tokyo as JSON.", compile_constraint("json_object")),
             ("Name a fruit.", None),
             ("Tell me about Lima, the capital of Peru.", schema_constraint(CITY))]
    alone = [loop_thread.run(run(engine, p, c, 32))[1] for p, c in cases]
    json.loads(alone[0])

    async def together(order: list[int]) -> list[str]:
        results = await asyncio.gather(*(run(engine, *cases[i], 32) for i in order))
        return [text for _, text in results]

    for order in (list(range(len(cases))), list(reversed(range(len(cases))))):
        assert loop_thread.run(together(order)) == [alone[i] for i in order]


def test_a_grammar_that_cannot_compile_is_refused_before_it_is_queued(
        engine: LlamaCppEngine, loop_thread: LoopThread) -> None:
    bad = Constraint(json.dumps({"grammars": [{"lark_grammar": "start: undefined_rule"}]}))

    async def attempt() -> None:
        tokens = await engine.encode_text("hello")
        await engine.generate(GenerationRequest("t", tokens, GREEDY, 8, constraint=bad))

    with pytest.raises(EngineError) as err:
        loop_thread.run(attempt())
    assert err.value.param == "response_format"
    assert engine.stats().waiting == 0 and engine.stats().running == 0
