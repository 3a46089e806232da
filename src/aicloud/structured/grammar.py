"""`response_format` → llguidance grammar → `Constraint`, refused early when it cannot run.

A schema is checked three ways before a request is queued: its size and nesting here (cheap,
so a 10 MB or 10,000-deep schema never reaches the compiler), then llguidance's own
compile with parser limits tighter than its defaults, in a worker thread, under a time
bound. The engine compiles the grammar once more against its tokenizer (the lexer is only
built then), under the same limits.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any, Literal

import llguidance

from aicloud.engines.base import GRAMMAR_LIMITS, Constraint

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

FormatType = Literal["text", "json_object", "json_schema"]

MAX_SCHEMA_BYTES = 64 * 1024  # OpenAI's own cap on a schema is in this range (~100 KB)
MAX_SCHEMA_DEPTH = 32  # levels of JSON in the schema document, not of the output
# A worst case we allow (a 5,000-item enum) compiles in ~20 ms here, while llguidance's
# limits (engines.base.GRAMMAR_LIMITS) end a runaway compile; a request waits at most this
# long for the compiler before it is a 400.
COMPILE_SECONDS = 2.0
# JSON as compact as `json.dumps(..., separators=(",", ":"))`: free whitespace lets a small
# model pad forever (newlines and spaces are each a cheap token) and only costs tokens.
JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False, "lenient": False}
ANY_OBJECT: dict[str, Any] = {"type": "object"}


class SchemaError(ValueError):
    """The response_format cannot be honoured; the message says why (a 400)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def parser_limits() -> llguidance.LLParserLimits:
    return llguidance.LLParserLimits(**GRAMMAR_LIMITS)  # type: ignore[arg-type]  # int|bool


def grammar_for(kind: FormatType, schema: dict[str, Any] | None = None) -> str | None:
    """The llguidance grammar for a response_format; None for plain text."""
    if kind == "text":
        return None
    if kind == "json_object":
        schema = ANY_OBJECT
    elif schema is None:
        raise SchemaError("json_schema.schema is required for type 'json_schema'")
    _check_shape(schema)
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    except (ValueError, TypeError) as exc:
        raise SchemaError(f"invalid JSON schema: {exc}") from None


def check_grammar(grammar: str) -> None:
    """Compile `grammar` (no tokenizer: the engine adds its own) within the parser limits."""
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        grammar, None, limits=parser_limits())
    if failed:
        raise SchemaError(f"the schema cannot be used: {_one_line(messages[0])}")


def compile_constraint(kind: FormatType, schema: dict[str, Any] | None = None
                       ) -> Constraint | None:
    grammar = grammar_for(kind, schema)
    if grammar is None:
        return None
    check_grammar(grammar)
    return Constraint(grammar)


async def constraint_for(kind: FormatType, schema: dict[str, Any] | None = None, *,
                         seconds: float = COMPILE_SECONDS) -> Constraint | None:
    """`compile_constraint` off the event loop. A compile that outlives `seconds` is
    refused; llguidance's fuel limits end the thread soon after."""
    if kind == "text":
        return None
    try:
        return await asyncio.wait_for(asyncio.to_thread(compile_constraint, kind, schema),
                                      seconds)
    except TimeoutError:
        raise SchemaError(f"the schema took longer than {seconds:g} s to compile; "
                          "simplify it") from None


def _check_shape(schema: dict[str, Any]) -> None:
    if not isinstance(schema, dict):
        raise SchemaError("the schema must be a JSON object")
    if "x-guidance" in schema:
        raise SchemaError("'x-guidance' options are not accepted in a schema")
    if _depth(schema) > MAX_SCHEMA_DEPTH:  # first: json.dumps would recurse that deep
        raise SchemaError(f"the schema is nested more than {MAX_SCHEMA_DEPTH} levels deep")
    try:
        size = len(json.dumps(schema, ensure_ascii=False).encode())
    except (ValueError, TypeError):
        raise SchemaError("the schema is not valid JSON") from None
    if size > MAX_SCHEMA_BYTES:
        raise SchemaError(f"the schema is {size} bytes; at most {MAX_SCHEMA_BYTES} are "
                          "accepted")


def _depth(value: Any) -> int:
    """Nesting of a JSON document, without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        node, level = todo.pop()
        deepest = max(deepest, level)
        if level > MAX_SCHEMA_DEPTH:
            return level
        children = node.values() if isinstance(node, dict) else (
            node if isinstance(node, list) else ())
        todo.extend((child, level + 1) for child in children
                    if isinstance(child, dict | list))
    return deepest


def _one_line(message: str) -> str:
    return " ".join(message.split())[:300] or "invalid grammar"
