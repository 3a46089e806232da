"""Which running sequences decode in a step that holds fewer than are running.

The engine holds more sequences than a step decodes (on a CPU a step's throughput stops
growing at about 8 sequences per thread while its duration keeps growing), so the choice
of who decodes is where tenants' shares are kept token by token: each token of the step
goes to the tenant with the smallest virtual counter (the admission layer's, read through
`TenantShares`), counting the step's earlier picks, and within a tenant to its sequence
that was advanced longest ago. A tenant alone, or an engine without shares (FCFS, a Ray
replica), takes turns by age only.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import TypeVar

from aicloud.engines.base import TenantShares

T = TypeVar("T")


def take_turns(items: list[T], width: int, shares: TenantShares | None,
               tenant: Callable[[T], str], age: Callable[[T], int]) -> list[T]:
    """Up to `width` of `items`; `age(item)` is the step that last advanced it."""
    if len(items) <= width:
        return items
    oldest_first = sorted(items, key=age)
    if shares is None:
        return oldest_first[:width]
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
