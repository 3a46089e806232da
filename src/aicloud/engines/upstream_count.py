"""Counting a relayed request's tokens when its provider reports none, with the model's
own tokenizer: a GGUF named by the catalog entry's `options["tokenizer"]` (any GGUF of
the same model family; only its vocabulary and chat template are read, llama.cpp's
`vocab_only`, a few megabytes). The prompt is counted as the local engine would
tokenize it (a chat rendered with the file's template, a text prompt with BOS), the
answer as its plain text. Without a tokenizer the caller estimates (`Usage.estimated`).

An answer with tool calls is counted from the calls' JSON, not from the model's own
call syntax, so it stays an estimate; so does anything the tokenizer cannot read.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from aicloud.engines.base import ChatMessage, ChatToolCall, EngineError, RelayBody, Usage
from aicloud.engines.llamacpp.chat import ChatTemplate
from aicloud.engines.llamacpp.model import ModelLoadError, VocabOnly, check_gguf_path

log = logging.getLogger(__name__)

TOKENIZER = "tokenizer"  # the catalog option naming the file
CACHED = 8  # tokenizers kept loaded, by file


class TokenCounter:
    """One GGUF's vocabulary and chat template. Blocking: call it off the event loop."""

    def __init__(self, path: Path) -> None:
        self.vocab = VocabOnly(path)
        self.template = ChatTemplate(self.vocab.metadata("tokenizer.chat_template"),
                                     bos_token=self.vocab.bos_text,
                                     eos_token=self.vocab.eos_text, model=path.name)

    def chat(self, messages: Sequence[Mapping[str, Any]],
             tools: list[dict[str, Any]] | None = None) -> int:
        """The prompt of a chat request, as the local engine's `encode_chat` counts it."""
        extra = {"tools": tools} if tools else {}
        return len(self.template.encode(chat_messages(messages), self.vocab, **extra))

    def prompt(self, text: str) -> int:
        """A text prompt or an embeddings input, as `encode_text` counts it (with BOS)."""
        return len(self.vocab.tokenize(text, special=False))

    def answer(self, text: str) -> int:
        """Generated text: its tokens only, no BOS."""
        return len(self.vocab.encode_plain(text))


def count_relay(counter: TokenCounter, relay: RelayBody, answer: str | None, estimate: int,
                limit: int | None) -> Usage:
    """A relayed chat or text completion's usage: the prompt counted, and the answer
    (`None`: not countable exactly, then `estimate` and the usage is marked estimated),
    at most `limit` tokens (what the provider was allowed to make)."""
    fields = relay.fields
    if relay.endpoint == "chat/completions":
        prompt = counter.chat(fields["messages"], fields.get("tools"))
    else:
        prompt = _text_prompt(counter, fields.get("prompt"))
    if answer is None:
        return Usage(prompt, estimate, 0, estimated=True)
    made = counter.answer(answer)
    return Usage(prompt, made if limit is None else min(made, limit))


def _text_prompt(counter: TokenCounter, prompt: Any) -> int:
    """/v1/completions takes one prompt here: text, or token ids (counted as sent)."""
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if isinstance(prompt, str):
        return counter.prompt(prompt)
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return len(prompt)
    raise TypeError("not a single prompt")


def chat_messages(messages: Sequence[Mapping[str, Any]]) -> list[ChatMessage]:
    """OpenAI chat messages (as the caller sent them) as the template reads them; content
    parts are joined as the local route joins them. Raises KeyError/TypeError on shapes
    the schema would not have let through."""
    out: list[ChatMessage] = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        calls = tuple(ChatToolCall(str(c["id"]), str(c["function"]["name"]),
                                   str(c["function"]["arguments"]))
                      for c in m.get("tool_calls") or ())
        out.append(ChatMessage(str(m["role"]), str(content or ""), m.get("name"), calls,
                               m.get("tool_call_id")))
    return out


@functools.lru_cache(maxsize=CACHED)
def _load(path: str, _mtime_ns: int, _size: int) -> TokenCounter:
    return TokenCounter(Path(path))


def counter_for(path: str) -> TokenCounter:
    """The counter of a tokenizer file, loaded once per file (and again if it changed)."""
    stat = Path(path).stat()
    return _load(path, stat.st_mtime_ns, stat.st_size)


def check_tokenizer(value: Any) -> str:
    """`options["tokenizer"]` as an absolute path to a GGUF whose vocabulary llama.cpp
    reads, or a clear refusal (at `models add`, not at the first request)."""
    if not isinstance(value, str) or not value.strip():
        raise EngineError("options.tokenizer must be the path of a GGUF file",
                          param="options.tokenizer")
    try:
        path = check_gguf_path(Path(value).expanduser())
        counter_for(str(path))
    except ModelLoadError as exc:
        raise EngineError(f"options.tokenizer: {exc.message}",
                          param="options.tokenizer") from None
    return str(path)
