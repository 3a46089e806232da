"""Tool calls as an llguidance Lark grammar (-> `Constraint`).

`required` and a named function: the answer is the calls and nothing else, forced from the
first token. `auto`: free text that can never contain the format's trigger, or free text
up to the trigger and then forced calls (a lazy lexeme ends at the first trigger, so the
model cannot write `<tool_call>` and then anything it likes). Formats without a trigger
(Llama 3 JSON) start calls with `{`, so text may not. Each call is `%json` of an `anyOf`
over the callable functions, `name` pinned by `const` and the arguments by the function's
own schema: arguments always parse and match it.

Measured on the bundled 49k vocabulary (two tools, a shared 2-core machine under load):
checking a grammar here takes 2-6 ms; a token's mask 0.07 ms on average once a call is
forced, 0.75 ms (at most 13 ms) while `auto` still allows free text, whose lexeme must
also exclude the trigger.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

import llguidance

if TYPE_CHECKING:  # declared only in llguidance's stub, not at runtime
    from llguidance._lib import JsonCompileOptions

from aicloud.engines.base import Constraint
from aicloud.tools.formats import CallFormat
from aicloud.tools.spec import Function, Mode, ToolError, ToolSpec

# The same compact JSON as structured outputs: free whitespace lets a small model pad
# forever (each space or newline is a cheap token) and only costs tokens.
JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False}
MAX_SCHEMA_BYTES = 64 * 1024
MAX_FUNCTIONS = 128
HEADER = "%llguidance {}"


def _lit(text: str) -> str:
    """A Lark string literal; nothing for an empty string."""
    return json.dumps(text, ensure_ascii=False) if text else ""


def arguments_schema(parameters: dict[str, Any]) -> dict[str, Any]:
    """A function's parameters, closed to undeclared arguments unless the schema says
    otherwise: JSON schema's open default let the bundled model add `"c":3` to `add(a, b)`,
    which no caller can use (OpenAI's strict mode closes them too)."""
    if "additionalProperties" in parameters:
        return parameters
    return {**parameters, "additionalProperties": False}


def call_schema(functions: tuple[Function, ...], arguments_key: str) -> dict[str, Any]:
    options = [{
        "type": "object",
        "properties": {"name": {"const": f.name},
                       arguments_key: arguments_schema(f.parameters)},
        "required": ["name", arguments_key],
        "additionalProperties": False,
    } for f in functions]
    schema: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "x-guidance": JSON_OPTIONS}


def lark(spec: ToolSpec, fmt: CallFormat) -> str:
    schema = json.dumps(call_schema(spec.callable, fmt.arguments_key), ensure_ascii=False)
    more = f"({_lit(fmt.after + fmt.between + fmt.before)} call)*" if spec.many else ""
    rules = [
        f"calls: call {more} {_lit(fmt.after + fmt.last)}",
        f"call: %json {schema}",
    ]
    if spec.forced:
        return "\n".join([HEADER, f"start: {_lit(fmt.first)} calls", *rules])
    if fmt.trigger is None:  # calls start with "{", so text must not
        return "\n".join([HEADER, "start: TEXT | calls", "TEXT: /[^{](?s:.*)/", *rules])
    trigger = re.escape(fmt.trigger)
    rest = fmt.first.removeprefix(fmt.trigger)
    return "\n".join([
        HEADER,
        f"start: TEXT | head {_lit(rest)} calls",
        f"TEXT: /(?s:.*)/ & ~/(?s:.*){trigger}(?s:.*)/",
        f"head[lazy]: TEXT {_lit(fmt.trigger)}",
        *rules,
    ])


def check_functions(spec: ToolSpec) -> None:
    """Each function's schema alone, so a bad one is named by its index."""
    field = "functions" if spec.legacy else "tools"
    if len(spec.functions) > MAX_FUNCTIONS:
        raise ToolError(f"{field} lists more than {MAX_FUNCTIONS} functions", field)
    for i, function in enumerate(spec.functions):
        param = f"{field}[{i}].parameters" if spec.legacy else f"tools[{i}].function.parameters"
        if len(json.dumps(function.parameters)) > MAX_SCHEMA_BYTES:
            raise ToolError(f"the parameters schema of '{function.name}' is over "
                            f"{MAX_SCHEMA_BYTES} bytes", param)
        if function.parameters.get("type", "object") != "object":
            raise ToolError(f"the parameters of '{function.name}' must be a JSON schema "
                            "of type 'object'", param)
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                function.parameters, overrides=JSON_OPTIONS)
        except (ValueError, TypeError) as exc:
            raise ToolError(f"invalid JSON schema for '{function.name}': {exc}", param) from None
        _validate(grammar, f"the parameters schema of '{function.name}' cannot be used", param)


def constraint(spec: ToolSpec, fmt: CallFormat) -> Constraint | None:
    """The grammar for a request's tools (None when the choice is `none`); compiles it once
    without a tokenizer (the engine adds its own), so an unusable one is a 400 here."""
    if spec.choice.mode is Mode.NONE:
        return None
    check_functions(spec)
    grammar = llguidance.LLMatcher.grammar_from_lark(lark(spec, fmt))
    _validate(grammar, "the tools cannot be used together",
              "functions" if spec.legacy else "tools")
    return Constraint(grammar)


def _validate(grammar: str, what: str, param: str) -> None:
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        detail = " ".join(messages[0].split())[:300]
        raise ToolError(f"{what}: {detail}", param)
