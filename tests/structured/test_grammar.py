"""response_format → llguidance grammar: what compiles, what is refused, and how fast."""

from __future__ import annotations

import asyncio
import json
import pickle
import time
from typing import Any

import llguidance
import pytest

from aicloud.engines.base import Constraint, GenerationRequest
from aicloud.structured import (
    MAX_SCHEMA_BYTES,
    MAX_SCHEMA_DEPTH,
    SchemaError,
    compile_constraint,
    constraint_for,
)

PERSON = {"type": "object", "properties": {"name": {"type": "string"},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


def nested(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def accepts(constraint: Constraint, text: str) -> bool:
    """Whether the grammar takes `text` whole (checked byte by byte, no tokenizer)."""
    tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(ByteTokenizer()))
    matcher = llguidance.LLMatcher(tokenizer, constraint.grammar, log_level=0)
    ok = matcher.consume_tokens(list(text.encode()))
    return ok and matcher.is_accepting()


class ByteTokenizer:
    """256 one-byte tokens and an end token: enough to run a grammar over text."""

    def __init__(self) -> None:
        self.eos_token_id, self.bos_token_id = 256, None
        self.tokens = [bytes([b]) for b in range(256)] + [b"<eos>"]
        self.special_token_ids = [256]

    def __call__(self, s: str | bytes) -> list[int]:
        return list(s.encode() if isinstance(s, str) else s)


def test_text_is_no_constraint() -> None:
    assert compile_constraint("text") is None


def test_json_schema_is_compact_json() -> None:
    constraint = compile_constraint("json_schema", PERSON)
    assert constraint is not None
    assert accepts(constraint, '{"name":"Ada","age":36}')
    assert not accepts(constraint, '{"name": "Ada", "age": 36}')  # no free whitespace
    assert not accepts(constraint, '{"name":"Ada"}')  # required field missing
    assert not accepts(constraint, '{"name":"Ada","age":"36"}')


def test_json_object_is_any_object() -> None:
    constraint = compile_constraint("json_object")
    assert constraint is not None
    assert accepts(constraint, '{"a":[1,{"b":null}]}')
    assert not accepts(constraint, "[1,2]")
    assert not accepts(constraint, "hello")


@pytest.mark.parametrize(("schema", "words"), [
    ({"type": "strung"}, "type"),
    ({"type": "string", "pattern": "(a|b"}, "regex"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "missing"),
    ({"type": "object", "x-guidance": {"whitespace_flexible": True}}, "x-guidance"),
    ({"type": "string", "format": "not-a-format"}, "format"),
    (nested(MAX_SCHEMA_DEPTH), "nested"),
    ({"enum": ["x" * 1000] * (MAX_SCHEMA_BYTES // 1000 + 2)}, "bytes"),
])
def test_bad_schemas_are_refused_with_a_reason(schema: dict[str, Any], words: str) -> None:
    with pytest.raises(SchemaError) as err:
        compile_constraint("json_schema", schema)
    assert words in err.value.message


def test_json_schema_without_schema_is_refused() -> None:
    with pytest.raises(SchemaError):
        compile_constraint("json_schema", None)


@pytest.mark.parametrize(("schema", "words"), [
    ({"enum": [f"value-{i}" for i in range(50_000)]}, "bytes"),
    (nested(10_000), "nested"),
    # 10^6 combinations in 4 KB of schema: llguidance's size limit, in ~30 ms
    ({"allOf": [{"anyOf": [{"type": "object", "properties": {f"a{i}{j}": {"type": "string"}}}
                           for j in range(10)]} for i in range(6)]}, "too large"),
])
def test_pathological_schemas_are_refused_quickly(schema: dict[str, Any], words: str) -> None:
    t0 = time.perf_counter()
    with pytest.raises(SchemaError) as err:
        asyncio.run(constraint_for("json_schema", schema))
    assert time.perf_counter() - t0 < 1.0
    assert words in err.value.message


def test_a_compile_past_the_time_bound_is_refused() -> None:
    """Whatever llguidance's limits let through, the caller waits no longer than asked."""
    schema = {"type": "object", "properties": {f"p{i}": {"type": "string"}
                                               for i in range(1500)}}
    with pytest.raises(SchemaError) as err:
        asyncio.run(constraint_for("json_schema", schema, seconds=0.001))
    assert "longer than" in err.value.message


def test_constraint_travels_in_a_pickled_request() -> None:
    """Ray replicas get the request pickled: the grammar must come through whole."""
    constraint = compile_constraint("json_schema", PERSON)
    request = GenerationRequest("r", [1, 2, 3], constraint=constraint)
    copy = pickle.loads(pickle.dumps(request))
    assert copy.constraint == constraint
    assert json.loads(copy.constraint.grammar) == json.loads(constraint.grammar)
