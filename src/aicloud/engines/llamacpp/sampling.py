"""Per-sequence samplers built from OpenAI-style parameters: llama.cpp's sampler chain,
or for the common request that only sets a temperature (or none), our own in numpy.

llama.cpp's temperature and dist samplers walk the whole vocabulary in scalar loops: 0.43
ms a token on SmolLM2's 49k tokens here, 14 ms of every 32-sequence step, where the
decode itself took 60 ms. `SoftmaxSampler` draws from the same distribution with
vectorised passes: 0.07 ms alone, 0.1 ms a token in the engine (docs/benchmarks.md).
"""

from __future__ import annotations

import math
from typing import Protocol

import llama_cpp
import numpy as np
import numpy.typing as npt

from aicloud.engines.base import SamplingParams

# Penalties look back over everything generated (OpenAI semantics), up to this many tokens.
PENALTY_WINDOW = 4096

# OpenAI: "-100 should result in a ban", so it bans (a finite -100 can still be sampled
# when every other logit is lower, or by a penalty-shifted distribution).
BAN = -100.0


class TokenSampler(Protocol):
    """Picks a sequence's next token from its row of the last decode's logits (engine
    thread only)."""

    def sample(self, ctx: llama_cpp.llama_context_p, index: int) -> int: ...

    def close(self) -> None: ...


def build_sampler(params: SamplingParams, n_vocab: int,
                  logit_bias: dict[int, float] | None = None) -> TokenSampler:
    if plain(params) and not logit_bias:
        return SoftmaxSampler(params, n_vocab)
    return ChainSampler(chain_sampler(params, n_vocab, logit_bias))


def plain(params: SamplingParams) -> bool:
    """Only a temperature shapes the distribution: no truncation, no penalties."""
    return (params.top_k == 0 and params.top_p >= 1.0 and params.min_p == 0.0
            and not params.presence_penalty and not params.frequency_penalty
            and params.repetition_penalty == 1.0)


class ChainSampler:
    """llama.cpp's chain: logit bias, penalties, top-k, top-p, min-p, temperature, dist."""

    def __init__(self, chain: llama_cpp.llama_sampler_p) -> None:
        self._chain: llama_cpp.llama_sampler_p | None = chain

    def sample(self, ctx: llama_cpp.llama_context_p, index: int) -> int:
        token: int = llama_cpp.llama_sampler_sample(self._chain, ctx, index)
        return token

    def close(self) -> None:
        if self._chain is not None:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None


BLOCK = 1024  # vocabulary entries summed together before the draw looks inside one block


class SoftmaxSampler:
    """Greedy (the first highest logit, as llama.cpp's greedy sampler), or a draw from
    softmax(logits / temperature) over the whole vocabulary with the request's own
    generator (its seed, or fresh entropy). The draw sums the weights in blocks, finds the
    block where the uniform target falls, then the token inside it: three vectorised
    passes over the row and one over a block, instead of a cumulative sum of all of it."""

    def __init__(self, params: SamplingParams, n_vocab: int) -> None:
        self.n_vocab = n_vocab
        self.greedy = params.greedy
        self._scale = np.float32(0.0 if params.greedy else 1.0 / params.temperature)
        self._rng = np.random.default_rng(params.seed)
        self._weights: npt.NDArray[np.float32] | None = None
        self._starts = np.arange(0, n_vocab, BLOCK)

    def sample(self, ctx: llama_cpp.llama_context_p, index: int) -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, index),
                                       shape=(self.n_vocab,))
        if self.greedy:
            return int(np.argmax(logits))
        top = logits.max()
        if not math.isfinite(top):
            return int(np.argmax(logits))
        return self.draw(logits, top)

    def draw(self, logits: npt.NDArray[np.float32], top: np.float32) -> int:
        if self._weights is None:
            self._weights = np.empty(self.n_vocab, np.float32)
        w = self._weights
        np.subtract(logits, top, out=w)
        np.multiply(w, self._scale, out=w)
        np.exp(w, out=w)  # a masked (-inf) token weighs 0 and is never drawn
        sums = np.add.reduceat(w, self._starts, dtype=np.float64)
        cum = np.cumsum(sums)
        target = self._rng.random() * cum[-1]
        block = int(np.searchsorted(cum, target, side="right"))
        if block >= len(cum):  # rounded up to the total: the last block that weighs
            block = int(np.flatnonzero(sums)[-1])
        start = block * BLOCK
        inner = np.cumsum(w[start:start + BLOCK], dtype=np.float64)
        inside = int(np.searchsorted(inner, target - (cum[block - 1] if block else 0.0),
                                     side="right"))
        if inside >= len(inner):  # the same inside the block
            inside = int(np.flatnonzero(w[start:start + BLOCK])[-1])
        return start + inside

    def close(self) -> None:
        self._weights = None


def chain_sampler(params: SamplingParams, n_vocab: int,
                  logit_bias: dict[int, float] | None = None) -> llama_cpp.llama_sampler_p:
    chain: llama_cpp.llama_sampler_p = llama_cpp.llama_sampler_chain_init(
        llama_cpp.llama_sampler_chain_default_params())

    def add(sampler: llama_cpp.llama_sampler_p) -> None:
        llama_cpp.llama_sampler_chain_add(chain, sampler)

    if logit_bias:
        add(logit_bias_sampler(logit_bias, n_vocab))
    if params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0:
        add(llama_cpp.llama_sampler_init_penalties(
            n_vocab, PENALTY_WINDOW, params.repetition_penalty,
            params.frequency_penalty, params.presence_penalty,
        ))
    if params.greedy:
        add(llama_cpp.llama_sampler_init_greedy())
        return chain
    if params.top_k > 0:
        add(llama_cpp.llama_sampler_init_top_k(params.top_k))
    if params.top_p < 1.0:
        add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
    if params.min_p > 0.0:
        add(llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
    add(llama_cpp.llama_sampler_init_temp(params.temperature))
    add(llama_cpp.llama_sampler_init_dist(sampler_seed(params.seed)))
    return chain


def sampler_seed(seed: int | None) -> int:
    """A 32-bit seed for llama.cpp's dist sampler; LLAMA_DEFAULT_SEED (2**32 - 1) means
    "random", so seeds map onto the other values: seeds that differ by less than 2**32 - 1
    stay different (n > 1 choices use seed, seed + 1, ...)."""
    if seed is None:
        return llama_cpp.LLAMA_DEFAULT_SEED
    return seed % llama_cpp.LLAMA_DEFAULT_SEED


def logit_bias_sampler(bias: dict[int, float], n_vocab: int) -> llama_cpp.llama_sampler_p:
    """llama.cpp adds each bias to its token's logit (it copies the array)."""
    entries = (llama_cpp.llama_logit_bias * len(bias))()
    for entry, (token, value) in zip(entries, sorted(bias.items()), strict=True):
        entry.token = token
        entry.bias = -math.inf if value <= BAN else value
    sampler: llama_cpp.llama_sampler_p = llama_cpp.llama_sampler_init_logit_bias(
        n_vocab, len(bias), entries)
    return sampler
