"""A circuit breaker per provider: after `threshold` failures in a row it opens and no
request is sent for `cooldown` seconds (or as long as a 429's Retry-After asked); then one
probe goes through (half-open) and its outcome closes or re-opens it. Plain Python with an
injectable clock, as scheduling/fair_queue.py, so its tests are deterministic."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field


class BreakerState(enum.IntEnum):
    """The value is what /metrics shows: 0 closed, 1 half-open, 2 open."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@dataclass(slots=True)
class Breaker:
    threshold: int = 5
    cooldown: float = 10.0
    clock: Callable[[], float] = time.monotonic
    failures: int = 0
    _reopen_at: float | None = None  # while open: when a probe may go
    _probing: bool = False
    _probe_started: float = field(default=0.0)

    @property
    def state(self) -> BreakerState:
        if self._reopen_at is None:
            return BreakerState.CLOSED
        if self.clock() < self._reopen_at:
            return BreakerState.OPEN
        return BreakerState.HALF_OPEN

    def retry_after(self) -> float:
        """Seconds until a request may go (0 when one may go now)."""
        if self._reopen_at is None:
            return 0.0
        return max(0.0, self._reopen_at - self.clock())

    def can_send(self) -> bool:
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        # half-open: one probe at a time; a probe that never reported frees the slot
        return state is BreakerState.HALF_OPEN and (
            not self._probing or self.clock() - self._probe_started > self.cooldown)

    def send(self) -> None:
        """Called when a request goes (after `can_send`); in half-open it is the probe."""
        if self.state is BreakerState.HALF_OPEN:
            self._probing, self._probe_started = True, self.clock()

    def succeeded(self) -> None:
        self.failures, self._reopen_at, self._probing = 0, None, False

    def failed(self, pause: float | None = None) -> None:
        """A failure; `pause` (a Retry-After) opens the breaker at once for that long."""
        self.failures += 1
        self._probing = False
        if pause is not None or self.failures >= self.threshold or self._reopen_at is not None:
            self._reopen_at = self.clock() + max(pause or 0.0, self.cooldown
                                                 if pause is None else 0.0)
