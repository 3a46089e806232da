"""One request's life inside the batcher: prompt progress, sampled tokens, text, finish."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from aicloud.engines.base import (
    FinishReason,
    GenerationRequest,
    TokenEvent,
    TokenLogprobs,
    Usage,
)
from aicloud.engines.llamacpp.constrain import Guide
from aicloud.engines.llamacpp.sampling import TokenSampler
from aicloud.engines.llamacpp.text import StopMatcher, Utf8Stream


class SeqState(enum.IntEnum):
    WAITING = 0
    PREFILL = 1
    DECODE = 2
    FINISHED = 3


@dataclass(slots=True, eq=False)
class Sequence:
    """Mutated only by the engine thread, except `cancelled`, which any thread may set."""

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    on_event: Callable[[TokenEvent], None]  # runs on `loop`
    max_tokens: int
    state: SeqState = SeqState.WAITING
    slot: int = -1
    n_past: int = 0  # prompt tokens already in the KV cache
    cached_tokens: int = 0
    completion_tokens: int = 0
    last_token: int = 0
    last_step: int = 0  # the batcher's step that last advanced it (decoding takes turns)
    sampler: TokenSampler | None = None
    guide: Guide | None = None  # the request's grammar, if it has one
    cancelled: bool = False
    decoder: Utf8Stream = field(default_factory=Utf8Stream)
    stopper: StopMatcher = field(init=False)

    def __post_init__(self) -> None:
        self.stopper = StopMatcher(self.request.stop)

    @property
    def prompt(self) -> list[int]:
        return self.request.prompt_tokens

    @property
    def prompt_left(self) -> int:
        return len(self.prompt) - self.n_past

    @property
    def usage(self) -> Usage:
        """A sequence that never got a slot processed nothing, so it costs nothing."""
        prompt = len(self.prompt) if self.slot >= 0 else 0
        return Usage(prompt, self.completion_tokens, self.cached_tokens)

    @property
    def top_logprobs(self) -> int | None:
        """None when the request did not ask for logprobs."""
        return self.request.logprobs

    def on_token(self, token: int, piece: bytes, eog: bool,
                 logprobs: TokenLogprobs | None = None) -> TokenEvent:
        """Account for one sampled token and return the event to send for it. The
        end-of-generation token is not part of the text, so its logprobs are not sent."""
        self.completion_tokens += 1
        self.last_token = token
        if self.guide is not None and not self.guide.advance(token, eog):
            return self.finish(FinishReason.ERROR)
        if eog:
            return self.finish(FinishReason.STOP)
        lps = () if logprobs is None else (logprobs,)
        text, hit = self.stopper.push(self.decoder.feed(piece))
        if hit:
            return self.finish(FinishReason.STOP, text, flush=False, logprobs=lps)
        if self.guide is not None and self.guide.complete:
            return self.finish(FinishReason.STOP, text, logprobs=lps)
        if self.completion_tokens >= self.max_tokens:
            return self.finish(FinishReason.LENGTH, text, logprobs=lps)
        return TokenEvent(text, self.completion_tokens, logprobs=lps)

    def finish(self, reason: FinishReason, text: str = "", *, flush: bool = True,
               logprobs: tuple[TokenLogprobs, ...] = ()) -> TokenEvent:
        if flush:
            tail, hit = self.stopper.push(self.decoder.flush())
            text += tail if hit else tail + self.stopper.flush()
        self.state = SeqState.FINISHED
        return TokenEvent(text, self.completion_tokens, reason, self.usage, logprobs)
