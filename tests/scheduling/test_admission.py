"""The admission layer in front of an engine, deterministically: a stand-in engine whose
sequences end when the test says so (the real engines behind it are tested in
tests/engines and end to end in tests/e2e/test_scheduling.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from aicloud.engines.base import (
    ChatMessage,
    EmbeddingRequest,
    Embeddings,
    EngineError,
    EngineInfo,
    EngineOverloaded,
    EngineStats,
    FinishReason,
    GenerationRequest,
    Priority,
    TokenEvent,
    Usage,
)
from aicloud.engines.events import EventQueue
from aicloud.scheduling.admission import Admitter
from aicloud.scheduling.fair_queue import FairQueue, Mode, SchedulingConfig


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Run(EventQueue):
    """One sequence in the stand-in engine."""

    def __init__(self, request: GenerationRequest) -> None:
        super().__init__()
        self.request = request
        self.made = 0

    def token(self, n: int = 1) -> None:
        self.made += n
        self.put(TokenEvent("x" * n, self.made))

    def finish(self, cached: int = 0) -> None:
        usage = Usage(len(self.request.prompt_tokens), self.made, cached)
        self.put(TokenEvent("", self.made, FinishReason.STOP, usage))

    def cancel(self) -> None:
        self.put(TokenEvent("", self.made, FinishReason.CANCELLED,
                            Usage(len(self.request.prompt_tokens), self.made)))


class Engine:
    """Runs whatever it is handed, each until the test finishes it."""

    def __init__(self, slots: int, preempts: bool = False) -> None:
        self.slots, self.preempts = slots, preempts
        self.runs: list[Run] = []
        self.refuse: str | None = None  # a request id whose start fails

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def encode_chat(self, messages: list[ChatMessage],
                          tools: list[dict[str, Any]] | None = None) -> list[int]:
        return [1, 2, 3]

    async def encode_text(self, text: str) -> list[int]:
        return [1, 2]

    async def generate(self, request: GenerationRequest) -> Run:
        await asyncio.sleep(0)
        if request.request_id == self.refuse:
            raise EngineError("token ids outside the vocabulary", param="prompt")
        self.runs.append(Run(request))
        return self.runs[-1]

    async def embed(self, request: EmbeddingRequest) -> Embeddings:
        await asyncio.sleep(0.01)
        return Embeddings([[1.0]], Usage(1, 0))

    def info(self) -> EngineInfo:
        return EngineInfo("m", 100, self.slots, "stand-in", preempts=self.preempts)

    def stats(self) -> EngineStats:
        running = sum(not r.done for r in self.runs)
        return EngineStats(running, 0, 0.0, 0, 0)

    def running(self) -> list[str]:
        return [r.request.request_id for r in self.runs if not r.done]


def request(name: str, prompt: int = 10, **kwargs: Any) -> GenerationRequest:
    return GenerationRequest(name, [1] * prompt, tenant=name.split("-")[0], **kwargs)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 10))


def counters(admitter: Admitter) -> dict[str, tuple[int, int, float, int]]:
    return {t.tenant: (t.served_input_tokens, t.served_output_tokens, t.counter, t.running)
            for t in admitter.tenants()}


def test_a_tenant_alone_fills_every_slot_then_waits() -> None:
    async def scenario() -> None:
        engine = Engine(slots=4, preempts=True)
        admitter = Admitter(engine)
        for i in range(6):
            await admitter.generate(request(f"solo-{i}"))
        await settle()
        assert engine.running() == [f"solo-{i}" for i in range(4)]
        assert admitter.in_flight == 4 and admitter.stats().waiting == 2
        engine.runs[0].finish()
        await settle()
        assert engine.running() == ["solo-1", "solo-2", "solo-3", "solo-4"]

    run(scenario)


def test_a_newcomer_starts_at_once_beyond_the_slots_or_in_the_kept_ones() -> None:
    """Where the engine can pause a sequence, a flood fills every slot and a newcomer goes
    beyond them; elsewhere the last quarter of the slots is kept for it."""
    async def scenario() -> None:
        for preempts, flood in ((True, 4), (False, 3)):
            engine = Engine(slots=4, preempts=preempts)
            admitter = Admitter(engine)
            for i in range(6):
                await admitter.generate(request(f"heavy-{i}"))
            await settle()
            assert len(engine.running()) == flood, preempts
            await admitter.generate(request("light-0"))
            await settle()
            assert "light-0" in engine.running()
            assert admitter.in_flight == flood + 1

    run(scenario)


def test_batch_work_takes_no_room_from_interactive_work_where_the_engine_preempts() -> None:
    """Batch generations fill every slot; an interactive request of the same tenant is
    still handed over at once where the engine lends it a batch sequence's slot, and waits
    for one to end elsewhere. More batch work still waits for a free slot."""
    async def scenario() -> None:
        for preempts in (True, False):
            engine = Engine(slots=4, preempts=preempts)
            admitter = Admitter(engine)
            for i in range(5):
                await admitter.generate(request(f"bulk-{i}", priority=Priority.BATCH))
            await settle()
            assert len(engine.running()) == 4 - (not preempts)  # the kept slot
            for i in range(2):
                await admitter.generate(request(f"bulk-i{i}"))
            await settle()
            interactive = {"bulk-i0", "bulk-i1"}
            if preempts:
                assert interactive <= set(engine.running())
            else:
                assert not interactive & set(engine.running())
                engine.runs[0].finish()
                await settle()
                assert "bulk-i0" in engine.running()  # before the batch ones waiting
            assert "bulk-4" not in engine.running()

    run(scenario)


def test_the_least_served_tenant_is_admitted_first() -> None:
    async def scenario() -> None:
        engine = Engine(slots=2)
        admitter = Admitter(engine)
        streams = [await admitter.generate(request(f"heavy-{i}")) for i in range(5)]
        light = await admitter.generate(request("light-0"))  # level with heavy: lifted
        for r in engine.runs:
            r.token(20)  # meanwhile the running two make 40 tokens, charged as they pass
        for stream in streams[:2]:
            await anext(aiter(stream))
        engine.runs[0].finish()
        await settle()
        assert engine.running() == ["heavy-1", "light-0"]
        engine.runs[-1].token()
        assert (await anext(aiter(light))).completion_tokens == 1

    run(scenario)


def test_counters_charge_what_the_engine_computed_and_made() -> None:
    """The prompt is charged at admission, corrected to what was not cached when the
    sequence ends; output as it streams, and at the end whatever was not read."""
    async def scenario() -> None:
        engine = Engine(slots=2)
        admitter = Admitter(engine, FairQueue(SchedulingConfig(input_weight=1.0,
                                                               output_weight=2.0)))
        stream = await admitter.generate(request("a-0", prompt=30, weight=2.0))
        await settle()
        assert counters(admitter)["a"] == (30, 0, 15.0, 1)
        engine.runs[0].token(4)
        await anext(aiter(stream))
        assert counters(admitter)["a"] == (30, 4, 19.0, 1)
        engine.runs[0].token(3)  # nobody reads these: the final event still charges them
        engine.runs[0].finish(cached=12)
        assert (await stream.final()).usage == Usage(30, 7, 12)
        await settle()
        assert counters(admitter)["a"] == (18, 7, 16.0, 0)
        assert admitter.in_flight == 0

    run(scenario)


def test_the_engine_gets_the_counters_with_each_request() -> None:
    async def scenario() -> None:
        for mode, shared in ((Mode.VTC, True), (Mode.FCFS, False)):
            engine = Engine(slots=2)
            queue: FairQueue[Any] = FairQueue(SchedulingConfig(mode=mode))
            await Admitter(engine, queue).generate(request("a-0"))
            await settle()
            assert (engine.runs[0].request.shares is queue) is shared

    run(scenario)


def test_cancelled_while_waiting_never_reaches_the_engine() -> None:
    async def scenario() -> None:
        engine = Engine(slots=1)
        admitter = Admitter(engine)
        await admitter.generate(request("a-0"))
        waiting = await admitter.generate(request("a-1"))
        waiting.cancel()
        final = await waiting.final()
        assert final.finish_reason is FinishReason.CANCELLED and final.usage == Usage(0, 0)
        engine.runs[0].finish()
        await settle()
        assert [r.request.request_id for r in engine.runs] == ["a-0"]
        assert admitter.in_flight == 0 and len(admitter.queue) == 0

    run(scenario)


def test_back_pressure_refuses_and_sheds_with_blame() -> None:
    async def scenario() -> None:
        clock = Clock()
        engine = Engine(slots=1)
        admitter = Admitter(engine, FairQueue(SchedulingConfig(max_waiting=2, max_wait=10),
                                              clock))
        await admitter.generate(request("hog-0"))
        hogs = [await admitter.generate(request(f"hog-{i}")) for i in (1, 2)]
        with pytest.raises(EngineOverloaded) as full:
            await admitter.generate(request("hog-3"))
        assert not full.value.everyone
        other = await admitter.generate(request("other-0"))  # evicts the hog's newest
        assert (await hogs[1].final()).finish_reason is FinishReason.THROTTLED
        clock.now = 11.0  # both waited too long: refused within a second, the hog's with a
        # 429 (it holds more than an even share of the load), the other's with a 503
        assert (await hogs[0].final()).finish_reason is FinishReason.THROTTLED
        assert (await other.final()).finish_reason is FinishReason.OVERLOADED
        assert engine.running() == ["hog-0"] and len(admitter.queue) == 0

    run(scenario)


def test_an_engine_error_at_the_door_is_raised_later_it_ends_the_stream() -> None:
    async def scenario() -> None:
        engine = Engine(slots=1)
        admitter = Admitter(engine)
        engine.refuse = "a-0"
        with pytest.raises(EngineError):
            await admitter.generate(request("a-0"))
        assert admitter.in_flight == 0
        await admitter.generate(request("a-1"))
        engine.refuse = "a-2"
        late = await admitter.generate(request("a-2"))
        engine.runs[0].finish()
        assert (await late.final()).finish_reason is FinishReason.ERROR
        await settle()
        assert admitter.in_flight == 0 and counters(admitter)["a"][3] == 0

    run(scenario)


def test_a_prompt_beyond_the_context_is_refused_before_queueing() -> None:
    async def scenario() -> None:
        admitter = Admitter(Engine(slots=1))
        with pytest.raises(EngineError):
            await admitter.generate(request("a-0", prompt=100))
        assert len(admitter.queue) == 0

    run(scenario)


def test_idle_waits_for_everything_in_flight() -> None:
    async def scenario() -> None:
        engine = Engine(slots=1)
        admitter = Admitter(engine)
        await asyncio.wait_for(admitter.idle(), 1)  # nothing yet: at once
        await admitter.generate(request("a-0"))
        await admitter.generate(request("b-0"))
        embedding = asyncio.ensure_future(admitter.embed(EmbeddingRequest("e", [[1]])))
        idle = asyncio.ensure_future(admitter.idle())
        await settle()
        assert admitter.in_flight == 2 and not idle.done()
        engine.runs[0].finish()
        await embedding
        await settle()
        assert admitter.in_flight == 1 and not idle.done()  # b-0 runs now
        engine.runs[1].finish()
        await asyncio.wait_for(idle, 1)
        assert admitter.in_flight == 0

    run(scenario)


def test_a_request_that_can_no_longer_meet_its_deadline_is_refused_not_started() -> None:
    """Under overload a line served in order makes every request late: one whose deadline
    is lost by its turn gets a 503 and leaves its slot to one that can still be on time,
    judged by the model's recent service time."""
    async def scenario() -> None:
        clock = Clock()
        engine = Engine(slots=1)
        admitter = Admitter(engine, FairQueue(clock=clock))
        await admitter.generate(request("a-0"))
        clock.now = 2.0
        engine.runs[0].finish()  # its service took 2 s: the estimate now
        await settle()
        await admitter.generate(request("a-1"))
        hopeless = await admitter.generate(request("b-0", deadline=3.5))  # 2 + 2 > 3.5
        hopeful = await admitter.generate(request("c-0", deadline=10.0))
        no_deadline = await admitter.generate(request("d-0"))
        clock.now = 2.5
        engine.runs[1].finish()
        assert (await hopeless.final()).finish_reason is FinishReason.OVERLOADED
        await settle()
        assert engine.running() == ["c-0"] and admitter.shed == 1
        clock.now = 20.0  # past c's deadline, but it runs: only starting is refused
        engine.runs[2].finish()
        assert (await hopeful.final()).finish_reason is FinishReason.STOP
        await settle()
        assert engine.running() == ["d-0"]  # without a deadline it waits as long as it must
        engine.runs[3].finish()
        assert (await no_deadline.final()).finish_reason is FinishReason.STOP
        await settle()
        assert admitter.in_flight == 0 and len(admitter.queue) == 0

    run(scenario)
