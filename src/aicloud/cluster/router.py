"""Which replica gets a request: the least outstanding tokens, unless a replica that
already holds the request's prompt prefix in its KV cache is nearly as free.

A prefix is keyed with the request's cache scope: replicas never share a cached prefix
across scopes, and routing by another tenant's prompt would let its placement (and so its
speed) depend on what that tenant sent."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

PREFIX_TOKENS = 32  # a shared system prompt is usually longer than this
AFFINITY_SLACK = 256  # outstanding tokens we accept for a cache hit
AFFINITY_MEMORY = 4096


@dataclass(slots=True, eq=False)
class Slotted:
    """What routing needs to know about a replica."""

    index: int
    capacity: int
    alive: bool = True
    outstanding: dict[str, int] = field(default_factory=dict)  # request id → tokens

    @property
    def load(self) -> int:
        return sum(self.outstanding.values())

    @property
    def has_room(self) -> bool:
        return self.alive and len(self.outstanding) < self.capacity


def prefix_key(prompt: Sequence[int], scope: str = "") -> str | None:
    if len(prompt) < PREFIX_TOKENS:
        return None
    head = ",".join(map(str, prompt[:PREFIX_TOKENS])).encode()
    return hashlib.blake2b(head, digest_size=8, key=scope.encode()[:64]).hexdigest()


# the caller's own replica type, handed back as it was given
Replica = TypeVar("Replica", bound=Slotted)


class Router:
    def __init__(self) -> None:
        self._homes: OrderedDict[str, int] = OrderedDict()  # prefix → replica index

    def pick(self, replicas: Sequence[Replica], prompt: Sequence[int],
             scope: str = "") -> Replica | None:
        open_ = [r for r in replicas if r.has_room]
        if not open_:
            return None
        best = min(open_, key=lambda r: (r.load, len(r.outstanding), r.index))
        key = prefix_key(prompt, scope)
        home = self._homes.get(key) if key else None
        chosen = best
        if home is not None:
            warm = next((r for r in open_ if r.index == home), None)
            if warm is not None and warm.load <= best.load + AFFINITY_SLACK:
                chosen = warm
        if key:
            self._homes[key] = chosen.index
            self._homes.move_to_end(key)
            while len(self._homes) > AFFINITY_MEMORY:
                self._homes.popitem(last=False)
        return chosen

    def forget(self, index: int) -> None:
        for key in [k for k, v in self._homes.items() if v == index]:
            del self._homes[key]
