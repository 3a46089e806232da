"""Which running sequences decode in a step that holds fewer than are running.

The engine holds more sequences than a step decodes (on a CPU a step's throughput stops
growing at about 8 sequences per thread while its duration keeps growing), so the choice
of who decodes is where tenants' shares are kept token by token: each token of the step
goes to the tenant with the smallest virtual counter (the admission layer's, read through
`TenantShares`), counting the step's earlier picks, and within a tenant to its sequence
that was advanced longest ago. A tenant alone, or an engine without shares (FCFS, a Ray
replica), takes turns by age only, in windows of neighbouring KV streams when the caller
says where each sits (`oldest_window`).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import TypeVar

from aicloud.engines.base import TenantShares

T = TypeVar("T")


def take_turns(items: list[T], width: int, shares: TenantShares | None,
               tenant: Callable[[T], str], age: Callable[[T], int],
               place: Callable[[T], int] | None = None) -> list[T]:
    """Up to `width` of `items`; `age(item)` is the step that last advanced it, `place(item)`
    where it sits (its KV stream), if neighbours are cheaper to decode together."""
    if len(items) <= width:
        return items
    oldest_first = sorted(items, key=age)
    if shares is None or len({tenant(item) for item in items}) == 1:
        return oldest_first[:width] if place is None else oldest_window(items, width, age,
                                                                        place)
    lines: dict[str, list[T]] = {}
    for item in oldest_first:
        lines.setdefault(tenant(item), []).append(item)
    # ties go to the tenant whose sequence waited longest (its line was met first)
    heap = [(shares.standing(t), order, t) for order, t in enumerate(lines)]
    heapq.heapify(heap)
    chosen: list[T] = []
    while len(chosen) < width:
        level, order, name = heapq.heappop(heap)
        line = lines[name]
        chosen.append(line.pop(0))
        if line:
            heapq.heappush(heap, (level + shares.token_cost(name), order, name))
    return chosen


def oldest_window(items: list[T], width: int, age: Callable[[T], int],
                  place: Callable[[T], int]) -> list[T]:
    """`width` neighbours in `place` order: of the windows holding the item advanced
    longest ago, the one advanced longest ago in all. llama.cpp computes a run of
    consecutive KV streams as one ubatch and each gap costs another pass over the weights,
    so turns go by windows: 32 sequences in steps of 16 decode as two alternating halves,
    not as two interleaved sets of 16 single rows. The oldest item is always in, so each
    waits at most one step per item ahead of it, as with turns by age alone."""
    ordered = sorted(items, key=place)
    ages = [age(item) for item in ordered]
    oldest = min(range(len(ordered)), key=ages.__getitem__)
    starts = range(max(0, oldest - width + 1), min(oldest, len(ordered) - width) + 1)
    start = min(starts, key=lambda s: sum(ages[s:s + width]))
    return ordered[start:start + width]
