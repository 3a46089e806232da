"""Which sequences decode in a step narrower than the running set: deterministic, with
counters standing in for the admission layer's."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from aicloud.engines.llamacpp.turns import take_turns


@dataclass
class Seq:
    name: str
    tenant: str
    last_step: int


class Counters:
    """`TenantShares` as a dict of counters; each token costs 2 / weight."""

    def __init__(self, counters: dict[str, float], weights: dict[str, float] | None = None):
        self.counters = counters
        self.weights = weights or {}

    def standing(self, tenant: str) -> float:
        return self.counters.get(tenant, 0.0)

    def token_cost(self, tenant: str) -> float:
        return 2.0 / self.weights.get(tenant, 1.0)


def turns(seqs: list[Seq], width: int, shares: Counters | None) -> list[Seq]:
    return take_turns(seqs, width, shares, lambda s: s.tenant, lambda s: s.last_step)


def test_without_shares_those_advanced_longest_ago_go_first() -> None:
    seqs = [Seq(f"s{i}", "a" if i % 2 else "b", last_step=10 - i) for i in range(6)]
    assert [s.name for s in turns(seqs, 3, None)] == ["s5", "s4", "s3"]
    assert turns(seqs[:2], 3, None) == seqs[:2]  # room for all: no choice to make


def test_a_lone_tenant_takes_turns_by_age() -> None:
    seqs = [Seq(f"s{i}", "alone", last_step=i % 4) for i in range(8)]
    chosen = turns(seqs, 4, Counters({"alone": 100.0}))
    assert sorted(s.last_step for s in chosen) == [0, 0, 1, 1]


def test_the_least_served_tenant_decodes_first() -> None:
    """A flood holds 14 sequences, a newcomer 2: the newcomer's both decode every step, and
    the flood takes the rest of the step, oldest first."""
    flood = [Seq(f"h{i}", "heavy", last_step=i) for i in range(14)]
    light = [Seq("l0", "light", 20), Seq("l1", "light", 21)]
    chosen = turns(flood + light, 8, Counters({"heavy": 1000.0, "light": 40.0}))
    assert Counter(s.tenant for s in chosen) == {"light": 2, "heavy": 6}
    assert [s.name for s in chosen if s.tenant == "heavy"] == [f"h{i}" for i in range(6)]


def test_equal_counters_share_a_step_by_weight() -> None:
    seqs = [Seq(f"{t}{i}", t, last_step=i) for t in ("free", "paid") for i in range(10)]
    chosen = turns(seqs, 8, Counters({"free": 0.0, "paid": 0.0}, {"paid": 3.0}))
    assert Counter(s.tenant for s in chosen) == {"paid": 6, "free": 2}


def test_a_tenant_behind_catches_up_within_the_step() -> None:
    """Ten tokens behind (20 counter units at 2 per token): it takes the first ten turns,
    then the two alternate."""
    seqs = [Seq(f"{t}{i}", t, last_step=i) for t in ("ahead", "behind") for i in range(16)]
    chosen = turns(seqs, 14, Counters({"ahead": 20.0, "behind": 0.0}))
    assert Counter(s.tenant for s in chosen) == {"behind": 12, "ahead": 2}


@dataclass
class Placed:
    slot: int
    tenant: str = "solo"
    last_step: int = 0


def placed_turns(seqs: list[Placed], width: int, shares: Counters | None) -> list[Placed]:
    return take_turns(seqs, width, shares, lambda s: s.tenant, lambda s: s.last_step,
                      lambda s: s.slot)


def test_a_lone_tenant_takes_turns_in_windows_of_neighbouring_slots() -> None:
    """32 sequences in steps of 16: two alternating halves of neighbouring slots (one
    ubatch each), not interleaved sets, and each sequence advances every other step."""
    seqs = [Placed(slot) for slot in range(32)]
    random.Random(1).shuffle(seqs)  # the engine lists them in admission order
    advanced = Counter[int]()
    for step in range(1, 9):
        chosen = placed_turns(seqs, 16, Counters({"solo": 5.0}))
        slots = sorted(s.slot for s in chosen)
        assert slots == list(range(slots[0], slots[0] + 16)), slots
        for s in chosen:
            s.last_step = step
            advanced[s.slot] += 1
    assert set(advanced.values()) == {4}


def test_the_sequence_advanced_longest_ago_is_always_in_the_window() -> None:
    ages = [5, 9, 1, 7, 3, 8, 2, 6, 4, 0, 11, 10]
    seqs = [Placed(slot=i * 2, last_step=age) for i, age in enumerate(ages)]
    for width in (1, 3, 5, 11):
        chosen = placed_turns(seqs, width, None)
        assert len(chosen) == width
        assert min(seqs, key=lambda s: s.last_step) in chosen
        order = sorted(seqs, key=lambda s: s.slot)
        first = order.index(min(chosen, key=lambda s: s.slot))
        assert order[first:first + width] == sorted(chosen, key=lambda s: s.slot)


def test_tenants_with_shares_still_take_turns_by_their_counters() -> None:
    seqs = [Placed(slot, tenant="a" if slot < 8 else "b") for slot in range(16)]
    chosen = placed_turns(seqs, 4, Counters({"a": 0.0, "b": 100.0}))
    assert {s.tenant for s in chosen} == {"a"}
