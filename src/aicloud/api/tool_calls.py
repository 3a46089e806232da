"""The chat route's tools: a request's `tools`/`functions` as a `ToolSpec`, the messages and
grammar the engine gets, and the answer's calls in OpenAI's shape, whole or streamed.

Kept apart from the plain chat format so a request without tools takes exactly the old path.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from aicloud.api.errors import invalid
from aicloud.api.generation import Completed, Format, Run
from aicloud.api.schemas import ChatCompletionRequest, FunctionDefinition, Message
from aicloud.engines.base import (
    ChatMessage,
    ChatToolCall,
    Constraint,
    Engine,
    TokenLogprobs,
    Usage,
)
from aicloud.tools import (
    CallFormat,
    Function,
    Mode,
    StreamParser,
    ToolChoice,
    ToolError,
    ToolSpec,
    check_history,
    choose,
    constraint,
    for_template,
    parse,
)

# A grammar for a few plain tools compiles in 2-6 ms here (tools/grammar.py); one that takes
# longer than this is refused rather than left to hold the request.
COMPILE_SECONDS = 2.0
EMPTY_OBJECT: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(slots=True)
class ChatPrompt:
    """What the engine renders, and, when tools are offered, how the answer is read."""

    messages: list[ChatMessage]
    tools: list[dict[str, Any]] | None = None
    spec: ToolSpec | None = None
    fmt: CallFormat | None = None
    constraint: Constraint | None = None

    def answer_format(self, base: Format) -> ToolChatFormat | None:
        """How to read the answer (around the plain chat format `base`): None when the
        model is offered no tools."""
        if self.spec is None or not self.spec.active or self.fmt is None:
            return None
        return ToolChatFormat(self.fmt, base, legacy=self.spec.legacy)


async def chat_prompt(body: ChatCompletionRequest, engine: Engine) -> ChatPrompt:
    """Refuses (400) what tools cannot honour before anything is rendered or queued."""
    try:
        spec = tool_spec(body)
        messages = engine_messages(body.messages)
        check_history(messages)
    except ToolError as exc:
        raise invalid(exc.message, exc.param) from None
    uses_tools = any(m.tool_calls or m.role == "tool" for m in messages)
    if spec is None and not uses_tools:
        return ChatPrompt(messages)
    fmt = choose(engine.info().chat_template)
    offered = spec.functions if spec is not None and spec.active else ()
    rendered, tools = for_template(messages, offered, fmt)
    prompt = ChatPrompt(rendered, tools, spec, fmt)
    if spec is not None and spec.active:
        if _format_type(body.response_format) not in (None, "text"):
            raise invalid("response_format cannot be combined with tools the model may "
                          "call; set tool_choice to 'none' or drop response_format",
                          "response_format")
        prompt.constraint = await _compile(spec, fmt)
    return prompt


async def _compile(spec: ToolSpec, fmt: CallFormat) -> Constraint | None:
    try:
        return await asyncio.wait_for(asyncio.to_thread(constraint, spec, fmt),
                                      COMPILE_SECONDS)
    except ToolError as exc:
        raise invalid(exc.message, exc.param) from None
    except TimeoutError:
        raise invalid(f"the tools' schemas took over {COMPILE_SECONDS:g}s to compile",
                      "functions" if spec.legacy else "tools") from None


def _format_type(value: Any) -> str | None:
    if value is None:
        return None
    return value.get("type") if isinstance(value, dict) else getattr(value, "type", None)


def tool_spec(body: ChatCompletionRequest) -> ToolSpec | None:
    if body.tools and body.functions:
        raise ToolError("send either tools or the legacy functions, not both", "functions")
    if not body.tools:
        for name in ("tool_choice", "parallel_tool_calls"):
            if getattr(body, name) is not None:
                raise ToolError(f"{name} is only allowed when tools are specified", name)
    if body.function_call is not None and not body.functions:
        raise ToolError("function_call is only allowed when functions are specified",
                        "function_call")
    if body.functions:
        call = body.function_call
        choice = ToolChoice(Mode.NAMED, call.name) if call is not None and not isinstance(
            call, str) else ToolChoice(Mode(call or "auto"))
        return ToolSpec(tuple(_function(f) for f in body.functions), choice, parallel=False,
                        legacy=True)
    if body.tools:
        tc = body.tool_choice
        choice = ToolChoice(Mode.NAMED, tc.function.name) if tc is not None and not \
            isinstance(tc, str) else ToolChoice(Mode(tc or "auto"))
        parallel = True if body.parallel_tool_calls is None else body.parallel_tool_calls
        return ToolSpec(tuple(_function(t.function) for t in body.tools), choice, parallel)
    return None


def _function(definition: FunctionDefinition) -> Function:
    return Function(definition.name, definition.parameters or EMPTY_OBJECT,
                    definition.description)


def engine_messages(messages: list[Message]) -> list[ChatMessage]:
    """The request's messages for the engine. Legacy `function_call`s get ids, and each
    `function` message becomes a `tool` message answering the latest such call by name."""
    out: list[ChatMessage] = []
    legacy: dict[str, str] = {}  # function name -> id of its latest unanswered call
    for i, m in enumerate(messages):
        if (m.tool_calls or m.function_call) and m.role != "assistant":
            raise ToolError("only assistant messages carry tool calls",
                            f"messages[{i}].tool_calls")
        if m.tool_call_id and m.role != "tool":
            raise ToolError("only tool messages carry a tool_call_id",
                            f"messages[{i}].tool_call_id")
        calls = tuple(ChatToolCall(c.id, c.function.name, c.function.arguments)
                      for c in m.tool_calls or ())
        if m.function_call is not None:
            call_id = legacy[m.function_call.name] = f"call_legacy_{i}"
            calls += (ChatToolCall(call_id, m.function_call.name, m.function_call.arguments),)
        if m.role == "function":
            if not m.name:
                raise ToolError("a message with role 'function' needs the function's name",
                                f"messages[{i}].name")
            if m.name not in legacy:
                raise ToolError(f"messages[{i}] answers a call of '{m.name}', which no earlier "
                                "assistant function_call made", f"messages[{i}].name")
            out.append(ChatMessage("tool", m.text, m.name, tool_call_id=legacy.pop(m.name)))
            continue
        out.append(ChatMessage(m.role, m.text, m.name, calls, m.tool_call_id))
    return out


class ToolChatFormat:
    """Chat completion JSON for a request that offered tools: text deltas become content
    or `tool_calls` deltas (`function_call` for the legacy fields), each choice read by its
    own parser. The envelope and logprobs are the plain chat format's (`base`)."""

    def __init__(self, fmt: CallFormat, base: Format, *, legacy: bool = False) -> None:
        self.fmt = fmt
        self.base = base
        self.legacy = legacy
        self.parsers: dict[int, StreamParser] = {}

    def _finish(self, finish: str | None, calls: int) -> str | None:
        if finish != "stop" or not calls:
            return finish
        return "function_call" if self.legacy else "tool_calls"

    def _calls(self, message: dict[str, Any], calls: list[dict[str, Any]]) -> None:
        if calls and self.legacy:
            message["function_call"] = calls[0].get("function", {})
        elif calls:
            message["tool_calls"] = calls

    def chunk(self, run: Run, index: int, text: str, finish: str | None, first: bool,
              logprobs: list[TokenLogprobs]) -> dict[str, Any]:
        parser = self.parsers.setdefault(index, StreamParser(self.fmt))
        delta = parser.feed(text, final=finish is not None)
        out: dict[str, Any] = {"role": "assistant", "content": delta.content} if first else (
            {"content": delta.content} if delta.content else {})
        self._calls(out, delta.tool_calls)
        body = self.base.chunk(run, index, "", None, False, logprobs)
        body["choices"][0].update(delta=out,
                                  finish_reason=self._finish(finish, parser.calls))
        return body

    def whole(self, run: Run, choices: list[Completed], usage: Usage) -> dict[str, Any]:
        body = self.base.whole(run, choices, usage)
        for entry, choice in zip(body["choices"], choices, strict=True):
            parsed = parse(choice.text, self.fmt)
            message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
            self._calls(message, parsed.calls)
            entry.update(message=message,
                         finish_reason=self._finish(choice.finish, len(parsed.calls)))
        return body
