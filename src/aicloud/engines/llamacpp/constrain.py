"""Constrained decoding on llama.cpp with llguidance: one matcher per sequence, the masks of
a step's constrained sequences computed together, written into their logits rows before
each sequence's own sampler chain runs.

On SmolLM2's 49k vocabulary a JSON-schema mask costs 0.02-0.11 ms per token with llguidance
against 5-9 ms for llama.cpp's GBNF grammar sampler (issue 12), so masks are computed here
rather than with `llama_sampler_init_grammar`; writing one mask into its logits row as -inf
in numpy took 0.75 ms with the 2 cores ~9x oversubscribed (about 0.1 ms on a quiet one).
End-of-text is in a mask only when the grammar accepts, and a sequence whose grammar is
complete ends at once (without spending a step on sampling the end token).
"""

from __future__ import annotations

import logging
import threading
import warnings

import llama_cpp
import llguidance
import llguidance.llamacpp
import numpy as np
from llguidance.numpy import (
    allocate_token_bitmask,
    fill_next_token_bitmask,
    fill_next_token_bitmask_par,
)

from aicloud.engines.base import GRAMMAR_LIMITS, Constraint, EngineError

log = logging.getLogger(__name__)


def parser_limits() -> llguidance.LLParserLimits:
    return llguidance.LLParserLimits(**GRAMMAR_LIMITS)  # type: ignore[arg-type]  # int|bool


class Guide:
    """One sequence's matcher: what it may sample next, and what it has sampled."""

    __slots__ = ("matcher",)

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher

    def advance(self, token: int, eog: bool) -> bool:
        """Consume a sampled token. False if the matcher failed: on its step limits while
        computing the mask (which then allows only end-of-text, so the text would look
        finished), or on a token it refuses (a bug: masks only allow what it accepts)."""
        if not self.matcher.is_error() and (eog or self.matcher.consume_token(token)):
            return True  # end-of-text was in the mask, so the grammar accepts here
        log.error("constrained sequence failed at token %d: %s", token,
                  self.matcher.get_error()[:200])
        return False

    @property
    def complete(self) -> bool:
        """Nothing may follow but end-of-text: the sequence is done."""
        return self.matcher.is_stopped()


class Guidance:
    """Per model: the llguidance tokenizer (built once, ~1 s for 49k tokens, on the first
    constrained request, off the event loop), an executor for the step's masks, and the
    mask buffer."""

    def __init__(self, vocab: llama_cpp.llama_vocab_p, n_vocab: int, threads: int) -> None:
        self._vocab = vocab
        self.n_vocab = n_vocab
        self._threads = threads
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._executor: llguidance.LLExecutor | None = None
        self._lock = threading.Lock()
        self._bitmask = allocate_token_bitmask(1, n_vocab)

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                with warnings.catch_warnings():  # one deprecation warning per token
                    warnings.simplefilter("ignore", DeprecationWarning)
                    self._tokenizer = llguidance.llamacpp.lltokenizer_from_vocab(self._vocab)
                self._executor = llguidance.LLExecutor(num_threads=self._threads)
            return self._tokenizer

    def guide(self, constraint: Constraint) -> Guide:
        """A fresh matcher for one sequence (blocking: call it off the event loop). The
        lexer is built here against the model's tokens, so a grammar the API could not
        fully check is refused here, before the request is queued."""
        matcher = llguidance.LLMatcher(self.tokenizer, constraint.grammar, log_level=0,
                                       limits=parser_limits())
        if matcher.is_error():
            message = " ".join(matcher.get_error().split())[:300]
            raise EngineError(f"the response format cannot be used: {message}",
                              param="response_format")
        return Guide(matcher)

    def mask(self, ctx: llama_cpp.llama_context_p, rows: list[tuple[Guide, int]]) -> None:
        """Forbid, in each `(guide, logits index)` row of the last decode, every token its
        grammar does not allow next. Called by the engine thread between `llama_decode` and
        sampling; llguidance computes all rows in parallel without the GIL."""
        if not rows:
            return
        if len(self._bitmask) < len(rows):
            self._bitmask = allocate_token_bitmask(len(rows), self.n_vocab)
        bitmask = self._bitmask[: len(rows)]
        executor = self._executor
        if executor is None:  # a Guide exists only once the tokenizer (and executor) does
            raise RuntimeError("mask() before any guide was built")
        if len(rows) == 1:  # on this thread: no hand-off to the executor's workers
            fill_next_token_bitmask(rows[0][0].matcher, bitmask, 0)
        else:
            fill_next_token_bitmask_par(executor, [(g.matcher, k) for k, (g, _) in
                                                   enumerate(rows)], bitmask)
        for k, (_, index) in enumerate(rows):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, index),
                                           shape=(self.n_vocab,))
            allowed = np.unpackbits(bitmask[k].view(np.uint8), bitorder="little")
            logits[allowed[: self.n_vocab] == 0] = -np.inf
