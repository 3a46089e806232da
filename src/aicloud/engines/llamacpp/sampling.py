"""Per-sequence llama.cpp sampler chains built from OpenAI-style parameters."""

from __future__ import annotations

import llama_cpp

from aicloud.engines.base import SamplingParams

# Penalties look back over everything generated (OpenAI semantics), up to this many tokens.
PENALTY_WINDOW = 4096


def build_sampler(params: SamplingParams, n_vocab: int) -> llama_cpp.llama_sampler_p:
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = lambda s: llama_cpp.llama_sampler_chain_add(chain, s)  # noqa: E731
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
    seed = llama_cpp.LLAMA_DEFAULT_SEED if params.seed is None else params.seed & 0xFFFFFFFE
    add(llama_cpp.llama_sampler_init_dist(seed))
    return chain


def free_sampler(sampler: llama_cpp.llama_sampler_p) -> None:
    llama_cpp.llama_sampler_free(sampler)
