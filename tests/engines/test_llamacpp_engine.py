"""The continuous-batching engine on the real bundled model."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from aicloud.engines.base import (
    ChatMessage,
    ContextLengthExceeded,
    FinishReason,
    GenerationRequest,
    Priority,
    SamplingParams,
    TokenEvent,
)
from aicloud.engines.llamacpp.engine import LlamaCppEngine
from aicloud.engines.llamacpp.model import ContextConfig
from aicloud.engines.llamacpp.sequence import Sequence
from aicloud.engines.llamacpp.slots import common_prefix
from aicloud.models.catalog import bundled_model
from aicloud.scheduling.admission import AdmittedStream, Admitter
from aicloud.scheduling.fair_queue import FairQueue, SchedulingConfig
from tests.conftest import LoopThread
from tests.engines.checks import check_stop_string_cuts_the_text, running_engine

GREEDY = SamplingParams(temperature=0.0)
SLOTS = 4


@pytest.fixture(scope="module")
def engine(loop_thread: LoopThread) -> Iterator[LlamaCppEngine]:
    yield from running_engine(loop_thread,
                              ContextConfig(sequences=SLOTS, context_per_sequence=1024))


async def run(engine: LlamaCppEngine, prompt: str, max_tokens: int = 32, *,
              stop: tuple[str, ...] = (), chat: bool = True,
              sampling: SamplingParams = GREEDY) -> tuple[list[TokenEvent], str]:
    tokens = await (engine.encode_chat([ChatMessage("user", prompt)]) if chat
                    else engine.encode_text(prompt))
    stream = await engine.generate(GenerationRequest("t", tokens, sampling, max_tokens, stop))
    events = [e async for e in stream]
    return events, "".join(e.text for e in events)



def batch_line(name: str, prompt: list[int], max_tokens: int, *,
               scoped: bool = False) -> GenerationRequest:
    """A greedy batch-class request of tenant "t"; `scoped`: in a cache scope of its own,
    so no prefix of another is reused."""
    return GenerationRequest(name, prompt, GREEDY, max_tokens, tenant="t",
                             priority=Priority.BATCH, cache_scope=name if scoped else "")

PROMPTS = [
    "Hi",
    "What is the capital of France? Answer briefly.",
    "List three colours of the rainbow and explain, in a few sentences, why the sky is blue "
    "during the day but red and orange at sunset. Mention scattering of light by air.",
    "Name a fruit.",
    "Translate 'good morning' into Spanish, French and German, one per line.",
    "Why do cats purr? " * 12,
]


def test_concurrent_requests_all_finish_with_their_own_text(engine: LlamaCppEngine,
                                                            loop_thread: LoopThread) -> None:
    async def together() -> list[tuple[list[TokenEvent], str]]:
        return await asyncio.gather(*(run(engine, p) for p in PROMPTS))

    results = loop_thread.run(together())
    assert len(results) == len(PROMPTS) > SLOTS
    for events, text in results:
        assert text and events[-1].finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    usage = [events[-1].usage for events, _ in results]
    assert len({u.prompt_tokens for u in usage}) == len(set(PROMPTS))


def test_batch_of_mixed_prompt_lengths_gives_each_request_its_text_alone(
        engine: LlamaCppEngine, loop_thread: LoopThread) -> None:
    """At temperature 0 a request's text must not depend on what runs beside it: more
    prompts than slots, so some join while others decode or finish, in both orders, with
    the slots' cached prefixes (computed by other prompts) reused along the way."""
    alone = {p: loop_thread.run(run(engine, p, 48))[1] for p in PROMPTS}

    async def together(order: list[str]) -> list[tuple[list[TokenEvent], str]]:
        return await asyncio.gather(*(run(engine, p, 48) for p in order))

    for order in (PROMPTS, PROMPTS[::-1]):
        texts = [text for _, text in loop_thread.run(together(order))]
        assert texts == [alone[p] for p in order]


def test_usage_and_finish_reasons_are_truthful(engine: LlamaCppEngine,
                                               loop_thread: LoopThread) -> None:
    events, _ = loop_thread.run(run(engine, "Write a long story about the sea.", 7))
    final = events[-1]
    assert final.finish_reason is FinishReason.LENGTH
    assert final.usage is not None and final.usage.completion_tokens == 7
    assert all(e.finish_reason is None for e in events[:-1])
    events, _ = loop_thread.run(run(engine, "Say yes.", 200))
    assert events[-1].finish_reason is FinishReason.STOP
    assert events[-1].usage.completion_tokens < 200


def test_stop_string_split_across_tokens(engine: LlamaCppEngine,
                                         loop_thread: LoopThread) -> None:
    check_stop_string_cuts_the_text(
        lambda prompt, n, stop: loop_thread.run(run(engine, prompt, n, stop=stop)))


@pytest.mark.parametrize("prompt", [
    "한국어로 자기소개를 해 주세요.",
    "请用中文写一首关于月亮的短诗。",
    "Reply with many emoji: 🎉🐍🚀🌊🔥",
])
def test_multibyte_output_is_always_valid_utf8(engine: LlamaCppEngine, loop_thread: LoopThread,
                                              prompt: str) -> None:
    """A character split across tokens reaches the stream whole: the streamed text is the
    decode of all the sampled tokens' bytes at once, and no event holds a replacement
    character the whole bytes do not (a model may sample bytes that are not UTF-8 at all,
    which only a replacement character can show; which it samples depends on the weight
    format this machine serves, so the check compares with the bytes, not with a text)."""
    async def scenario(seed: int) -> list[TokenEvent]:
        tokens = await engine.encode_chat([ChatMessage("user", prompt)])
        sampling = SamplingParams(temperature=1.0, seed=seed)
        stream = await engine.generate(GenerationRequest("t", tokens, sampling, 60,
                                                         logprobs=0))
        return [e async for e in stream]

    texts = []
    for seed in range(7, 13):  # a small model answers some of these in English
        events = loop_thread.run(scenario(seed))
        raw = b"".join(lp.chosen.raw for e in events for lp in e.logprobs)
        whole = raw.decode("utf-8", errors="replace")
        text = "".join(e.text for e in events)
        # bytes of a character cut by max_tokens are dropped or shown replaced: either way
        assert text in (whole, whole.rstrip("\ufffd"))
        for event in events:
            event.text.encode("utf-8")  # raises on lone surrogates
            assert "\ufffd" not in event.text or "\ufffd" in whole
        texts.append(text)
    assert any(ord(c) > 0x7F for text in texts for c in text), "the check needs multibyte output"


def test_prefix_reuse_reports_cached_tokens(engine: LlamaCppEngine,
                                            loop_thread: LoopThread) -> None:
    system = "You are a meticulous assistant for a shipping company. " * 8

    async def ask(question: str) -> tuple[list[int], TokenEvent]:
        tokens = await engine.encode_chat([ChatMessage("system", system),
                                           ChatMessage("user", question)])
        stream = await engine.generate(GenerationRequest("p", tokens, GREEDY, 4))
        return tokens, [e async for e in stream][-1]

    first_tokens, _ = loop_thread.run(ask("Where is my parcel?"))
    tokens, second = loop_thread.run(ask("How much does shipping cost?"))
    shared = common_prefix(first_tokens, tokens)
    assert shared > 80
    assert second.usage.cached_tokens == shared
    assert second.usage.prompt_tokens == len(tokens)


def test_cancel_frees_capacity(engine: LlamaCppEngine, loop_thread: LoopThread) -> None:
    async def scenario() -> tuple[TokenEvent, TokenEvent, int]:
        tokens = await engine.encode_text("Once upon a time, in a land far away,")
        streams = [await engine.generate(GenerationRequest(f"c{i}", tokens,
                                                           SamplingParams(seed=i), 900))
                   for i in range(SLOTS)]
        await asyncio.sleep(0.5)
        waiting = await engine.generate(GenerationRequest("late", tokens, GREEDY, 3))
        await asyncio.sleep(0.3)
        queued = engine.stats().waiting
        streams[0].cancel()
        late = await asyncio.wait_for(waiting.final(), 30)
        cancelled = await streams[0].final()
        for s in streams[1:]:
            s.cancel()
        await asyncio.gather(*(s.final() for s in streams[1:]))
        return late, cancelled, queued

    late, cancelled, queued = loop_thread.run(scenario())
    assert queued == 1, "the late request should have waited for a free slot"
    assert late.finish_reason is FinishReason.LENGTH and late.usage.completion_tokens == 3
    assert cancelled.finish_reason is FinishReason.CANCELLED
    assert 0 < cancelled.usage.completion_tokens < 900
    assert engine.stats().running == 0


def test_cancel_while_queued_never_runs(engine: LlamaCppEngine, loop_thread: LoopThread) -> None:
    async def scenario() -> TokenEvent:
        tokens = await engine.encode_text("Tell me a story.")
        busy = [await engine.generate(GenerationRequest(f"b{i}", tokens, SamplingParams(seed=i),
                                                        400)) for i in range(SLOTS)]
        queued = await engine.generate(GenerationRequest("q", tokens, GREEDY, 50))
        queued.cancel()
        final = await asyncio.wait_for(queued.final(), 5)
        for s in busy:
            s.cancel()
        await asyncio.gather(*(s.final() for s in busy))
        return final

    final = loop_thread.run(scenario())
    assert final.finish_reason is FinishReason.CANCELLED
    assert final.usage.completion_tokens == 0


def test_prompt_beyond_context_is_refused(engine: LlamaCppEngine,
                                          loop_thread: LoopThread) -> None:
    async def scenario() -> None:
        tokens = await engine.encode_text("word " * 2000)
        await engine.generate(GenerationRequest("x", tokens, GREEDY, 1))

    with pytest.raises(ContextLengthExceeded):
        loop_thread.run(scenario())


def test_stats_report_kv_and_slots(engine: LlamaCppEngine) -> None:
    stats = engine.stats()
    assert stats.kv_cells_total == SLOTS * 1024
    assert 0 < stats.kv_cells_used <= stats.kv_cells_total
    assert engine.info().max_sequences == SLOTS


def test_narrow_steps_let_sequences_take_turns(loop_thread: LoopThread) -> None:
    """Four sequences, two decoded per step: every one still runs to its end, and no step
    decoded more than two (prefill is not limited: it makes each first token at once)."""
    spec = bundled_model()
    eng = LlamaCppEngine(spec.model_id, spec.path,
                         ContextConfig(sequences=4, context_per_sequence=512, step_sequences=2))

    async def scenario() -> tuple[list[TokenEvent], int, int | None]:
        await eng.start()
        try:
            tokens = await eng.encode_text("Count slowly: one, two, three,")
            streams = [await eng.generate(GenerationRequest(
                f"n{i}", tokens, SamplingParams(seed=i, temperature=0.7), 12, ()))
                for i in range(4)]
            finals = await asyncio.gather(*(s.final() for s in streams))
            return finals, eng.batcher.steps, eng.config.step_sequences
        finally:
            await eng.close()

    finals, steps, width = loop_thread.run(scenario())
    made = sum(f.completion_tokens for f in finals)
    assert all(f.finish_reason in (FinishReason.LENGTH, FinishReason.STOP) for f in finals)
    assert width == 2 and made > 4
    assert steps >= (made - len(finals)) / 2 + 1


# a flood's length: after its first token it has this many steps to go, where a newcomer
# needs about six to start and end; so the newcomer ends first on any machine, unless the
# event loop stalls for the whole flood between reading its first tokens and handing the
# newcomer over
FLOOD = 200


class Deliveries:
    """Every event the engine delivers, in the order its steps made them (they reach the
    event loop in that order), with the sequences it was handed."""

    def __init__(self, engine: LlamaCppEngine) -> None:
        self.log: list[tuple[str, TokenEvent]] = []
        self.sequences: dict[str, Sequence] = {}
        self.handed_at: dict[str, int] = {}  # the step in flight or last done when handed
        self._batcher = batcher = engine.batcher
        submit = batcher.submit

        def logged(seq: Sequence) -> None:
            name, deliver = seq.request.request_id, seq.on_event

            def on_event(event: TokenEvent) -> None:
                self.log.append((name, event))
                deliver(event)

            seq.on_event = on_event
            self.sequences[name] = seq
            with batcher._wake:  # a step counts up outside it: this is the last one planned
                self.handed_at[name] = batcher.steps
                submit(seq)

        batcher.submit = logged  # type: ignore[method-assign]

    @property
    def parks(self) -> int:
        """Sequences parked (or sent back to the line) so far, also once the engine closed."""
        return self._batcher.parks

    @property
    def preempted(self) -> int:
        """Batch steps cut short for an interactive newcomer so far."""
        return self._batcher.preempted

    def first_step(self, name: str) -> int:
        """The step that made a finished sequence's first token, for one that decoded in
        every step from its first token to its last."""
        seq = self.sequences[name]
        return seq.last_step - seq.completion_tokens + 1

    def finals(self) -> list[str]:
        """Who ended, in order."""
        return [who for who, e in self.log if e.finish_reason is not None]

    def between(self, name: str) -> list[str]:
        """Who else got tokens between `name`'s first and final events."""
        mine = [i for i, (who, _) in enumerate(self.log) if who == name]
        return [who for who, _ in self.log[mine[0] : mine[-1]] if who != name]


def test_a_tenant_alone_fills_every_slot_and_a_newcomer_starts_at_once(
        loop_thread: LoopThread) -> None:
    """Behind the admission layer: one tenant's requests take every slot (none is kept
    idle for others), and a newcomer of another tenant still starts at once: the engine
    parks one of the flood's sequences (its KV cells copied out and back), the newcomer
    makes its first token in the step after it is handed over or the next, and it ends
    before any of the flood does; the flood's texts at temperature 0 are still the text
    each gets alone. (Asserted on the order of events, not on counts at a moment: the
    flood is long: see FLOOD.)"""
    spec = bundled_model()
    engine = LlamaCppEngine(spec.model_id, spec.path,
                            ContextConfig(sequences=4, context_per_sequence=512))
    admitter = Admitter(engine)

    async def scenario() -> tuple[str, int, list[str], Deliveries]:
        await admitter.start()
        try:
            counting = await engine.encode_text("1, 2, 3, 4, 5, 6,")
            fruit = await engine.encode_chat([ChatMessage("user", "Name a fruit.")])
            long = FLOOD

            def ask(name: str, tenant: str, prompt: list[int], n: int) -> GenerationRequest:
                return GenerationRequest(name, prompt, GREEDY, n, tenant=tenant)

            alone = [e async for e in await admitter.generate(ask("a", "heavy", counting,
                                                                  long))]
            seen = Deliveries(engine)
            flood = [await admitter.generate(ask(f"h{i}", "heavy", counting, long))
                     for i in range(4)]
            readers = [aiter(s) for s in flood]
            heads = [await anext(r) for r in readers]  # every one of them has a slot
            filled = engine.stats().running
            light = await admitter.generate(ask("l", "light", fruit, 4))
            await light.final()
            texts = ["".join(e.text for e in [head, *[e async for e in r]])
                     for head, r in zip(heads, readers, strict=True)]
            return "".join(e.text for e in alone), filled, texts, seen
        finally:
            await admitter.close()

    alone, filled, texts, seen = loop_thread.run(scenario(), timeout=900)
    assert filled == 4
    assert seen.finals()[0] == "l", "the newcomer waited for the flood to end"
    assert seen.first_step("l") - seen.handed_at["l"] <= 2
    assert seen.parks >= 1
    assert texts == [alone] * 4


def test_a_parked_sequence_never_holds_up_a_newcomer(loop_thread: LoopThread) -> None:
    """A second newcomer arrives while the first runs and a flood's sequence is parked:
    it takes a slot at once too (a parked sequence that cannot get one back yet does not
    block those that can): its first token comes in the step after it is handed over or
    the next, and it ends before the flood and the first newcomer."""
    spec = bundled_model()
    engine = LlamaCppEngine(spec.model_id, spec.path,
                            ContextConfig(sequences=4, context_per_sequence=512))
    admitter = Admitter(engine, FairQueue(SchedulingConfig(reserve=2)))

    async def scenario() -> Deliveries:
        await admitter.start()
        try:
            seen = Deliveries(engine)
            counting = await engine.encode_text("1, 2, 3, 4, 5, 6,")
            fruit = await engine.encode_chat([ChatMessage("user", "Name a fruit.")])
            long = FLOOD
            flood = [await admitter.generate(GenerationRequest(
                f"h{i}", counting, GREEDY, long, tenant="heavy")) for i in range(4)]
            heads = [aiter(s) for s in flood]
            for head in heads:
                await anext(head)
            first = await admitter.generate(GenerationRequest(
                "l1", counting, GREEDY, long, tenant="light"))
            await anext(aiter(first))
            # as if the light tenant had been served far more: the parked sequence of the
            # flood now comes first in line for a slot, and cannot take one from light
            admitter.queue.charge("light", input_tokens=10_000)
            second = await admitter.generate(GenerationRequest("l2", fruit, GREEDY, 2,
                                                               tenant="light"))
            await second.final()
            for s in [*flood, first]:
                s.cancel()
            await admitter.idle()
            return seen
        finally:
            await admitter.close()

    seen = loop_thread.run(scenario(), timeout=900)
    assert seen.parks >= 2
    assert seen.finals()[0] == "l2", "the second newcomer waited for a sequence to end"
    assert seen.first_step("l2") - seen.handed_at["l2"] <= 2


def test_stats_never_lose_a_sequence_being_parked_or_resumed(loop_thread: LoopThread) -> None:
    """Newcomers come and go beside a flood, so its sequences are parked and resumed on the
    engine thread, while another thread reads the engine's stats as fast as it can: running
    plus waiting never drops below the flood (before the fix, reads straddling a resume
    counted the sequence in neither; the first version of the newcomer test above read 3
    of 4 and failed on a quiet machine)."""
    spec = bundled_model()
    engine = LlamaCppEngine(spec.model_id, spec.path,
                            ContextConfig(sequences=4, context_per_sequence=512))
    admitter = Admitter(engine)
    least: list[int] = []
    watching = threading.Event()

    def spy() -> None:
        while watching.is_set():
            stats = engine.stats()
            least[0] = min(least[0], stats.running + stats.waiting)
            time.sleep(0)

    async def scenario() -> int:
        await admitter.start()
        try:
            counting = await engine.encode_text("1, 2, 3, 4, 5, 6,")
            fruit = await engine.encode_chat([ChatMessage("user", "Name a fruit.")])
            flood = [await admitter.generate(GenerationRequest(
                f"h{i}", counting, GREEDY, FLOOD, tenant="heavy"))
                for i in range(4)]
            for s in flood:
                await anext(aiter(s))
            least.append(4)
            watching.set()
            reader = threading.Thread(target=spy)
            reader.start()
            for k in range(6):
                await (await admitter.generate(GenerationRequest(
                    f"l{k}", fruit, GREEDY, 3, tenant="light"))).final()
            watching.clear()
            await asyncio.to_thread(reader.join)
            for s in flood:
                s.cancel()
            return engine.batcher.parks
        finally:
            watching.clear()
            await admitter.close()

    parks = loop_thread.run(scenario(), timeout=900)
    assert parks >= 6
    assert least == [4]


def test_batch_sequences_yield_every_step_and_a_slot_to_an_interactive_one(
        loop_thread: LoopThread) -> None:
    """A batch-class flood holds every slot; an interactive request of the same tenant (so
    no share is involved, only the class) takes a slot at once (a batch sequence is
    parked), makes its first token in the step after it is handed over or the next, and
    (with no batch row allowed to ride its steps) decodes alone until it ends, before any
    of the flood; the flood's texts at temperature 0 are still the text each gets alone."""
    spec = bundled_model()
    engine = LlamaCppEngine(spec.model_id, spec.path,
                            ContextConfig(sequences=4, context_per_sequence=512, ride_rows=1))
    admitter = Admitter(engine)

    async def scenario() -> tuple[str, list[str], Deliveries]:
        await admitter.start()
        try:
            counting = await engine.encode_text("1, 2, 3, 4, 5, 6,")
            fruit = await engine.encode_chat([ChatMessage("user", "Name a fruit.")])
            long = FLOOD

            def bulk(name: str) -> GenerationRequest:
                return batch_line(name, counting, long)

            alone = [e async for e in await admitter.generate(bulk("alone"))]
            seen = Deliveries(engine)
            flood = [await admitter.generate(bulk(f"b{i}")) for i in range(4)]
            readers = [aiter(s) for s in flood]
            heads = [await anext(r) for r in readers]  # every one of them has a slot
            asked = await admitter.generate(GenerationRequest("i", fruit, GREEDY, 8,
                                                              tenant="t"))
            await asked.final()
            texts = ["".join(e.text for e in [head, *[e async for e in r]])
                     for head, r in zip(heads, readers, strict=True)]
            return "".join(e.text for e in alone), texts, seen
        finally:
            await admitter.close()

    alone, texts, seen = loop_thread.run(scenario(), timeout=600)
    assert seen.finals()[0] == "i", (
        "an interactive request waited for the batch flood")
    assert seen.first_step("i") - seen.handed_at["i"] <= 2
    assert seen.between("i") == [], "batch sequences decoded beside an interactive one"
    assert seen.sequences["i"].completion_tokens > 1
    assert seen.parks >= 1
    assert texts == [alone] * 4


def test_a_batch_row_rides_interactive_decode_steps_but_never_its_first_token(
        loop_thread: LoopThread) -> None:
    """With `ride_rows=2`, a batch flood gets one row in each step of a lone
    interactive request's decode (capacity a one-row CPU step leaves unused), never in
    the step that makes its first token: that still comes in the step after it is handed
    over or the next, and it still ends before any of the flood. Every text at
    temperature 0 is the text alone (a rider is computed as in any other step)."""
    spec = bundled_model()
    engine = LlamaCppEngine(spec.model_id, spec.path,
                            ContextConfig(sequences=4, context_per_sequence=512, ride_rows=2))
    admitter = Admitter(engine)

    async def scenario() -> tuple[str, str, list[str], str, Deliveries]:
        await admitter.start()
        try:
            counting = await engine.encode_text("1, 2, 3, 4, 5, 6,")
            fruit = await engine.encode_chat([ChatMessage("user", "Name a fruit.")])

            def ask(name: str) -> GenerationRequest:
                return GenerationRequest(name, fruit, GREEDY, 8, tenant="t")

            alone = "".join([e.text async for e in await admitter.generate(
                batch_line("alone", counting, FLOOD))])
            solo = "".join([e.text async for e in await admitter.generate(ask("s"))])
            seen = Deliveries(engine)
            flood = [await admitter.generate(batch_line(f"b{i}", counting, FLOOD))
                     for i in range(4)]
            readers = [aiter(s) for s in flood]
            heads = [await anext(r) for r in readers]  # every one of them has a slot
            asked = await admitter.generate(ask("i"))
            text = "".join([e.text async for e in asked])
            texts = ["".join(e.text for e in [head, *[e async for e in r]])
                     for head, r in zip(heads, readers, strict=True)]
            return alone, solo, texts, text, seen
        finally:
            await admitter.close()

    alone, solo, texts, text, seen = loop_thread.run(scenario(), timeout=600)
    assert seen.finals()[0] == "i", "an interactive request waited for the batch flood"
    assert seen.first_step("i") - seen.handed_at["i"] <= 2
    # one event per step from "i"; between its first and last, at most one rider in each
    # step after the first (that one is its prefill's alone)
    riders, steps = len(seen.between("i")), seen.sequences["i"].completion_tokens
    assert riders > 0, "no batch row rode the interactive decode steps"
    assert riders <= steps - 1, "more than one batch row per step"
    assert text == solo
    assert texts == [alone] * 4


def test_a_slot_stays_free_for_an_interactive_newcomer_beside_a_batch(
        loop_thread: LoopThread) -> None:
    """Where the engine holds more sequences than a step decodes, a batch flood handed
    more lines than slots leaves one slot free: an interactive newcomer takes it without
    parking anyone, and since the batch's lines (each in a cache scope of its own) never
    took it, it still holds the prompt of the interactive request before, so the
    newcomer's prefix is cached. (On the engine itself: the admission layer in front
    would hand it fewer lines.)"""
    spec = bundled_model()
    engine = LlamaCppEngine(spec.model_id, spec.path,
                            ContextConfig(sequences=4, context_per_sequence=512,
                                          step_sequences=2))

    async def scenario() -> tuple[int, TokenEvent, Deliveries]:
        await engine.start()
        try:
            counting = await engine.encode_text("1, 2, 3, 4, 5, 6,")
            fruit = await engine.encode_chat([ChatMessage("user", "Name a fruit.")])
            await (await engine.generate(GenerationRequest("warm", fruit, GREEDY, 2,
                                                           tenant="t"))).final()
            seen = Deliveries(engine)
            flood = [await engine.generate(batch_line(f"b{i}", counting, FLOOD, scoped=True))
                     for i in range(5)]
            for s in flood[:3]:
                await anext(aiter(s))  # three have a slot and are decoding
            placed = engine.stats().running
            final = await (await engine.generate(GenerationRequest(
                "i", fruit, GREEDY, 4, tenant="t"))).final()
            for s in flood:
                s.cancel()
            return placed, final, seen
        finally:
            await engine.close()

    placed, final, seen = loop_thread.run(scenario(), timeout=600)
    assert placed == 3, "the batch took every slot"
    assert seen.parks == 0, "the newcomer parked a batch sequence"
    assert final.usage is not None and final.usage.cached_tokens > 0
    assert seen.finals()[0] == "i"


def test_a_batch_sequence_in_its_prompt_lends_its_slot_and_keeps_what_it_computed(
        loop_thread: LoopThread) -> None:
    """Batch sequences whose prompts take a few steps to prefill (each in its own cache
    scope, so none reuses another's) hold every slot; an interactive request still takes
    one at once (a sequence still in its prompt goes back to the line, keeping what it
    computed as a cached prefix of its slot) and ends first. The batch texts are still the
    text alone, and none reports its own computed prefix as cached."""
    spec = bundled_model()
    engine = LlamaCppEngine(spec.model_id, spec.path,
                            ContextConfig(sequences=4, context_per_sequence=1024))
    admitter = Admitter(engine)

    async def scenario() -> tuple[str, list[TokenEvent], list[str], Deliveries]:
        await admitter.start()
        try:
            numbers = await engine.encode_text(", ".join(str(i) for i in range(1, 80)))
            assert 2 * len(numbers) > engine.config.batch_tokens  # more than a step for all
            fruit = await engine.encode_chat([ChatMessage("user", "Name a fruit.")])

            def bulk(name: str) -> GenerationRequest:
                return batch_line(name, numbers, 12, scoped=True)

            alone = [e async for e in await admitter.generate(bulk("alone"))]
            seen = Deliveries(engine)
            flood = [await admitter.generate(bulk(f"b{i}")) for i in range(4)]
            # polled: the engine thread places them, with no event to wait on
            while engine.stats().running < 4:  # noqa: ASYNC110
                await asyncio.sleep(0.001)
            asked = await admitter.generate(GenerationRequest("i", fruit, GREEDY, 4,
                                                              tenant="t"))
            await asked.final()
            events = [[e async for e in s] for s in flood]
            texts = ["".join(e.text for e in evs) for evs in events]
            return "".join(e.text for e in alone), [evs[-1] for evs in events], texts, seen
        finally:
            await admitter.close()

    alone, finals, texts, seen = loop_thread.run(scenario(), timeout=900)
    assert seen.finals()[0] == "i", "an interactive request waited for batch prompts"
    assert seen.parks >= 1
    assert texts == [alone] * 4
    assert all(f.usage is not None and f.usage.cached_tokens == 0 for f in finals)


def test_an_interactive_request_stops_the_batch_step_in_flight(
        loop_thread: LoopThread, capfd: pytest.CaptureFixture[str]) -> None:
    """Batch sequences with long prompts (each in its own cache scope) hold every slot; an
    interactive request is handed over while a decode of their prompt chunks runs (from
    inside that decode's call, so the timing is fixed). The decode is stopped and the step
    cut short: the interactive request's first token comes before any batch sequence's
    (without preemption the step in flight ends a batch prompt, whose first token comes
    first). The stopped rows are computed again later: every batch text is still its text
    alone, and nothing is counted twice (no prompt token reported as cached). llama.cpp's
    warning for each stopped row stays out of stderr."""
    spec = bundled_model()
    engine = LlamaCppEngine(spec.model_id, spec.path,
                            ContextConfig(sequences=4, context_per_sequence=1024))
    admitter = Admitter(engine)

    async def scenario() -> tuple[list[TokenEvent], list[TokenEvent], list[str], Deliveries]:
        await admitter.start()
        try:
            loop = asyncio.get_running_loop()
            numbers = await engine.encode_text(", ".join(str(i) for i in range(1, 80)))
            fruit = await engine.encode_chat([ChatMessage("user", "Name a fruit.")])

            def bulk(name: str) -> GenerationRequest:
                return batch_line(name, numbers, 6, scoped=True)

            alone = [e async for e in await admitter.generate(bulk("alone"))]
            seen = Deliveries(engine)
            batcher = engine.batcher
            decode = batcher._llama_decode
            asked: list[AdmittedStream] = []

            def hand_over_during_the_decode(measured: bool, rows: int = 1) -> int:
                if not asked:  # the first decode of the flood: its prompt chunks
                    asked.append(asyncio.run_coroutine_threadsafe(admitter.generate(
                        GenerationRequest("i", fruit, GREEDY, 4, tenant="t")), loop).result())
                return decode(measured, rows)

            batcher._llama_decode = hand_over_during_the_decode  # type: ignore[method-assign]
            flood = [await admitter.generate(bulk(f"b{i}")) for i in range(4)]
            events = [[e async for e in s] for s in flood]
            await asked[0].final()
            texts = ["".join(e.text for e in evs) for evs in events]
            return alone, [evs[-1] for evs in events], texts, seen
        finally:
            await admitter.close()

    alone, finals, texts, seen = loop_thread.run(scenario(), timeout=900)
    assert seen.log[0][0] == "i", "the batch step in flight ran to its end first"
    assert seen.finals()[0] == "i"
    assert seen.preempted >= 1
    assert texts == ["".join(e.text for e in alone)] * 4
    assert all(f.usage == alone[-1].usage for f in finals)
    assert "removing memory module entries" not in capfd.readouterr().err
