"""A provider's places in flight (`max_concurrency`), given out in tenant-fair order: the
same FairQueue the local engines admit from (VTC counters, priority classes, a bounded
line), so a tenant flooding a partner model cannot starve the others waiting for it.
Everything runs on the event loop; no lock."""

from __future__ import annotations

import asyncio

from aicloud.engines.base import EngineOverloaded, EngineUnavailable
from aicloud.scheduling.fair_queue import FairQueue, SchedulingConfig


class FairGate:
    def __init__(self, slots: int, config: SchedulingConfig | None = None) -> None:
        self.slots = slots
        self.busy = 0
        self.line: FairQueue[asyncio.Future[None]] = FairQueue(config)
        self._tenants: dict[asyncio.Future[None], str] = {}

    @property
    def waiting(self) -> int:
        return len(self.line)

    async def enter(self, tenant: str, priority: int, weight: float, patience: float) -> None:
        """Wait for a place, at most `patience` seconds (then EngineUnavailable); a full
        line raises EngineOverloaded, as the local engines' does."""
        place: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        evicted = self.line.push(place, tenant, priority, weight)
        self._tenants[place] = tenant
        for other in evicted:
            self._tenants.pop(other, None)
            other.set_exception(EngineOverloaded("too many of your requests wait for this "
                                                 "provider", retry_after=1, everyone=False))
        self._dispatch()
        if place.done():  # a free place, or refused: no timer, no trip through the loop
            place.result()
            return
        try:
            await asyncio.wait_for(asyncio.shield(place), patience)
        except TimeoutError:
            if not place.done():
                self._forget(place)
                raise EngineUnavailable("the provider is at its concurrency limit",
                                        retry_after=1) from None
        except asyncio.CancelledError:
            if place.done() and not place.cancelled() and place.exception() is None:
                self.leave(tenant)
            else:
                self._forget(place)
            raise

    def leave(self, tenant: str, input_tokens: int = 0, output_tokens: int = 0) -> None:
        """A request is done with its place; its tokens count against its tenant's share."""
        self.busy -= 1
        self.line.finished(tenant)
        self.line.charge(tenant, input_tokens, output_tokens)
        self._dispatch()

    def _forget(self, place: asyncio.Future[None]) -> None:
        self.line.remove(place)
        self._tenants.pop(place, None)
        place.cancel()

    def _dispatch(self) -> None:
        while self.busy < self.slots:
            place = self.line.pop(lambda t, _: self.line.can_start(t, self.busy, self.slots))
            if place is None:
                return
            tenant = self._tenants.pop(place)
            if place.done():  # its waiter left
                continue
            self.busy += 1
            self.line.started(tenant)
            place.set_result(None)
