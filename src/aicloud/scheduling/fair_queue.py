"""The Virtual Token Counter queue of "Fairness in Serving Large Language Models" (OSDI '24).

Each tenant has a counter that grows by the weighted tokens it is served (input and output
weighted separately, divided by the tenant's weight). The next admission goes to the
waiting tenant with the smallest counter; a tenant that comes back from idle is lifted to
the smallest counter among waiting tenants, so time away cannot be banked as credit.
Priority classes apply first: any waiting `interactive` request runs before any `batch` one.
A tenant idle for `forget_after` seconds is forgotten once forgetting cannot change where
it would stand on return, so the state (and the metric label sets) stay bounded by the
tenants recently seen.

Pure Python with an injectable clock: the admission layer (`scheduling.admission`) drives
it on the event loop, an engine reads the counters (`standing`) to order each step's
tokens, and tests drive it deterministically.
"""

from __future__ import annotations

import enum
import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from aicloud.engines.base import EngineError, EngineOverloaded, Priority, TenantLoad

# what waits in the line: the engine's own handle for a request (a sequence, a stream)
Item = TypeVar("Item", bound=Hashable)


class Mode(enum.StrEnum):
    """`fcfs` keeps the same interface in arrival order, for comparison and for a replica
    that only runs what a fair line elsewhere already picked."""

    VTC = "vtc"
    FCFS = "fcfs"


@dataclass(slots=True)
class SchedulingConfig:
    """Admission is work-conserving: any tenant may fill every free slot, so a tenant alone
    gets the whole engine. The shares are kept token by token instead (an engine that
    decodes fewer sequences per step than it holds picks them by these counters), and on
    an engine that can pause a sequence, up to `reserve` more requests than it has slots
    (None: a quarter of them) are admitted for tenants a whole slot below their weighted
    share of the slots: the engine parks a flood's sequence to give a newcomer a slot at
    once."""

    mode: Mode = Mode.VTC
    input_weight: float = 1.0
    output_weight: float = 2.0
    max_waiting: int = 1024
    max_wait: float = 60.0
    reserve: int | None = None
    forget_after: float = 600.0

    def __post_init__(self) -> None:
        self.mode = Mode(self.mode)
        if self.max_waiting < 1 or self.max_wait <= 0 or self.forget_after <= 0:
            raise ValueError("max_waiting, max_wait and forget_after must be positive")
        if min(self.input_weight, self.output_weight) < 0:
            raise ValueError("token weights cannot be negative")

    def kept(self, slots: int) -> int:
        """On an engine that cannot pause a sequence: how many of the last free slots go
        only to tenants below their share (FCFS: none), as a newcomer could not otherwise
        start before a flood's sequence ends; a tenant alone fills the rest."""
        if self.mode is Mode.FCFS:
            return 0
        return min(self.reserve if self.reserve is not None else slots // 4, slots - 1)

    def reserved(self, slots: int) -> int:
        """How many requests beyond `slots` may be admitted for tenants below their share
        (FCFS: none)."""
        if self.mode is Mode.FCFS:
            return 0
        return self.reserve if self.reserve is not None else max(slots // 4, 1)


@dataclass(slots=True)
class TenantState(Generic[Item]):
    """One tenant's share: its counter is weighted service divided by its weight."""

    counter: float = 0.0
    weight: float = 1.0
    running: int = 0
    served_input: int = 0
    served_output: int = 0
    seen: float = 0.0  # when it last queued, started, was served or finished
    waiting: dict[Priority, deque[Entry[Item]]] = field(
        default_factory=lambda: {p: deque() for p in Priority})

    @property
    def n_waiting(self) -> int:
        return sum(len(q) for q in self.waiting.values())

    @property
    def busy(self) -> bool:
        return bool(self.running or self.n_waiting)


@dataclass(slots=True, eq=False)
class Entry(Generic[Item]):
    """A waiting item; `order` breaks ties between equal counters by arrival."""

    item: Item
    tenant: str
    priority: Priority
    arrived: float
    order: int


class FairQueue(Generic[Item]):
    """One model's waiting line and its tenants' counters. Changed only on the event loop;
    `standing` and `token_cost` may be read from an engine's thread."""

    def __init__(self, config: SchedulingConfig | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config or SchedulingConfig()
        self._clock = clock
        self._tenants: dict[str, TenantState[Item]] = {}
        self._entries: dict[Item, Entry[Item]] = {}
        self._arrivals = 0
        self._last_left: str | None = None  # whose request left the line last
        self._left_counter = 0.0  # its counter, once it is forgotten
        self._next_sweep = clock() + self.config.forget_after

    def __len__(self) -> int:
        return len(self._entries)

    def now(self) -> float:
        """The line's clock (time.monotonic unless a test injects one)."""
        return self._clock()

    # -- joining and leaving the line ---------------------------------------------------------

    def push(self, item: Item, tenant: str, priority: int = Priority.INTERACTIVE,
             weight: float = 1.0) -> list[Item]:
        """Queue `item`; returns items evicted to make room (the caller refuses them with
        a 429), or raises EngineOverloaded. Called when a request arrives."""
        priority = _valid(priority, weight)
        self._sweep()
        evicted = self._make_room(tenant) if len(self) >= self.config.max_waiting else []
        state = self._state(tenant)
        state.weight = weight
        if state.n_waiting == 0:
            self._lift(tenant, state)
        self._arrivals += 1
        entry = Entry(item, tenant, priority, self._clock(), self._arrivals)
        state.waiting[entry.priority].append(entry)
        self._entries[item] = entry
        return evicted

    def _lift(self, tenant: str, state: TenantState[Item]) -> None:
        """No banking: a returning tenant starts level with the least-served waiting one
        (or with whoever left the line last, when nobody waits)."""
        state.counter = max(state.counter, self._level(tenant))

    def _level(self, tenant: str | None = None) -> float:
        """Where a tenant (other than `tenant`) coming back from idle starts: the smallest
        counter among waiting tenants, or whoever left the line last when nobody waits."""
        others = [s.counter for t, s in self._tenants.items() if t != tenant and s.n_waiting]
        if others:
            return min(others)
        left = self._tenants.get(self._last_left) if self._last_left else None
        if left is None:  # nobody left yet, or whoever did was forgotten
            return self._left_counter
        return 0.0 if self._last_left == tenant else left.counter

    def _state(self, tenant: str) -> TenantState[Item]:
        state = self._tenants.get(tenant)
        if state is None:
            state = self._tenants[tenant] = TenantState()
        state.seen = self._clock()
        return state

    def _sweep(self) -> None:
        """Forget tenants idle for `forget_after` seconds whose counter is at or below the
        level they would be lifted to on return: then returning as a stranger puts them
        exactly where remembering them would. A tenant still ahead of everyone (served
        more than the level) keeps its counter until the others catch up, so idling never
        wipes a debt. Runs at most once per `forget_after / 4` seconds."""
        now = self._clock()
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.config.forget_after / 4
        level = self._level()
        idle = [t for t, s in self._tenants.items() if not s.busy
                and now - s.seen >= self.config.forget_after and s.counter <= level]
        for tenant in idle:
            if tenant == self._last_left:
                self._left_counter, self._last_left = self._tenants[tenant].counter, None
            del self._tenants[tenant]

    def _make_room(self, tenant: str) -> list[Item]:
        """The line is full. If another tenant holds more of it than the newcomer would,
        its newest (batch first) request leaves to make room; otherwise refuse."""
        waiting = {t: s.n_waiting for t, s in self._tenants.items() if s.n_waiting}
        hog = max(waiting, key=lambda t: (waiting[t], t))
        mine = waiting.get(tenant, 0)
        if self.config.mode is Mode.VTC and hog != tenant and mine + 1 < waiting[hog]:
            state = self._tenants[hog]
            queue = state.waiting[Priority.BATCH] or state.waiting[Priority.INTERACTIVE]
            victim = queue.pop()
            del self._entries[victim.item]
            return [victim.item]
        everyone = self._below_share(tenant)
        raise EngineOverloaded(
            f"The model's queue is full ({len(self)} requests waiting)"
            + ("." if everyone else "; most of them are yours."),
            retry_after=self.retry_after(), everyone=everyone)

    def pop(self, can_run: Callable[[str, Priority], bool] = lambda _t, _p: True
            ) -> Item | None:
        """The next item to admit among the tenants and classes `can_run` allows, or None."""
        entry = self._choose(can_run)
        if entry is None:
            return None
        self._tenants[entry.tenant].waiting[entry.priority].popleft()
        del self._entries[entry.item]
        self._last_left = entry.tenant
        return entry.item

    def _choose(self, can_run: Callable[[str, Priority], bool]) -> Entry[Item] | None:
        heads = [q[0] for t, s in self._tenants.items()
                 for p, q in s.waiting.items() if q and can_run(t, p)]
        if not heads:
            return None
        if self.config.mode is Mode.FCFS:
            return min(heads, key=lambda e: e.order)
        return min(heads, key=lambda e: (e.priority, self._tenants[e.tenant].counter, e.order))

    def remove(self, item: Item) -> bool:
        entry = self._entries.pop(item, None)
        if entry is None:
            return False
        state = self._tenants[entry.tenant]
        state.waiting[entry.priority].remove(entry)
        state.seen = self._clock()
        return True

    def expired(self) -> list[tuple[Item, bool]]:
        """Take out what waited longer than `max_wait`: (item, everyone) pairs, where
        `everyone` is False for tenants holding more than their share of the line.
        `_entries` is in arrival order, so only the expired prefix is looked at (the
        engine calls this every step)."""
        limit = self._clock() - self.config.max_wait
        old = list(itertools.takewhile(lambda e: e.arrived <= limit, self._entries.values()))
        out = [(e.item, self._below_share(e.tenant)) for e in old]
        for item, _ in out:
            self.remove(item)
        return out

    def _below_share(self, tenant: str) -> bool:
        """Whether `tenant` holds no more than an even share of the model's load (running
        and waiting) while others hold the rest: then the overload is everyone's (503), else
        it is this tenant's (429). A tenant alone is the whole load, so it gets the 429."""
        loads = {t: s.running + s.n_waiting for t, s in self._tenants.items()
                 if s.running or s.n_waiting}
        mine = loads.setdefault(tenant, 0)
        return len(loads) > 1 and mine * len(loads) <= sum(loads.values())

    def next_expiry(self) -> float | None:
        """Seconds until the oldest waiting item expires."""
        oldest = next(iter(self._entries.values()), None)
        if oldest is None:
            return None
        return max(oldest.arrived + self.config.max_wait - self._clock(), 0.0)

    def retry_after(self) -> float:
        return float(max(1, math.ceil(self.config.max_wait / 4)))

    # -- service ------------------------------------------------------------------------------

    def started(self, tenant: str) -> None:
        self._state(tenant).running += 1

    def finished(self, tenant: str) -> None:
        state = self._tenants.get(tenant)
        if state is not None and state.running > 0:
            state.running -= 1
            state.seen = self._clock()

    def running(self, tenant: str) -> int:
        state = self._tenants.get(tenant)
        return state.running if state else 0

    def can_start(self, tenant: str, busy: int, slots: int, preempts: bool = False) -> bool:
        """Whether `tenant` may be admitted now, with `busy` of the engine's `slots` taken.
        On an engine that `preempts` (makes room by pausing a sequence of a tenant holding
        more), any tenant may take a free slot, and beyond them, up to the reserve, a
        tenant a whole slot below its weighted share of the slots among the tenants with
        work (never one alone). On any other engine the last `kept` free slots go only to
        a tenant below its share."""
        if not preempts:
            free = slots - busy
            if free > self.config.kept(slots):
                return True
            return free > 0 and self.running(tenant) < self._share(tenant, slots)
        if busy < slots:
            return True
        return (busy < slots + self.config.reserved(slots)
                and self.running(tenant) + 1 <= self._share(tenant, slots))

    def _share(self, tenant: str, slots: int) -> float:
        active = {t: s.weight for t, s in self._tenants.items()
                  if (s.running or s.n_waiting) and t != tenant}
        if not active:
            return 0.0
        mine = self._tenants[tenant].weight if tenant in self._tenants else 1.0
        return slots * mine / (mine + sum(active.values()))

    def standing(self, tenant: str) -> float:
        """The tenant's counter, for an engine ordering its sequences' tokens (read from
        its thread: one dict lookup)."""
        state = self._tenants.get(tenant)
        return state.counter if state is not None else 0.0

    def token_cost(self, tenant: str) -> float:
        state = self._tenants.get(tenant)
        return self.config.output_weight / (state.weight if state is not None else 1.0)

    def charge(self, tenant: str, input_tokens: int = 0, output_tokens: int = 0) -> None:
        """Count service as it happens: prompt tokens when prefilled, each token made."""
        state = self._state(tenant)
        state.served_input += input_tokens
        state.served_output += output_tokens
        cost = self.config.input_weight * input_tokens + self.config.output_weight * output_tokens
        state.counter += cost / state.weight

    def metrics(self) -> list[TenantLoad]:
        self._sweep()
        return [TenantLoad(t, s.n_waiting, s.running, s.served_input, s.served_output,
                              round(s.counter, 3), s.weight)
                for t, s in sorted(self._tenants.items())]


def _valid(priority: int, weight: float) -> Priority:
    """Refuse what would corrupt the counters (a zero weight divides by zero)."""
    if priority not in tuple(Priority):
        raise EngineError(f"unknown priority class {priority}", param="priority")
    if not (weight > 0 and math.isfinite(weight)):
        raise EngineError("a tenant's weight must be a positive number", param="weight")
    return Priority(priority)
