"""Token buckets that refill continuously: a limit of N per minute holds at most N and
regains N/60 each second. Several buckets are taken together or not at all, so a refused
request costs nothing."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(slots=True, frozen=True)
class Take:
    """`cost` units from the bucket `key`, which holds `limit` per minute."""

    key: str
    limit: int
    cost: int

    @property
    def per_second(self) -> float:
        return self.limit / 60.0


@dataclass(slots=True, frozen=True)
class Outcome:
    allowed: bool
    retry_after: float  # seconds until every bucket could pay; 0 when allowed
    levels: tuple[float, ...]  # what each bucket holds afterwards, in the order asked


class Limiter(Protocol):
    async def take(self, takes: list[Take]) -> Outcome: ...

    async def give_back(self, takes: list[Take]) -> None:
        """Return units taken earlier (a request used fewer tokens than it reserved)."""

    async def close(self) -> None: ...


class MemoryLimiter:
    """One process: no awaits inside, so the event loop makes each call atomic."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._levels: dict[str, tuple[float, float]] = {}
        self._clock = clock

    def _level(self, take: Take, now: float) -> float:
        level, at = self._levels.get(take.key, (float(take.limit), now))
        return min(float(take.limit), level + (now - at) * take.per_second)

    async def take(self, takes: list[Take]) -> Outcome:
        now = self._clock()
        levels = [self._level(t, now) for t in takes]
        wait = max((max(t.cost - lv, 0.0) / t.per_second for t, lv in zip(takes, levels,
                                                                          strict=True)),
                   default=0.0)
        allowed = wait == 0.0
        after = [lv - t.cost if allowed else lv for t, lv in zip(takes, levels, strict=True)]
        for t, lv in zip(takes, after, strict=True):
            self._levels[t.key] = (lv, now)
        return Outcome(allowed, wait, tuple(after))

    async def give_back(self, takes: list[Take]) -> None:
        now = self._clock()
        for t in takes:
            self._levels[t.key] = (min(float(t.limit), self._level(t, now) + t.cost), now)

    async def close(self) -> None:
        self._levels.clear()
