"""Chat formatting with the template shipped inside the model file.

Templates come from model files, which users download from anywhere, so they are rendered
only in Jinja's immutable sandbox (as Hugging Face does): no attribute access to Python
internals, no mutation of the messages we pass in.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from aicloud.engines.base import ChatMessage, EngineError

# Used when a GGUF carries no template: ChatML, the format of the bundled model family.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class TemplateRenderError(EngineError):
    code = "invalid_messages"


def _raise(message: str) -> None:
    raise TemplateRenderError(message, param="messages")


class ChatTemplate:
    def __init__(self, source: str | None, *, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = lambda value, indent=None: json.dumps(
            value, ensure_ascii=False, indent=indent
        )
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.source = source or CHATML
        self._template = env.from_string(self.source)
        self._specials = {"bos_token": bos_token, "eos_token": eos_token}

    def render(self, messages: list[ChatMessage],
               tools: list[dict[str, Any]] | None = None) -> str:
        payload = [_payload(m) for m in messages]
        extra: dict[str, Any] = {"tools": tools} if tools else {}
        try:
            return self._template.render(
                messages=payload, add_generation_prompt=True, **self._specials, **extra
            )
        except TemplateRenderError:
            raise
        except (TemplateError, TypeError, ValueError) as exc:
            raise TemplateRenderError(
                f"the model's chat template rejected these messages: {exc}", param="messages"
            ) from exc


def _payload(message: ChatMessage) -> dict[str, Any]:
    """A message as Hugging Face templates read it: tool calls with their arguments as a
    mapping (templates apply `tojson` to them), the answered call's id on `tool` messages."""
    payload: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.name:
        payload["name"] = message.name
    if message.tool_calls:
        payload["tool_calls"] = [
            {"id": call.id, "type": "function",
             "function": {"name": call.name, "arguments": _arguments(call.arguments)}}
            for call in message.tool_calls
        ]
    if message.tool_call_id:
        payload["tool_call_id"] = message.tool_call_id
    return payload


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text
