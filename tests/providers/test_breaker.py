from __future__ import annotations

from aicloud.providers.breaker import Breaker, BreakerState


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_threshold_failures_in_a_row_then_probes_once() -> None:
    clock = Clock()
    breaker = Breaker(threshold=3, cooldown=10, clock=clock)
    for _ in range(2):
        breaker.failed()
        assert breaker.can_send()
    breaker.failed()
    assert breaker.state is BreakerState.OPEN and not breaker.can_send()
    assert breaker.retry_after() == 10
    clock.now = 10.5
    assert breaker.state is BreakerState.HALF_OPEN and breaker.can_send()
    breaker.send()  # the probe
    assert not breaker.can_send()  # one probe at a time
    breaker.succeeded()
    assert breaker.state is BreakerState.CLOSED and breaker.can_send()


def test_a_failed_probe_reopens_at_once() -> None:
    clock = Clock()
    breaker = Breaker(threshold=2, cooldown=5, clock=clock)
    breaker.failed()
    breaker.failed()
    clock.now = 6
    breaker.send()
    breaker.failed()
    assert breaker.state is BreakerState.OPEN
    assert breaker.retry_after() == 5


def test_a_success_resets_the_count() -> None:
    breaker = Breaker(threshold=2, cooldown=5, clock=Clock())
    breaker.failed()
    breaker.succeeded()
    breaker.failed()
    assert breaker.state is BreakerState.CLOSED


def test_retry_after_opens_it_for_that_long() -> None:
    clock = Clock()
    breaker = Breaker(threshold=5, cooldown=10, clock=clock)
    breaker.failed(pause=2.0)
    assert breaker.state is BreakerState.OPEN and breaker.retry_after() == 2.0
    clock.now = 2.0
    assert breaker.can_send()
