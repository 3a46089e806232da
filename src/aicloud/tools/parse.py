"""Reading tool calls back out of the model's text, whole or while it streams.

One scanner serves both: it finds where the calls begin (the format's trigger, or a `{`
opening the answer), keeps the text before as content, and reads each top-level JSON
object after it as a call: `name` first, then the arguments, whose raw text grows as the
tokens arrive. The streaming side diffs successive scans, so a delta never carries a
partial `<tool_call>` as content and an argument fragment is never taken back.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aicloud.tools.formats import CallFormat
from aicloud.tools.spec import new_call_id

# `{"name":"…","arguments":` as the grammar writes it (spaces tolerated for unforced text)
HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"'
                  r'\s*:\s*')


@dataclass(slots=True, frozen=True)
class PartialCall:
    name: str | None  # None until the whole name has arrived
    arguments: str  # raw JSON text so far (all of it once `complete`)
    complete: bool


@dataclass(slots=True, frozen=True)
class Scan:
    content: str  # text that is surely content (a possible trigger prefix held back)
    calls: tuple[PartialCall, ...]
    started: bool  # the calls have begun: nothing after them is content


def _end_of_value(text: str, start: int) -> int | None:
    """Index just past the JSON object or array opening at `start`; None if unfinished."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _call(obj: str, complete: bool) -> PartialCall | None:
    head = HEAD.match(obj)
    if head is not None:
        name = json.loads(f'"{head.group(1)}"')
        end = _end_of_value(obj, head.end()) if obj[head.end():head.end() + 1] in "{[" \
            else None
        arguments = obj[head.end():end] if end is not None else obj[head.end():]
        if complete and end is None:  # a scalar where an object belongs (unforced text)
            arguments = obj[head.end():].rstrip().removesuffix("}").rstrip()
        return PartialCall(name, arguments, complete)
    if not complete:
        return PartialCall(None, "", False)
    return _loose(obj)


def _loose(obj: str) -> PartialCall | None:
    """A finished object in another key order (only text nothing forced can look so)."""
    try:
        value = json.loads(obj)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        return PartialCall(value["name"], arguments, True)
    return PartialCall(value["name"], json.dumps(arguments, ensure_ascii=False), True)


def _start(text: str, fmt: CallFormat, final: bool) -> tuple[int | None, int]:
    """Where the calls begin (None: not yet), and how much text is surely content."""
    if fmt.trigger is None:
        body = text.lstrip()
        if body.startswith("{"):
            return len(text) - len(body), 0
        return None, len(text) if (body or final) else 0
    at = text.find(fmt.trigger)
    if at >= 0:
        return at, at
    if final:
        return None, len(text)
    for keep in range(min(len(fmt.trigger) - 1, len(text)), 0, -1):
        if fmt.trigger.startswith(text[-keep:]):
            return None, len(text) - keep
    return None, len(text)


def scan(text: str, fmt: CallFormat, final: bool = False) -> Scan:
    start, sure = _start(text, fmt, final)
    if start is None:
        content = text[:sure] if final else text[:sure].rstrip()
        return Scan(content, (), False)
    calls: list[PartialCall] = []
    at = start + len(fmt.trigger or "")
    while (opening := text.find("{", at)) >= 0:
        end = _end_of_value(text, opening)
        call = _call(text[opening:end], complete=end is not None)
        if call is not None:
            calls.append(call)
        if end is None:
            break
        at = end
    return Scan(text[:start].rstrip(), tuple(calls), True)


@dataclass(slots=True)
class Parsed:
    """A whole answer: `content` is None when it is only calls."""

    content: str | None
    calls: list[dict[str, Any]]


def parse(text: str, fmt: CallFormat, new_id: Callable[[], str] = new_call_id) -> Parsed:
    result = scan(text, fmt, final=True)
    calls = [_tool_call(new_id(), c.name, c.arguments) for c in result.calls if c.name]
    if not calls:
        return Parsed(text, [])
    return Parsed(result.content or None, calls)


def _tool_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": arguments}}


@dataclass(slots=True)
class Delta:
    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


class StreamParser:
    """Text deltas in, content or `tool_calls` deltas out, as OpenAI streams them: a call's
    first delta carries its index, id, type and name, later ones argument fragments."""

    def __init__(self, fmt: CallFormat, new_id: Callable[[], str] = new_call_id) -> None:
        self.fmt = fmt
        self._new_id = new_id
        self._text = ""
        self._content_sent = 0
        self._arguments_sent: list[int] = []
        self.ids: list[str] = []

    @property
    def calls(self) -> int:
        return len(self.ids)

    def feed(self, text: str, final: bool = False) -> Delta:
        self._text += text
        result = scan(self._text, self.fmt, final)
        delta = Delta()
        if not self.ids and not (result.calls and result.calls[0].name):
            # content goes out only while no call has been announced; an answer that ends
            # without one (a trigger then nothing usable) is content, as `parse` says
            content = self._text if final and result.started else result.content
            if len(content) > self._content_sent:
                delta.content = content[self._content_sent:]
                self._content_sent = len(content)
        for index, call in enumerate(result.calls):
            if call.name is None:
                break
            if index == len(self.ids):
                self.ids.append(self._new_id())
                self._arguments_sent.append(len(call.arguments))
                delta.tool_calls.append({"index": index, **_tool_call(
                    self.ids[index], call.name, call.arguments)})
            elif len(call.arguments) > self._arguments_sent[index]:
                fragment = call.arguments[self._arguments_sent[index]:]
                self._arguments_sent[index] = len(call.arguments)
                delta.tool_calls.append({"index": index, "function": {"arguments": fragment}})
        return delta
