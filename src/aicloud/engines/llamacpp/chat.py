"""Chat formatting with the template shipped inside the model file.

Templates come from model files, which users download from anywhere, so they are rendered
only in a sandbox (`sandbox.BoundedSandbox`: Jinja's immutable sandbox, as Hugging Face
uses, bounded in time and size), on a thread of their own, never on the event loop.

Control tokens (`<|im_start|>`…) may come only from the template, never from what a user
typed: the template is rendered with each message's text (and name) replaced by a random
sentinel, the real text put back where the sentinels landed, and only the template's own
text is read for control tokens (`ControlTokens.segments`). Where no message text contains a
control token's text (nearly always) the prompt is tokenized whole, exactly as before.
A template that changes the text it is given (`| trim`, `.split(...)`, a branch on what the
text says) would not reproduce the real render from sentinels; then each control-token
text inside a message is swapped for a random sentinel before rendering and read back as plain
text. Limits of that fallback: text that a template assembles from pieces of messages, or
that joins with the template's own text into a control token, is not recognised.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any, Protocol

from jinja2 import TemplateError

from aicloud.engines.base import ChatMessage, EngineError
from aicloud.engines.llamacpp.sandbox import BoundedSandbox, RenderLimits, TemplateLimitError

log = logging.getLogger(__name__)

# Used when a GGUF carries no template: ChatML, the format of the bundled model family.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
RENDER_THREADS = 2  # per model: a hostile template holds up only its own model's renders

Span = tuple[int, int]
Segment = str | int  # text to read as plain text, or a control token id


class TemplateRenderError(EngineError):
    code = "invalid_messages"


def _raise(message: str) -> None:
    raise TemplateRenderError(message, param="messages")


@dataclass(slots=True, frozen=True)
class Rendered:
    """A rendered prompt and the spans of it that came from messages (text and names)."""

    text: str
    user_spans: tuple[Span, ...] = ()


class ControlTokens:
    """A vocabulary's control tokens by their text: what only a template may produce."""

    def __init__(self, ids: Mapping[str, int]) -> None:
        self.ids = {text: token for text, token in ids.items() if text}
        alternatives = "|".join(map(re.escape, sorted(self.ids, key=len, reverse=True)))
        self._pattern = re.compile(alternatives) if self.ids else None
        self._anywhere = re.compile(f"(?=({alternatives}))") if self.ids else None

    def __bool__(self) -> bool:
        return self._pattern is not None

    def occurrences(self, text: str) -> Iterator[tuple[int, int]]:
        """Every place some control token's text starts (overlapping ones too)."""
        if self._anywhere is not None:
            for match in self._anywhere.finditer(text):
                yield match.start(1), match.end(1)

    def touches(self, text: str, spans: tuple[Span, ...]) -> bool:
        """Whether any control token's text overlaps one of `spans`. Only the spans (and
        a token's length around them) are searched, first for any token at all."""
        if self._pattern is None:
            return False
        reach = max(map(len, self.ids)) - 1
        for a, b in spans:
            lo = max(0, a - reach)
            window = text[lo:b + reach]
            if self._pattern.search(window) and any(
                    lo + start < b and lo + end > a for start, end in self.occurrences(window)):
                return True
        return False

    def segments(self, text: str, user_spans: tuple[Span, ...]) -> list[Segment]:
        """`text` cut at the control tokens outside `user_spans`; the rest plain text."""
        out: list[Segment] = []
        pos = 0
        for a, b in (*sorted(user_spans), (len(text), len(text))):
            if a < pos:  # a span inside the previous one (templates can repeat text)
                a = pos
            out.extend(self._split(text[pos:a]))
            out.append(text[a:b])
            pos = max(pos, b)
        merged: list[Segment] = []
        for seg in out:
            if isinstance(seg, str) and merged and isinstance(merged[-1], str):
                merged[-1] += seg
            elif seg != "":
                merged.append(seg)
        return merged

    def _split(self, template_text: str) -> list[Segment]:
        if self._pattern is None:
            return [template_text]
        out: list[Segment] = []
        pos = 0
        for match in self._pattern.finditer(template_text):
            out += [template_text[pos:match.start()], self.ids[match.group()]]
            pos = match.end()
        return [*out, template_text[pos:]]


class ChatTokenizer(Protocol):
    """What `ChatTemplate.encode` needs of a model's tokenizer."""

    @property
    def controls(self) -> ControlTokens:
        """The vocabulary's control tokens."""

    def encode_prompt(self, text: str) -> list[int]:
        """A whole rendered prompt: control tokens read, BOS/EOS added as the model does."""

    def encode_plain(self, text: str) -> list[int]:
        """Text only: control tokens' text stays text; no BOS/EOS."""

    def affixes(self) -> tuple[list[int], list[int]]:
        """The tokens the model adds before and after a whole prompt (BOS, EOS)."""


class ChatTemplate:
    def __init__(self, source: str | None, *, bos_token: str = "", eos_token: str = "",
                 model: str = "", limits: RenderLimits | None = None) -> None:
        env = BoundedSandbox(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.add_filter("tojson", lambda value, indent=None: json.dumps(
            value, ensure_ascii=False, indent=indent))
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._env = env
        self.source = source or CHATML
        self._template = env.from_string(self.source)
        self._specials = {"bos_token": bos_token, "eos_token": eos_token}
        self.model = model
        self.limits = limits or RenderLimits()
        self._reported = False
        self._pool = ThreadPoolExecutor(RENDER_THREADS, thread_name_prefix="chat-template")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def encode_async(self, messages: list[ChatMessage], tokenizer: ChatTokenizer,
                           **extra: Any) -> list[int]:
        """`encode` on the template's own threads, off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._pool, partial(self.encode, messages, tokenizer, **extra))

    def encode(self, messages: list[ChatMessage], tokenizer: ChatTokenizer,
               **extra: Any) -> list[int]:
        """The prompt's token ids, control tokens only where the template put them."""
        rendered = self.render_marked(messages, tokenizer.controls, **extra)
        if not tokenizer.controls.touches(rendered.text, rendered.user_spans):
            return tokenizer.encode_prompt(rendered.text)
        before, after = tokenizer.affixes()
        ids = list(before)
        for seg in tokenizer.controls.segments(rendered.text, rendered.user_spans):
            ids += [seg] if isinstance(seg, int) else tokenizer.encode_plain(seg)
        return ids + after

    def render(self, messages: list[ChatMessage], **extra: Any) -> str:
        """The prompt as text (blocking: call it off the event loop)."""
        return self._render([_payload(m, m.content, m.name) for m in messages], extra)

    def render_marked(self, messages: list[ChatMessage], controls: ControlTokens,
                      **extra: Any) -> Rendered:
        """The prompt, with the spans that hold message text (see the module's doc)."""
        nonce = secrets.token_hex(8)
        texts = [m.content for m in messages] + [m.name or "" for m in messages]
        marks = [f"\ue000{nonce}:{i}\ue001" for i in range(len(texts))]
        skeleton = self._render([_payload(m, marks[i], m.name and marks[len(messages) + i])
                                 for i, m in enumerate(messages)], extra)
        text, spans = _fill(skeleton, nonce, texts)
        real = self.render(messages, **extra)
        if real == text:
            return Rendered(text, spans)
        return self._render_escaped(messages, controls, nonce, extra)

    def _render_escaped(self, messages: list[ChatMessage], controls: ControlTokens, nonce: str,
                        extra: dict[str, Any]) -> Rendered:
        """For templates that change message text: only control-token text is marked."""
        pieces: list[str] = []

        def escape(content: str) -> str:
            out, pos = [], 0
            for start, end in _leftmost(controls, content):
                out += [content[pos:start], f"\ue000{nonce}:{len(pieces)}\ue001"]
                pieces.append(content[start:end])
                pos = end
            return "".join([*out, content[pos:]])

        payload = [_payload(m, escape(m.content), m.name and escape(m.name))
                   for m in messages]
        text, spans = _fill(self._render(payload, extra), nonce, pieces)
        return Rendered(text, spans)

    def _render(self, payload: list[dict[str, Any]], extra: dict[str, Any]) -> str:
        chars = sum(len(str(m.get("content", ""))) for m in payload)
        try:
            chunks = self._template.generate(messages=payload, add_generation_prompt=True,
                                             **self._specials, **extra)
            return self._env.bounded(chunks, self.limits, chars)
        except TemplateLimitError as exc:
            if not self._reported:
                self._reported = True
                log.warning("the chat template of model %s went past its limits (%s); its "
                            "requests fail with 400 chat_template_limit", self.model,
                            exc.message)
            raise
        except TemplateRenderError:
            raise
        except (TemplateError, TypeError, ValueError, ArithmeticError) as exc:
            raise TemplateRenderError(
                f"the model's chat template rejected these messages: {exc}", param="messages"
            ) from exc


def _payload(message: ChatMessage, content: str, name: str | None) -> dict[str, Any]:
    """A message as Hugging Face templates read it, with `content` and `name` given (the
    sentinels stand in for them): tool calls with their arguments as a mapping (templates
    apply `tojson` to them), the answered call's id on `tool` messages."""
    payload: dict[str, Any] = {"role": message.role, "content": content}
    if name:
        payload["name"] = name
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


def _fill(skeleton: str, nonce: str, texts: list[str]) -> tuple[str, tuple[Span, ...]]:
    """Put `texts` where their sentinels are; return the text and where each landed."""
    out: list[str] = []
    spans: list[Span] = []
    length, pos = 0, 0
    for match in re.finditer(f"\ue000{nonce}:(\\d+)\ue001", skeleton):
        head = skeleton[pos:match.start()]
        body = texts[int(match.group(1))]
        out += [head, body]
        length += len(head)
        spans.append((length, length + len(body)))
        length += len(body)
        pos = match.end()
    out.append(skeleton[pos:])
    return "".join(out), tuple(spans)


def _leftmost(controls: ControlTokens, text: str) -> list[Span]:
    """Non-overlapping control-token texts in `text`, leftmost first, longest at a place."""
    found: list[Span] = []
    for start, end in controls.occurrences(text):
        if not found or start >= found[-1][1]:
            found.append((start, end))
    return found
