"""How a model writes tool calls, chosen from its chat template's text.

aicloud owns the call formats rather than trusting each model to follow its own: the
grammar (grammar.py) forces the format, and the parser (parse.py) reads it back. A
template that knows tools renders them itself (they are passed as `tools=`); for one that
knows none (the bundled SmolLM2), the tools are described in the system message and the
calls are written in Hermes tags, and the conversation's earlier calls and results are
rewritten as text in that format.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from aicloud.engines.base import ChatMessage, ChatToolCall
from aicloud.tools.spec import Function


@dataclass(slots=True, frozen=True)
class CallFormat:
    """One family's layout: `first` CALL `after` (`between` `before` CALL `after`)* `last`,
    where CALL is `{"name":…,"<arguments_key>":{…}}`. `trigger` is the text that starts the
    calls after free text (None: calls start the answer with `{`, and text may not).
    `native`: the template renders the tools and the calls in the history itself."""

    name: str
    trigger: str | None
    arguments_key: str
    native: bool
    first: str
    before: str
    after: str
    between: str
    last: str


HERMES = CallFormat("hermes", "<tool_call>", "arguments", True, first="<tool_call>\n",
                    before="<tool_call>\n", after="\n</tool_call>", between="\n", last="")
MISTRAL = CallFormat("mistral", "[TOOL_CALLS]", "arguments", True, first="[TOOL_CALLS][",
                     before="", after="", between=",", last="]")
LLAMA3_JSON = CallFormat("llama3_json", None, "parameters", True, first="", before="",
                         after="", between="; ", last="")
FALLBACK = replace(HERMES, name="hermes (system prompt)", native=False)


def choose(template: str | None) -> CallFormat:
    """The format a template was trained with, from the markers it writes; templates that
    never mention `tools` get the fallback."""
    source = template or ""
    if "tools" not in source:
        return FALLBACK
    if "<tool_call>" in source:
        return HERMES
    if "[TOOL_CALLS]" in source:
        return MISTRAL
    if "<|start_header_id|>" in source and '"parameters"' in source:
        return LLAMA3_JSON
    return FALLBACK


def call_text(name: str, arguments: str, fmt: CallFormat = FALLBACK) -> str:
    """One call as the model writes it (compact JSON, the arguments kept verbatim)."""
    return (f'{{"name":{json.dumps(name, ensure_ascii=False)},'
            f'"{fmt.arguments_key}":{arguments.strip() or "{}"}}}')


FALLBACK_PROMPT = """\
You may call functions to help with the user's request. The functions are described \
in JSON inside <tools></tools> tags:
<tools>
{tools}
</tools>
To call a function, answer with a JSON object giving its name and arguments inside \
<tool_call></tool_call> tags, one call per tag:
<tool_call>
{{"name":"<function name>","arguments":{{<arguments as JSON>}}}}
</tool_call>
The result of a call comes back inside <tool_response></tool_response> tags."""


def fallback_prompt(functions: Sequence[Function]) -> str:
    tools = "\n".join(json.dumps(f.as_tool(), ensure_ascii=False) for f in functions)
    return FALLBACK_PROMPT.format(tools=tools)


def for_template(messages: Sequence[ChatMessage], functions: Sequence[Function],
                 fmt: CallFormat) -> tuple[list[ChatMessage], list[dict[str, Any]] | None]:
    """The messages and `tools=` to render. A native template gets both as they are; for
    the fallback, the tools go into the system message (an empty `functions` offers none)
    and earlier calls and results become text any template renders."""
    if fmt.native:
        tools = [f.as_tool() for f in functions] or None
        return list(messages), tools
    out = [_as_text(m) for m in messages]
    if functions:
        prompt = fallback_prompt(functions)
        if out and out[0].role in ("system", "developer"):
            out[0] = replace(out[0], content=f"{out[0].content}\n\n{prompt}".lstrip())
        else:
            out.insert(0, ChatMessage("system", prompt))
    return out, None


def _as_text(message: ChatMessage) -> ChatMessage:
    if message.tool_calls:
        calls = "\n".join(_tagged(call) for call in message.tool_calls)
        content = f"{message.content}\n{calls}" if message.content else calls
        return ChatMessage("assistant", content, message.name)
    if message.role == "tool":
        return ChatMessage("user", f"<tool_response>\n{message.content}\n</tool_response>")
    return message


def _tagged(call: ChatToolCall) -> str:
    return f"{FALLBACK.before}{call_text(call.name, call.arguments)}{FALLBACK.after}"
