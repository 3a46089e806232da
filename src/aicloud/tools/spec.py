"""What a request asks of tools, as plain data: the functions, the choice, and the checks
that make a bad request a 400 naming its field before anything is rendered or queued."""

from __future__ import annotations

import enum
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aicloud.engines.base import ChatMessage


class ToolError(ValueError):
    """The request's tools cannot be honoured; `param` names the field (a 400)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class Mode(enum.StrEnum):
    NONE = "none"  # the model answers in text; tools are not offered
    AUTO = "auto"  # text or calls, the model's choice; a started call is forced valid
    REQUIRED = "required"  # at least one call, forced from the first token
    NAMED = "named"  # exactly one call of `ToolChoice.name`, forced from the first token


@dataclass(slots=True, frozen=True)
class Function:
    name: str
    parameters: dict[str, Any]  # JSON schema of the arguments object
    description: str | None = None

    def as_tool(self) -> dict[str, Any]:
        """OpenAI's `tools` entry, as chat templates read it."""
        function: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


@dataclass(slots=True, frozen=True)
class ToolChoice:
    mode: Mode = Mode.AUTO
    name: str | None = None


@dataclass(slots=True, frozen=True)
class ToolSpec:
    """`legacy`: the request used `functions`/`function_call`, so the answer carries
    `message.function_call` (one call) and the errors name those fields."""

    functions: tuple[Function, ...]
    choice: ToolChoice = ToolChoice()
    parallel: bool = True
    legacy: bool = False

    def __post_init__(self) -> None:
        field = "functions" if self.legacy else "tools"
        names = [f.name for f in self.functions]
        if not names:
            raise ToolError(f"{field} must list at least one function", field)
        if len(set(names)) != len(names):
            raise ToolError(f"{field} lists the same function name twice", field)
        if self.choice.mode is Mode.NAMED and self.choice.name not in names:
            choice = "function_call" if self.legacy else "tool_choice"
            raise ToolError(f"{choice} names the function '{self.choice.name}', which is not "
                            f"in {field}", choice)

    @property
    def active(self) -> bool:
        """Whether the model is offered the tools at all."""
        return self.choice.mode is not Mode.NONE

    @property
    def forced(self) -> bool:
        return self.choice.mode in (Mode.REQUIRED, Mode.NAMED)

    @property
    def callable(self) -> tuple[Function, ...]:
        """The functions the model may call under the choice."""
        if self.choice.mode is Mode.NAMED:
            return tuple(f for f in self.functions if f.name == self.choice.name)
        return self.functions

    @property
    def many(self) -> bool:
        """Whether one answer may hold several calls."""
        return self.parallel and not self.legacy and self.choice.mode is not Mode.NAMED


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def check_history(messages: Sequence[ChatMessage]) -> None:
    """Every `tool` message answers a call an earlier assistant message made."""
    calls: set[str] = set()
    for i, message in enumerate(messages):
        calls.update(call.id for call in message.tool_calls)
        if message.role != "tool":
            continue
        if not message.tool_call_id:
            raise ToolError("a message with role 'tool' needs a tool_call_id",
                            f"messages[{i}].tool_call_id")
        if message.tool_call_id not in calls:
            raise ToolError(f"messages[{i}] answers the tool call '{message.tool_call_id[:64]}'"
                            ", which no earlier assistant message made",
                            f"messages[{i}].tool_call_id")
