"""Constrained decoding on llama.cpp with llguidance: one matcher per sequence, the masks of
a step's constrained sequences computed together, written into their logits rows before
each sequence's own sampler chain runs.

On SmolLM2's 49k vocabulary a JSON-schema mask costs 0.02-0.11 ms per token with llguidance
against 5-9 ms for llama.cpp's GBNF grammar sampler (issue 12), so masks are computed here
rather than with `llama_sampler_init_grammar`. A schema with length-bounded strings costs
1-2 ms a mask, a tenth of a decode step at one sequence; the mask a sequence needs after a
decode depends only on the tokens it sampled before, so it is computed ahead, on a worker
thread while the decode runs (llguidance releases the GIL), and is off the step's critical
path. Writing a mask into its logits row is ~0.05 ms in numpy.
End-of-text is in a mask only when the grammar accepts, and a sequence whose grammar is
complete ends at once (without spending a step on sampling the end token).
"""

from __future__ import annotations

import ctypes
import logging
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import llama_cpp
import llguidance
import llguidance.llamacpp
import numpy as np
from llguidance.numpy import (
    allocate_token_bitmask,
    fill_next_token_bitmask,
    fill_next_token_bitmask_par,
)
from numpy.typing import NDArray

from aicloud.engines.base import GRAMMAR_LIMITS, Constraint, EngineError

log = logging.getLogger(__name__)


def parser_limits() -> llguidance.LLParserLimits:
    return llguidance.LLParserLimits(**GRAMMAR_LIMITS)  # type: ignore[arg-type]  # int|bool


Bitmask = NDArray[np.int32]


@dataclass(slots=True, frozen=True)
class Ahead:
    """A mask being computed ahead: row `row` of `bitmask` once `done` has finished."""

    done: Future[None]
    bitmask: Bitmask
    row: int


class Guide:
    """One sequence's matcher: what it may sample next, and what it has sampled. While
    `ahead` is set a worker is computing its next mask, and nothing else may touch the
    matcher (its Rust object is borrowed for the call) until `Guidance.mask` takes it."""

    __slots__ = ("ahead", "matcher")

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher
        self.ahead: Ahead | None = None

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
    constrained request, off the event loop), an executor for the step's masks, a worker
    that computes next masks ahead, and the mask buffer."""

    def __init__(self, vocab: llama_cpp.llama_vocab_p, n_vocab: int, threads: int) -> None:
        self._vocab = vocab
        self.n_vocab = n_vocab
        self._threads = threads
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._executor: llguidance.LLExecutor | None = None
        self._lock = threading.Lock()
        self._bitmask = allocate_token_bitmask(1, n_vocab)
        self._ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llguidance")

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

    def prefetch(self, guides: list[Guide]) -> None:
        """Start computing, on the worker, the next mask of each guide that has none coming:
        called by the engine thread once a guide has consumed its token (or before its
        first decode), so the mask is ready when the decode that needs it ends."""
        todo = [g for g in guides if g.ahead is None]
        if not todo:
            return
        bitmask = allocate_token_bitmask(len(todo), self.n_vocab)
        done = self._ahead.submit(self._fill, [g.matcher for g in todo], bitmask)
        for k, g in enumerate(todo):
            g.ahead = Ahead(done, bitmask, k)

    def _fill(self, matchers: list[llguidance.LLMatcher], bitmask: Bitmask) -> None:
        """Every matcher's next mask into its row of `bitmask`, without the GIL."""
        if len(matchers) == 1:  # on this thread: no hand-off to the executor's workers
            fill_next_token_bitmask(matchers[0], bitmask, 0)
            return
        executor = self._executor
        if executor is None:  # a Guide exists only once the tokenizer (and executor) does
            raise RuntimeError("a mask before any guide was built")
        fill_next_token_bitmask_par(executor, [(m, k) for k, m in enumerate(matchers)],
                                    bitmask)

    def mask(self, ctx: llama_cpp.llama_context_p, rows: list[tuple[Guide, int]]) -> None:
        """Forbid, in each `(guide, logits index)` row of the last decode, every token its
        grammar does not allow next. Called by the engine thread between `llama_decode` and
        sampling; a mask computed ahead is waited for, the others are computed now."""
        if not rows:
            return
        fresh = [g for g, _ in rows if g.ahead is None]
        if fresh:
            if len(self._bitmask) < len(fresh):
                self._bitmask = allocate_token_bitmask(len(fresh), self.n_vocab)
            self._fill([g.matcher for g in fresh], self._bitmask)
            for k, g in enumerate(fresh):
                g.ahead = Ahead(_DONE, self._bitmask, k)
        for guide, index in rows:
            ahead = guide.ahead
            assert ahead is not None
            ahead.done.result()  # re-raises what failed on the worker
            guide.ahead = None
            self._forbid(llama_cpp.llama_get_logits_ith(ctx, index), ahead.bitmask[ahead.row])

    def _forbid(self, row: ctypes._Pointer[ctypes.c_float], mask: Bitmask) -> None:
        """-inf into the logits row wherever the mask's bit is clear (in place, no copy)."""
        logits = np.ctypeslib.as_array(row, shape=(self.n_vocab,))
        allowed = np.unpackbits(mask.view(np.uint8), count=self.n_vocab, bitorder="little")
        np.copyto(logits, -np.inf, where=~allowed.view(np.bool_))

    def close(self) -> None:
        """Stop the worker (after the engine thread, its only client, has stopped)."""
        self._ahead.shutdown(wait=True)


_DONE: Future[None] = Future()
_DONE.set_result(None)
