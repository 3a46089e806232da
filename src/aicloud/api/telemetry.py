"""Latency as clients see it, per model: time to first token and time between tokens,
kept as Prometheus-style cumulative histograms (fixed buckets, no per-request memory)."""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass(slots=True)
class Histogram:
    bounds: tuple[float, ...]
    counts: list[int] = field(init=False)  # per bucket, the last one is +Inf
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += times
        self.total += value * times
        self.n += times

    def cumulative(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


@dataclass(slots=True)
class Telemetry:
    ttft: dict[str, Histogram] = field(default_factory=dict)
    itl: dict[str, Histogram] = field(default_factory=dict)
    refused: Counter[tuple[str, str]] = field(default_factory=Counter)  # (model, reason)
    # the model pool: loads (model, ok|failed), their seconds, unloads (model, reason) and
    # the first token of requests that waited for a load
    loads: Counter[tuple[str, str]] = field(default_factory=Counter)
    load_seconds: dict[str, Histogram] = field(default_factory=dict)
    unloads: Counter[tuple[str, str]] = field(default_factory=Counter)
    cold_ttft: dict[str, Histogram] = field(default_factory=dict)

    def model_loaded(self, model: str, seconds: float, ok: bool) -> None:
        self.loads[model, "ok" if ok else "failed"] += 1
        self.load_seconds.setdefault(model, Histogram(LOAD_BUCKETS)).observe(seconds)

    def model_unloaded(self, model: str, reason: str) -> None:
        self.unloads[model, reason] += 1

    def cold_first_token(self, model: str, seconds: float) -> None:
        self.cold_ttft.setdefault(model, Histogram(TTFT_BUCKETS)).observe(seconds)

    def first_token(self, model: str, seconds: float) -> None:
        self.ttft.setdefault(model, Histogram(TTFT_BUCKETS)).observe(seconds)

    def next_tokens(self, model: str, seconds: float, tokens: int) -> None:
        """`tokens` arrived together after `seconds`: each took seconds / tokens."""
        if tokens > 0:
            self.itl.setdefault(model, Histogram(ITL_BUCKETS)).observe(seconds / tokens, tokens)
