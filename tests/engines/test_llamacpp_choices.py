"""Choices sharing a prompt, logprobs and logit bias in the llama.cpp engine (real model)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from aicloud.engines.base import (
    ChatMessage,
    EngineError,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
)
from aicloud.engines.llamacpp.engine import LlamaCppEngine
from aicloud.engines.llamacpp.model import ContextConfig
from tests.conftest import LoopThread
from tests.engines.checks import running_engine

GREEDY = SamplingParams(temperature=0.0)
SLOW = 600  # seconds: a shared 2-core machine can decode at a token per second or less


@pytest.fixture(scope="module")
def engine(loop_thread: LoopThread) -> Iterator[LlamaCppEngine]:
    yield from running_engine(loop_thread,
                              ContextConfig(sequences=4, context_per_sequence=512))


async def events_of(engine: LlamaCppEngine, request: GenerationRequest) -> list[TokenEvent]:
    return [e async for e in await engine.generate(request)]


def test_siblings_started_after_the_first_token_share_the_prompt(
        engine: LlamaCppEngine, loop_thread: LoopThread) -> None:
    """What the API does for n > 1: the other choices start once the first has made a
    token, so they copy its prompt from its busy slot instead of computing it again
    (two tokens are always recomputed), and at temperature 0 get the same text."""
    question = "Describe, in two sentences, how a lighthouse keeper spends a stormy night."

    async def scenario() -> tuple[int, list[list[TokenEvent]]]:
        tokens = await engine.encode_chat([ChatMessage("user", question)])
        leader = await engine.generate(GenerationRequest("s0", tokens, GREEDY, 12))
        events = aiter(leader)
        head = await anext(events)
        siblings = [await engine.generate(GenerationRequest(f"s{j}", tokens, GREEDY, 12))
                    for j in (1, 2)]
        rest = [head, *[e async for e in events]]
        others = [[e async for e in s] for s in siblings]
        return len(tokens), [rest, *others]

    prompt, runs = loop_thread.run(scenario(), timeout=SLOW)
    # each sibling computed two prompt tokens; the API's counters are checked end to end
    # in tests/e2e/test_choices.py
    assert [r[-1].usage.cached_tokens for r in runs[1:]] == [prompt - 2] * 2
    texts = {"".join(e.text for e in r) for r in runs}
    assert len(texts) == 1 and texts.pop()


def test_logprobs_only_when_asked_one_per_text_token(engine: LlamaCppEngine,
                                                    loop_thread: LoopThread) -> None:
    async def scenario() -> tuple[list[TokenEvent], list[TokenEvent], list[TokenEvent]]:
        tokens = await engine.encode_chat([ChatMessage("user", "Say yes.")])
        return (await events_of(engine, GenerationRequest("a", tokens, GREEDY, 16)),
                await events_of(engine, GenerationRequest("b", tokens, GREEDY, 16,
                                                          logprobs=0)),
                await events_of(engine, GenerationRequest("c", tokens, GREEDY, 16,
                                                          logprobs=5)))

    plain, zero, five = loop_thread.run(scenario(), timeout=SLOW)
    assert all(e.logprobs == () for e in plain)
    for events in (zero, five):
        final = events[-1]
        entries = [lp for e in events for lp in e.logprobs]
        eog = final.finish_reason is FinishReason.STOP  # no stop strings: the model's end
        assert len(entries) == final.completion_tokens - eog
        assert "".join(lp.chosen.token for lp in entries) == "".join(e.text for e in events)
        assert all(lp.chosen.logprob <= 0 for lp in entries)
    assert all(lp.top == () for e in zero for lp in e.logprobs)
    for lp in (lp for e in five for lp in e.logprobs):
        assert len(lp.top) == 5 and lp.top[0] == lp.chosen  # greedy takes the best
        assert sum(2.718281828 ** a.logprob for a in lp.top) <= 1.0 + 1e-5


def test_logit_bias_bans_and_forces(engine: LlamaCppEngine, loop_thread: LoopThread) -> None:
    model = engine.model
    banana = model.tokenize(" banana", special=False)
    assert len(banana) == 1

    async def text(request: GenerationRequest) -> str:
        return "".join(e.text for e in await events_of(engine, request))

    async def scenario() -> tuple[int, list[int], list[str], str]:
        tokens = await engine.encode_text("banana banana banana banana banana banana")
        free = await events_of(engine, GenerationRequest("f", tokens, GREEDY, 6,
                                                         logprobs=0))
        chosen = [lp.chosen.token for e in free for lp in e.logprobs]
        banned = [lp.chosen.token for seed in range(2) for e in await events_of(
            engine, GenerationRequest(f"b{seed}", tokens,
                                      SamplingParams(temperature=1.5, seed=seed), 8,
                                      logprobs=0, logit_bias={banana[0]: -100}))
                  for lp in e.logprobs]
        forced = await text(GenerationRequest(
            "p", await engine.encode_text("The sky is"),
            SamplingParams(temperature=1.0, seed=4), 4, logit_bias={banana[0]: 100}))
        return chosen.count(" banana"), banana, banned, forced

    free_bananas, _, banned, forced = loop_thread.run(scenario(), timeout=SLOW)
    assert free_bananas > 0
    assert len(banned) > 8 and " banana" not in banned
    assert forced == " banana" * 4


def test_bad_logit_bias_and_logprobs_are_refused(engine: LlamaCppEngine,
                                                 loop_thread: LoopThread) -> None:
    vocab = engine.model.n_vocab
    with pytest.raises(EngineError) as bad_id:
        loop_thread.run(engine.generate(GenerationRequest("x", [1, 2, 3], GREEDY, 4,
                                                          logit_bias={vocab: 1.0})))
    assert bad_id.value.param == "logit_bias"
    with pytest.raises(EngineError) as bad_value:
        GenerationRequest("x", [1, 2], GREEDY, 4, logit_bias={5: 150.0})
    assert bad_value.value.param == "logit_bias"
    with pytest.raises(EngineError) as bad_top:
        GenerationRequest("x", [1, 2], GREEDY, 4, logprobs=21)
    assert bad_top.value.param == "top_logprobs"


def test_seeded_choices_differ_and_reproduce(
        engine: LlamaCppEngine, loop_thread: LoopThread) -> None:
    """Seeded siblings (seed, seed + 1, ...) differ from each other and reproduce."""
    base = SamplingParams(temperature=1.0, seed=21)

    async def run_all() -> list[str]:
        tokens = await engine.encode_text("My three favourite animals are")
        streams = [await engine.generate(GenerationRequest(
            f"r{j}", tokens, base.for_choice(j), 16)) for j in range(3)]
        finals = await asyncio.gather(*(s.final() for s in streams))
        assert all(f.finish_reason is not None for f in finals)
        return ["".join([e.text async for e in s]) for s in streams]

    first, again = loop_thread.run(run_all(), SLOW), loop_thread.run(run_all(), SLOW)
    assert first == again and len(set(first)) == 3
