"""Prompt-prefix reuse stays inside a cache scope: no reported hit, no faster first token."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator

import pytest

from aicloud.engines.base import ChatMessage, GenerationRequest, SamplingParams, TokenEvent
from aicloud.engines.llamacpp.engine import LlamaCppEngine
from aicloud.engines.llamacpp.model import ContextConfig
from tests.conftest import LoopThread
from tests.engines.checks import running_engine

GREEDY = SamplingParams(temperature=0.0)
SECRET = ("You are the internal assistant of Northwind Traders. Confidential: the merger "
          "with Contoso closes on March 3rd; the codename is BLUE HERON. ") * 3
ROUNDS = 3  # with a slot for each request (8), no prompt is evicted by another


@pytest.fixture(scope="module")
def engine(loop_thread: LoopThread) -> Iterator[LlamaCppEngine]:
    # one thread: a busy machine slows it less (docs/benchmarks.md)
    yield from running_engine(loop_thread,
                              ContextConfig(sequences=8, context_per_sequence=512, threads=1))


def first_token(engine: LlamaCppEngine, loop_thread: LoopThread, system: str,
                scope: str) -> tuple[float, TokenEvent]:
    """Seconds from submission to the first token, and the final event."""
    async def go() -> tuple[float, TokenEvent]:
        tokens = await engine.encode_chat([ChatMessage("system", system),
                                           ChatMessage("user", "What is the codename?")])
        started = time.perf_counter()
        stream = await engine.generate(GenerationRequest("s", tokens, GREEDY, 1,
                                                         cache_scope=scope))
        events = [e async for e in stream]
        return time.perf_counter() - started, events[-1]

    return loop_thread.run(go())


def test_another_scope_gets_no_hit_and_no_speedup(engine: LlamaCppEngine,
                                                  loop_thread: LoopThread) -> None:
    first_token(engine, loop_thread, SECRET, "project-a")
    own, other, fresh = [], [], []
    for i in range(ROUNDS):
        seconds, final = first_token(engine, loop_thread, SECRET, "project-a")
        assert final.usage is not None and final.usage.cached_tokens > 100  # A's own hit
        own.append(seconds)
        # a new tenant every round, so B never hits what B itself sent before
        seconds, final = first_token(engine, loop_thread, SECRET, f"project-b{i}")
        assert final.usage is not None and final.usage.cached_tokens == 0
        other.append(seconds)
        different = SECRET.replace("Northwind", f"Fabrikam{i}").replace("BLUE", "RED")
        seconds, final = first_token(engine, loop_thread, different, f"project-c{i}")
        assert final.usage is not None and final.usage.cached_tokens == 0
        fresh.append(seconds)
    own_s, other_s, fresh_s = map(statistics.median, (own, other, fresh))
    # the measurement can see a hit (A's own is several times faster) ...
    assert own_s < 0.5 * fresh_s, (own_s, fresh_s)
    # ... and sees none for B: B's first token takes what a never-seen prompt takes
    assert other_s > 0.7 * fresh_s, (other_s, fresh_s)


def test_same_scope_still_shares_a_prefix_held_by_a_busy_slot(
        engine: LlamaCppEngine, loop_thread: LoopThread) -> None:
    """Within one scope nothing changed: a second request reuses the first one's prefix."""
    system = "You answer questions about the tides of the North Sea. " * 10
    first_token(engine, loop_thread, system, "project-d")
    _, final = first_token(engine, loop_thread, system, "project-d")
    assert final.usage is not None and final.usage.cached_tokens > 100
    _, final = first_token(engine, loop_thread, system, "")
    assert final.usage is not None and final.usage.cached_tokens == 0
