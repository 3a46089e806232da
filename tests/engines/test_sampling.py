"""The numpy sampler draws from softmax(logits / temperature), as llama.cpp's chain would."""

from __future__ import annotations

import numpy as np
import pytest

from aicloud.engines.base import SamplingParams
from aicloud.engines.llamacpp.sampling import (
    BLOCK,
    ChainSampler,
    SoftmaxSampler,
    build_sampler,
)

VOCAB = 3 * BLOCK + 117  # several blocks and a short last one


def logits_row(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    row = rng.normal(0.0, 2.0, VOCAB).astype(np.float32)
    row[[5, BLOCK + 3, 2 * BLOCK + 700, VOCAB - 1]] += 6.0  # a few likely tokens in each block
    return row


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_draws_follow_the_softmax_at_the_temperature(temperature: float) -> None:
    row = logits_row()
    sampler = SoftmaxSampler(SamplingParams(temperature=temperature, seed=7), VOCAB)
    n = 40_000
    counts = np.bincount([sampler.draw(row, row.max()) for _ in range(n)], minlength=VOCAB)
    expected = np.exp((row - row.max()) / temperature)
    expected /= expected.sum()
    likely = expected > 5.0 / n  # enough draws expected to compare one by one
    assert likely.sum() >= 4
    z = (counts[likely] - n * expected[likely]) / np.sqrt(n * expected[likely])
    assert np.abs(z).max() < 5.0
    # and the rest of the mass, together, lands where it should
    rest = counts[~likely].sum()
    assert abs(rest - n * expected[~likely].sum()) < 5.0 * np.sqrt(n * expected[~likely].sum()) + 5


def test_masked_tokens_are_never_drawn_even_when_the_draw_rounds_to_the_end() -> None:
    row = logits_row()
    row[BLOCK:] = -np.inf  # only the first block may be drawn
    sampler = SoftmaxSampler(SamplingParams(temperature=1.0, seed=3), VOCAB)
    draws = {sampler.draw(row, row.max()) for _ in range(3000)}
    assert max(draws) < BLOCK
    sampler._rng = _AlmostOne()  # a uniform draw a hair below 1
    assert sampler.draw(row, row.max()) == int(np.flatnonzero(np.isfinite(row))[-1])


class _AlmostOne:
    @staticmethod
    def random() -> float:
        return float(np.nextafter(1.0, 0.0))


def test_a_seed_repeats_its_draws_and_another_seed_does_not() -> None:
    row = logits_row()

    def draws(seed: int) -> list[int]:
        sampler = SoftmaxSampler(SamplingParams(temperature=1.0, seed=seed), VOCAB)
        return [sampler.draw(row, row.max()) for _ in range(50)]

    assert draws(11) == draws(11)
    assert draws(11) != draws(12)


def test_only_a_temperature_takes_the_numpy_sampler() -> None:
    for params in (SamplingParams(temperature=0.8), SamplingParams(temperature=0.0),
                   SamplingParams(temperature=1.0, seed=1)):
        sampler = build_sampler(params, VOCAB)
        assert isinstance(sampler, SoftmaxSampler)
        sampler.close()
    for params, bias in ((SamplingParams(temperature=0.8, top_k=40), None),
                         (SamplingParams(temperature=0.8, top_p=0.9), None),
                         (SamplingParams(temperature=0.8, min_p=0.1), None),
                         (SamplingParams(temperature=0.8, presence_penalty=0.5), None),
                         (SamplingParams(temperature=0.0), {5: 10.0})):
        sampler = build_sampler(params, VOCAB, bias)
        assert isinstance(sampler, ChainSampler)
        sampler.close()
