"""Structured outputs: OpenAI's `response_format` as an llguidance grammar, checked before
anything is queued. No FastAPI here; engines get only the grammar (`engines.base.Constraint`)."""

from __future__ import annotations

from aicloud.structured.grammar import (
    COMPILE_SECONDS,
    MAX_SCHEMA_BYTES,
    MAX_SCHEMA_DEPTH,
    SchemaError,
    check_grammar,
    compile_constraint,
    constraint_for,
    grammar_for,
    parser_limits,
)

__all__ = [
    "COMPILE_SECONDS",
    "MAX_SCHEMA_BYTES",
    "MAX_SCHEMA_DEPTH",
    "SchemaError",
    "check_grammar",
    "compile_constraint",
    "constraint_for",
    "grammar_for",
    "parser_limits",
]
