"""Tool calling on top of any engine's chat template: call formats, the grammar that forces
them, and the parsers that read them back. No FastAPI here."""

from __future__ import annotations

from aicloud.tools.formats import (
    FALLBACK,
    HERMES,
    LLAMA3_JSON,
    MISTRAL,
    CallFormat,
    choose,
    fallback_prompt,
    for_template,
)
from aicloud.tools.grammar import check_functions, constraint, lark
from aicloud.tools.parse import Delta, Parsed, StreamParser, parse, scan
from aicloud.tools.spec import (
    Function,
    Mode,
    ToolChoice,
    ToolError,
    ToolSpec,
    check_history,
    new_call_id,
)

__all__ = [
    "FALLBACK",
    "HERMES",
    "LLAMA3_JSON",
    "MISTRAL",
    "CallFormat",
    "Delta",
    "Function",
    "Mode",
    "Parsed",
    "StreamParser",
    "ToolChoice",
    "ToolError",
    "ToolSpec",
    "check_functions",
    "check_history",
    "choose",
    "constraint",
    "fallback_prompt",
    "for_template",
    "lark",
    "new_call_id",
    "parse",
    "scan",
]
