"""How many threads each decode uses, chosen by measuring rather than by counting cores.

llama.cpp's workers spin at barriers inside every graph computation, so a thread that the
OS deschedules stalls all the others. On a quiet machine two threads beat one (68 against
54 tok/s at one sequence here, 148 against 92 at 32), but beside one busy process the same
two threads fell to 13 / 27 tok/s while one thread kept 54 / 92, and through the server a
busy neighbour brought a stream down to 0.6 tok/s. A server always shares its cores (the
event loop, database threads, other models, whatever else runs on the host), so the count
is re-decided while serving: the tuner times the decode steps at the current count and,
every so often, a few steps at a neighbouring count, and keeps whichever made rows
fastest. Probing costs a few slow steps per period when the current count was right.
"""

from __future__ import annotations

import statistics
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class TunerConfig:
    """`probe_every` decode steps at the current count, then `probe_steps` at another;
    a probe wins only if it is `margin` faster, so noise does not flip the count."""

    probe_every: int = 120
    probe_steps: int = 6
    margin: float = 1.15

    def __post_init__(self) -> None:
        if self.probe_every < 1 or self.probe_steps < 1 or self.margin < 1.0:
            raise ValueError("probe_every and probe_steps must be >= 1, margin >= 1")


class ThreadTuner:
    """Driven by the engine thread: `threads()` before a decode, `record()` after it."""

    def __init__(self, max_threads: int, config: TunerConfig | None = None) -> None:
        self.max_threads = max(1, max_threads)
        self.config = config or TunerConfig()
        self.current = self.max_threads
        self._probe: int | None = None  # the count being tried, if any
        self._since_probe = 0
        # seconds of the last decodes at the current count, by rows: a step's time depends
        # on its width, so a probe is compared only with steps as wide as its own
        self._recent: dict[int, deque[float]] = {}
        self._probed: list[tuple[int, float]] = []
        self._probe_steps_seen = 0
        self._next_candidate = 0
        self.switches = 0

    def threads(self) -> int:
        """The count the next measured decode should use."""
        return self._probe if self._probe is not None else self.current

    def record(self, rows: int, seconds: float) -> None:
        """One decode of `rows` token rows took `seconds` at `threads()` threads."""
        if rows <= 0 or seconds <= 0:
            return
        if self._probe is None:
            self._recent.setdefault(rows, deque(maxlen=self.config.probe_steps)).append(seconds)
            self._since_probe += 1
            if self._since_probe >= self.config.probe_every and self.max_threads > 1:
                self._start_probe()
            return
        self._probe_steps_seen += 1
        if rows in self._recent:
            self._probed.append((rows, seconds))
        # steps of widths never seen at the current count say nothing; a probe that meets
        # none it can compare ends without a verdict
        if (len(self._probed) >= self.config.probe_steps
                or self._probe_steps_seen >= 4 * self.config.probe_steps):
            self._end_probe()

    def _start_probe(self) -> None:
        candidates = self._candidates()
        self._probe = candidates[self._next_candidate % len(candidates)]
        self._next_candidate += 1
        self._probed = []
        self._probe_steps_seen = 0

    def _candidates(self) -> list[int]:
        """Half and double the current count (hill climbing: on a few cores that is every
        count worth trying, on many it moves in a few probes)."""
        below, above = max(1, self.current // 2), min(self.max_threads, self.current * 2)
        return [n for n in dict.fromkeys((below, above)) if n != self.current]

    def _end_probe(self) -> None:
        probe, self._probe = self._probe, None
        self._since_probe = 0
        if probe is not None and self._probed and _speedup(
                self._probed, self._recent) > self.config.margin:
            self.current = probe
            self.switches += 1
            self._recent.clear()
        self._probed = []


def _speedup(probed: list[tuple[int, float]], recent: dict[int, deque[float]]) -> float:
    """How much faster the probed count ran: the median over its steps of the time the
    current count took for a step as wide (its recent median) over the probe's time."""
    ratios = sorted(statistics.median(recent[rows]) / seconds for rows, seconds in probed)
    return ratios[len(ratios) // 2]


class ThreadBudget:
    """The decode threads every loaded llama.cpp model of the process draws from, so N
    models never run N x threads on the cores (two 2-thread decoders on 2 cores spin
    against each other at every barrier: a 40-token answer took 10 s instead of 0.5 s).

    A decode takes up to the threads it wants and gives them back when it returns; when
    none are free it waits, so busy models take turns step by step (each step is tens of
    milliseconds) instead of splitting the cores. Turns go by backlog: each caller (an
    engine's thread) says how many sequences its decode advances (`rows`), and a turn
    costs it 1/rows, so a model decoding four sequences gets four turns to one that
    decodes one, and every sequence advances at the same rate whichever model it is on.
    A step costs about the same for one row or four, so this also makes more tokens per
    second of the cores than turns in arrival order, which gave the hot model of a
    heavy-tailed load one step in three while it held most of the requests. A caller
    coming back from idle starts level with the turns being served (no banked credit)."""

    def __init__(self, total: int) -> None:
        self.total = max(1, total)
        self.free = self.total
        self._turns: list[tuple[float, int]] = []  # (virtual start, arrival) of waiters
        self._arrivals = 0
        self._now = 0.0  # the virtual start of the turn served last
        self._ends: dict[int, float] = {}  # each caller's virtual end of its last turn
        self._changed = threading.Condition()

    def take(self, wanted: int, *, exact: bool = False, rows: int = 1) -> int:
        """Block until this caller's turn and at least one thread (all `wanted` with
        `exact`) is free; return how many it got (at most `wanted` and the total)."""
        wanted = max(1, min(wanted, self.total))
        caller = threading.get_ident()
        with self._changed:
            self._arrivals += 1
            start = max(self._ends.get(caller, 0.0), self._now)
            turn = (start, self._arrivals)
            self._turns.append(turn)
            needed = wanted if exact else 1
            while min(self._turns) != turn or self.free < needed:
                self._changed.wait()
            self._turns.remove(turn)
            self._now = start
            self._ends[caller] = start + 1.0 / max(1, rows)
            # callers whose turns are all behind are level with newcomers: forget them
            for gone in [c for c, end in self._ends.items() if end <= start]:
                del self._ends[gone]
            got = min(wanted, self.free)
            self.free -= got
            self._changed.notify_all()
            return got

    def give(self, n: int) -> None:
        with self._changed:
            self.free = min(self.total, self.free + n)
            self._changed.notify_all()

    @contextmanager
    def held(self, wanted: int, *, exact: bool = False) -> Iterator[int]:
        got = self.take(wanted, exact=exact)
        try:
            yield got
        finally:
            self.give(got)
