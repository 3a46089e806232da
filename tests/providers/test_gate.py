"""A provider's places go out in tenant-fair order (the FairQueue of the local engines)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from aicloud.engines.base import EngineOverloaded, EngineUnavailable
from aicloud.providers.gate import FairGate
from aicloud.scheduling.fair_queue import SchedulingConfig


def test_a_newcomer_goes_before_a_floods_backlog() -> None:
    async def scenario() -> list[str]:
        gate = FairGate(1)
        order: list[str] = []

        async def request(name: str, tenant: str) -> None:
            await gate.enter(tenant, 0, 1.0, 10)
            order.append(name)
            await asyncio.sleep(0.01)
            gate.leave(tenant, 10, 10)

        first = asyncio.ensure_future(request("a1", "a"))
        await asyncio.sleep(0)
        flood = [asyncio.ensure_future(request(f"a{i}", "a")) for i in (2, 3, 4)]
        await asyncio.sleep(0)
        late = asyncio.ensure_future(request("b1", "b"))
        await asyncio.gather(first, *flood, late)
        return order

    order = asyncio.run(scenario())
    assert order[0] == "a1" and order[1] == "b1"  # not after a2, a3, a4 (FIFO would)
    assert sorted(order) == ["a1", "a2", "a3", "a4", "b1"]


def test_waiting_past_patience_is_unavailable_and_frees_nothing() -> None:
    async def scenario() -> None:
        gate = FairGate(1)
        await gate.enter("a", 0, 1.0, 1)
        with pytest.raises(EngineUnavailable):
            await gate.enter("b", 0, 1.0, 0.05)
        assert gate.waiting == 0 and gate.busy == 1
        gate.leave("a")
        await gate.enter("b", 0, 1.0, 1)
        assert gate.busy == 1

    asyncio.run(scenario())


def test_a_full_line_refuses_and_a_cancelled_waiter_gives_its_place_back() -> None:
    async def scenario() -> None:
        gate = FairGate(1, SchedulingConfig(max_waiting=1))
        await gate.enter("a", 0, 1.0, 1)
        waiter = asyncio.ensure_future(gate.enter("a", 0, 1.0, 5))
        await asyncio.sleep(0)
        with pytest.raises(EngineOverloaded):
            await gate.enter("a", 0, 1.0, 5)
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
        assert gate.waiting == 0
        gate.leave("a")
        assert gate.busy == 0

    asyncio.run(scenario())


def test_a_free_place_is_taken_without_a_trip_through_the_loop() -> None:
    """The common case costs no timer and no suspension (the relay's hot path)."""
    async def scenario() -> None:
        gate = FairGate(1)
        entering = gate.enter("t", 0, 1.0, 5.0)
        with pytest.raises(StopIteration):
            entering.send(None)  # finished at once: it never waited on anything
        assert gate.busy == 1
        waiting = asyncio.ensure_future(gate.enter("u", 0, 1.0, 5.0))
        await asyncio.sleep(0)
        assert not waiting.done()  # the one place is taken: this one waits
        gate.leave("t")
        await asyncio.wait_for(waiting, 1)

    asyncio.run(scenario())
