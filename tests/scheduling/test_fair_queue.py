"""The VTC queue, deterministically: a fake clock and a fake engine that serves tokens."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from aicloud.engines.base import EngineError, EngineOverloaded, Priority
from aicloud.scheduling.fair_queue import FairQueue, Mode, SchedulingConfig


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def drain(queue: FairQueue, tokens: int = 10) -> list[str]:
    """Admit one at a time, each served `tokens` output tokens before the next pick."""
    order = []
    while (item := queue.pop()) is not None:
        tenant = str(item).split("-")[0]
        queue.charge(tenant, output_tokens=tokens)
        order.append(tenant)
    return order


def test_fcfs_is_arrival_order() -> None:
    q = FairQueue(SchedulingConfig(mode=Mode.FCFS))
    for i, tenant in enumerate("aaab"):
        q.push(f"{tenant}-{i}", tenant)
    assert drain(q) == ["a", "a", "a", "b"]


def test_vtc_interleaves_a_flood_with_a_light_tenant() -> None:
    q = FairQueue()
    for i in range(6):
        q.push(f"heavy-{i}", "heavy")
    q.push("light-0", "light")
    q.push("light-1", "light")
    order = drain(q)
    assert order.index("light") <= 1 and order[:4].count("light") == 2


def test_weights_share_service_in_proportion() -> None:
    q = FairQueue()
    for i in range(300):
        q.push(f"paid-{i}", "paid", weight=3.0)
        q.push(f"free-{i}", "free", weight=1.0)
    first = Counter(drain(q)[:200])
    assert first["paid"] == pytest.approx(150, abs=2)
    assert first["free"] == pytest.approx(50, abs=2)


def test_input_and_output_tokens_are_weighted_separately() -> None:
    q = FairQueue(SchedulingConfig(input_weight=0.5, output_weight=4.0))
    q.charge("reader", input_tokens=800)
    q.charge("writer", output_tokens=100)
    assert {t.tenant: t.counter for t in q.metrics()} == {"reader": 400.0, "writer": 400.0}
    assert {(t.served_input_tokens, t.served_output_tokens) for t in q.metrics()} == {
        (800, 0), (0, 100)}


def test_priority_class_comes_before_fairness() -> None:
    q = FairQueue()
    q.charge("a", output_tokens=1000)  # a has had far more service than b
    q.push("b-0", "b", priority=Priority.BATCH)
    q.push("a-0", "a", priority=Priority.INTERACTIVE)
    q.push("b-1", "b", priority=Priority.INTERACTIVE)
    assert [q.pop(), q.pop(), q.pop()] == ["b-1", "a-0", "b-0"]


def test_a_returning_tenant_is_lifted_and_cannot_bank_idle_time() -> None:
    q = FairQueue()
    for i in range(50):
        q.push(f"busy-{i}", "busy")
    for _ in range(20):
        assert q.pop() is not None
        q.charge("busy", output_tokens=10)
    assert {t.tenant: t.counter for t in q.metrics()}["busy"] == 400.0
    for i in range(10):
        q.push(f"idle-{i}", "idle")  # back after sitting out 20 requests
    assert {t.tenant: t.counter for t in q.metrics()}["idle"] == 400.0
    order = drain(q)[:10]
    # without the lift, "idle" would take all ten next slots to catch up
    assert Counter(order) == {"idle": 5, "busy": 5}


def test_lift_uses_who_left_last_when_nobody_waits() -> None:
    q = FairQueue()
    q.push("a-0", "a")
    q.pop()
    q.charge("a", output_tokens=50)
    q.push("b-0", "b")
    assert {t.tenant: t.counter for t in q.metrics()}["b"] == 100.0


def test_a_full_queue_sheds_the_flooder_not_the_newcomer() -> None:
    q = FairQueue(SchedulingConfig(max_waiting=4))
    for i in range(4):
        q.push(f"hog-{i}", "hog")
    assert q.push("light-0", "light") == ["hog-3"]  # the hog's newest makes room
    with pytest.raises(EngineOverloaded) as flood:
        q.push("hog-9", "hog")
    assert not flood.value.everyone and flood.value.retry_after >= 1
    q2 = FairQueue(SchedulingConfig(max_waiting=2))
    q2.push("a-0", "a")
    q2.push("b-0", "b")
    with pytest.raises(EngineOverloaded) as full:
        q2.push("c-0", "c")
    assert full.value.everyone  # nobody is over their share: the model is just full


def test_waiting_too_long_expires_with_blame() -> None:
    clock = Clock()
    q = FairQueue(SchedulingConfig(max_wait=10.0), clock)
    q.started("hog")
    q.started("hog")  # the hog also holds two slots
    for i in range(3):
        q.push(f"hog-{i}", "hog")
    clock.now = 5.0
    q.push("light-0", "light")
    assert q.next_expiry() == 5.0
    clock.now = 10.0
    expired = dict(q.expired())
    assert expired == {"hog-0": False, "hog-1": False, "hog-2": False}
    assert len(q) == 1
    clock.now = 15.0
    assert q.expired() == [("light-0", True)]
    clock.now = 16.0
    q.push("hog-3", "hog")
    clock.now = 30.0
    assert q.expired() == [("hog-3", False)]  # alone, the load is all its own


def test_an_even_share_is_not_blamed() -> None:
    """One running request against one waiting: the waiter holds an even share, so when
    it expires the overload is the model's (503), not its own (429)."""
    clock = Clock()
    q = FairQueue(SchedulingConfig(max_wait=2.0), clock)
    q.started("hog")
    q.push("other-0", "other")
    clock.now = 3.0
    assert q.expired() == [("other-0", True)]


def test_remove_and_running_counts() -> None:
    q = FairQueue()
    q.push("a-0", "a")
    q.push("a-1", "a")
    assert q.remove("a-0") and not q.remove("a-0")
    q.started("a")
    assert q.running("a") == 1 and q.pop(lambda t, _: q.running(t) < 1) is None
    q.finished("a")
    assert q.pop(lambda t, _: q.running(t) < 1) == "a-1"


def test_the_reserve_is_a_quarter_of_the_slots_beyond_them() -> None:
    assert SchedulingConfig().reserved(32) == 8
    assert SchedulingConfig().reserved(2) == 1
    assert SchedulingConfig(reserve=2).reserved(8) == 2
    assert SchedulingConfig(mode=Mode.FCFS).reserved(32) == 0
    assert (SchedulingConfig().kept(32), SchedulingConfig().kept(2)) == (8, 0)


def busy(q: FairQueue, tenant: str, running: int, waiting: int = 1, weight: float = 1.0) -> None:
    for i in range(waiting):
        q.push(f"{tenant}-{i}", tenant, weight=weight)
    for _ in range(running):
        q.started(tenant)


def test_a_tenant_alone_gets_every_slot_and_nothing_beyond() -> None:
    q = FairQueue()
    busy(q, "heavy", running=31, waiting=20)
    assert q.can_start("heavy", busy=31, slots=32, preempts=True)  # a free slot is anyone's
    # where the engine cannot pause a sequence, the last quarter is kept for newcomers
    assert not q.can_start("heavy", busy=24, slots=32)
    assert q.can_start("heavy", busy=23, slots=32)
    q.started("heavy")
    # all 32 taken: alone, it is not admitted beyond them, even where the engine preempts
    assert not q.can_start("heavy", busy=32, slots=32, preempts=True)


def test_a_newcomer_below_its_share_is_admitted_beyond_the_slots() -> None:
    q = FairQueue()
    busy(q, "heavy", running=32, waiting=20)
    busy(q, "light", running=0)
    assert q.can_start("light", busy=32, slots=32, preempts=True)  # 0 < its share of 16
    assert not q.can_start("light", busy=32, slots=32)  # the engine cannot make room
    assert not q.can_start("heavy", busy=32, slots=32, preempts=True)  # above its share
    assert not q.can_start("light", busy=40, slots=32, preempts=True)  # the reserve is used
    # heavy-0 came first with an equal counter, but only light may go beyond the slots
    assert q.pop(lambda t, _: q.can_start(t, busy=32, slots=32, preempts=True)) == "light-0"


def test_going_beyond_the_slots_takes_a_whole_slot_below_the_share() -> None:
    """One slot, two tenants: each's share is half a slot, so the newcomer waits (the
    engine could not give it a slot without taking the flood's only one)."""
    for slots, admitted in ((1, False), (2, True)):
        q = FairQueue()
        busy(q, "heavy", running=slots)
        busy(q, "light", running=0)
        assert q.can_start("light", busy=slots, slots=slots, preempts=True) is admitted


def test_the_share_that_opens_the_reserve_is_weighted() -> None:
    q = FairQueue()
    busy(q, "heavy", running=10)
    busy(q, "paid", running=22, weight=3.0)
    assert q.can_start("paid", busy=32, slots=32, preempts=True)  # 22 < 32 * 3/4
    assert not q.can_start("heavy", busy=32, slots=32, preempts=True)  # 10 > 32 * 1/4


def test_fcfs_takes_any_free_slot_and_never_more() -> None:
    q = FairQueue(SchedulingConfig(mode=Mode.FCFS))
    busy(q, "heavy", running=31)
    busy(q, "light", running=0)
    assert q.can_start("heavy", busy=31, slots=32)
    assert q.can_start("heavy", busy=31, slots=32, preempts=True)
    assert not q.can_start("light", busy=32, slots=32, preempts=True)


def test_standing_and_token_cost_are_what_an_engine_orders_tokens_by() -> None:
    q = FairQueue(SchedulingConfig(output_weight=2.0))
    q.push("paid-0", "paid", weight=4.0)
    q.charge("paid", output_tokens=10)
    assert q.standing("paid") == 5.0 and q.token_cost("paid") == 0.5
    assert q.standing("stranger") == 0.0 and q.token_cost("stranger") == 2.0


def test_backlogged_tenants_stay_within_the_vtc_bound() -> None:
    """A fake engine with 4 slots serving random requests from three always-backlogged
    tenants: weighted service never drifts apart by more than the paper's bound, twice the
    largest request cost."""
    rng = random.Random(5)
    config = SchedulingConfig(input_weight=1.0, output_weight=2.0, max_waiting=10_000)
    q = FairQueue(config)
    weights = {"a": 1.0, "b": 2.0, "c": 1.0}
    largest = 0.0
    running: list[tuple[str, int]] = []  # tenant, output tokens left

    def top_up() -> None:
        nonlocal largest
        for tenant, weight in weights.items():
            while sum(1 for t in q.metrics() if t.tenant == tenant and t.waiting >= 3) == 0:
                prompt, out = rng.randint(1, 200), rng.randint(1, 100)
                largest = max(largest, config.input_weight * prompt
                              + config.output_weight * out)
                q.push((tenant, prompt, out, rng.random()), tenant, weight=weight)

    for _ in range(3000):
        top_up()
        while len(running) < 4 and (item := q.pop()) is not None:
            tenant, prompt, out, _ = item
            q.charge(tenant, input_tokens=prompt)
            running.append((tenant, out))
        for i, (tenant, left) in enumerate(running):
            q.charge(tenant, output_tokens=1)
            running[i] = (tenant, left - 1)
        running = [(t, left) for t, left in running if left > 0]
        counters = [t.counter for t in q.metrics()]
        assert max(counters) - min(counters) <= 2 * largest
    served = {t.tenant: t.served_output_tokens for t in q.metrics()}
    assert served["b"] > 1.6 * served["a"]


def test_bad_weight_or_priority_is_refused_before_it_can_corrupt_counters() -> None:
    q = FairQueue()
    for weight in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(EngineError):
            q.push("a-0", "a", weight=weight)
    with pytest.raises(EngineError):
        q.push("a-0", "a", priority=7)
    assert len(q) == 0 and q.metrics() == []


def test_expiry_follows_arrival_order_across_pops() -> None:
    clock = Clock()
    q = FairQueue(SchedulingConfig(max_wait=10.0), clock)
    q.push("a-0", "a")
    clock.now = 3.0
    q.push("b-0", "b")
    clock.now = 6.0
    q.push("a-1", "a")
    assert q.pop() == "a-0"  # equal counters: arrival order
    assert q.next_expiry() == 7.0  # b-0 is the oldest left
    clock.now = 15.0
    assert [item for item, _ in q.expired()] == ["b-0"]
    clock.now = 16.0
    assert [item for item, _ in q.expired()] == ["a-1"]
    assert q.next_expiry() is None


def serve_one(q: FairQueue, item: str, tenant: str, tokens: int) -> None:
    """One request from arrival to finish, `tokens` output tokens."""
    q.push(item, tenant)
    assert q.pop() == item
    q.started(tenant)
    q.charge(tenant, output_tokens=tokens)
    q.finished(tenant)


def tenants_of(q: FairQueue) -> dict[str, float]:
    return {t.tenant: t.counter for t in q.metrics()}


def test_idle_tenants_are_forgotten_so_state_stays_bounded() -> None:
    clock = Clock()
    q = FairQueue(SchedulingConfig(forget_after=100.0), clock)
    for i in range(50):  # a churn of one-request tenants (keys that come and go)
        serve_one(q, f"t{i}-0", f"t{i}", tokens=5)
        clock.now += 10
    # only those seen within the last 100 s, plus the sweep's lag of 25 s
    assert 10 <= len(tenants_of(q)) <= 13
    clock.now += 200
    assert tenants_of(q) == {}  # nobody waits or runs: every label set is gone
    q.push("late-0", "late")
    # the floor survives its tenant: the newcomer starts where t49 left, not at zero
    assert tenants_of(q) == {"late": 500.0}


def test_busy_tenants_are_never_forgotten() -> None:
    clock = Clock()
    q = FairQueue(SchedulingConfig(forget_after=100.0, max_wait=1e9), clock)
    q.push("waits-0", "waits")
    q.started("runs")  # a generation that outlasts the idle period
    clock.now += 1000
    assert set(tenants_of(q)) == {"waits", "runs"}
    q.finished("runs")
    clock.now += 99
    assert set(tenants_of(q)) == {"waits", "runs"}  # idle since it finished: too soon
    clock.now += 30
    assert set(tenants_of(q)) == {"waits"}


def test_a_forgotten_tenant_returns_lifted_and_banks_nothing() -> None:
    clock = Clock()
    q = FairQueue(SchedulingConfig(forget_after=100.0), clock)
    serve_one(q, "idle-0", "idle", tokens=10)  # counter 20, then away
    for i in range(30):
        q.push(f"busy-{i}", "busy")
    for _ in range(10):
        q.pop()
        q.charge("busy", output_tokens=10)  # busy keeps being served: counter 220
        clock.now += 30
    assert "idle" not in tenants_of(q)
    for i in range(10):
        q.push(f"idle-{i}", "idle")
    assert tenants_of(q)["idle"] == tenants_of(q)["busy"] == 220.0  # level with busy
    assert Counter(drain(q)[:10]) == {"idle": 5, "busy": 5}


def test_the_last_to_leave_returns_to_its_own_counter() -> None:
    clock = Clock()
    q = FairQueue(SchedulingConfig(forget_after=100.0), clock)
    serve_one(q, "a-0", "a", tokens=20)  # a is the last to leave, counter 40
    clock.now += 500
    assert tenants_of(q) == {}
    q.push("a-1", "a")
    q.push("b-0", "b")
    assert tenants_of(q) == {"a": 40.0, "b": 40.0}


def test_a_tenant_ahead_of_everyone_keeps_its_debt_while_idle() -> None:
    clock = Clock()
    q = FairQueue(SchedulingConfig(forget_after=100.0), clock)
    serve_one(q, "heavy-0", "heavy", tokens=500)  # counter 1000
    serve_one(q, "light-0", "light", tokens=5)  # lifted to 1000, then 1010
    serve_one(q, "mid-0", "mid", tokens=1)  # 1012: the level, the last to leave
    q.charge("heavy", output_tokens=1000)  # a long stream's tail: 3000, far ahead
    clock.now += 1000
    assert set(tenants_of(q)) == {"heavy"}  # forgetting it would wipe a debt
    for i in range(3):
        q.push(f"newbie-{i}", "newbie")  # lifted to the level, 1012
    for i in range(3):
        q.push(f"heavy-{i + 1}", "heavy")  # keeps 3000
    assert tenants_of(q) == {"heavy": 3000.0, "newbie": 1012.0}
    assert drain(q, tokens=1)[:3] == ["newbie"] * 3
