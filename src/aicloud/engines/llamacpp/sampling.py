"""Per-sequence llama.cpp sampler chains built from OpenAI-style parameters."""

from __future__ import annotations

import math

import llama_cpp

from aicloud.engines.base import SamplingParams

# Penalties look back over everything generated (OpenAI semantics), up to this many tokens.
PENALTY_WINDOW = 4096

# OpenAI: "-100 should result in a ban", so it bans (a finite -100 can still be sampled
# when every other logit is lower, or by a penalty-shifted distribution).
BAN = -100.0


def build_sampler(params: SamplingParams, n_vocab: int,
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


def free_sampler(sampler: llama_cpp.llama_sampler_p) -> None:
    llama_cpp.llama_sampler_free(sampler)
