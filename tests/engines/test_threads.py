"""The decode thread count follows what is measured, not the core count."""

from __future__ import annotations

import pytest

from aicloud.engines.llamacpp.threads import ThreadTuner, TunerConfig

CONFIG = TunerConfig(probe_every=10, probe_steps=3, margin=1.15)


def drive(tuner: ThreadTuner, seconds_per_row: dict[int, float], steps: int,
          rows: int = 16) -> list[int]:
    """Run `steps` decodes whose speed depends only on the thread count used."""
    used = []
    for _ in range(steps):
        n = tuner.threads()
        used.append(n)
        tuner.record(rows, rows * seconds_per_row[n])
    return used


def test_starts_with_every_thread_and_keeps_them_when_they_are_faster() -> None:
    tuner = ThreadTuner(2, CONFIG)
    used = drive(tuner, {1: 0.02, 2: 0.01}, 100)
    assert used[0] == 2 and tuner.current == 2 and tuner.switches == 0
    assert 0 < used.count(1) <= 100 * 3 // 13 + 3  # only the probes ran on one thread


def test_drops_to_one_thread_when_a_neighbour_makes_two_slower() -> None:
    """A busy core makes two spinning threads several times slower than one."""
    tuner = ThreadTuner(2, CONFIG)
    drive(tuner, {1: 0.02, 2: 0.01}, 30)
    assert tuner.current == 2
    drive(tuner, {1: 0.02, 2: 0.08}, 30)  # the neighbour arrives
    assert tuner.current == 1
    drive(tuner, {1: 0.02, 2: 0.01}, 30)  # and leaves: the next probe goes back
    assert tuner.current == 2
    assert tuner.switches == 2


def test_a_small_difference_does_not_flip_the_count() -> None:
    tuner = ThreadTuner(2, CONFIG)
    drive(tuner, {1: 0.0105, 2: 0.011}, 200)  # one thread 5 % faster: within the margin
    assert tuner.current == 2 and tuner.switches == 0


def test_many_cores_climb_by_halving() -> None:
    tuner = ThreadTuner(16, CONFIG)
    # a machine where 4 threads is best: fewer lose parallelism, more lose to spinning
    speed = {1: 0.04, 2: 0.02, 4: 0.01, 8: 0.03, 16: 0.06}
    drive(tuner, speed, 200)
    assert tuner.current == 4


def test_one_thread_never_probes() -> None:
    tuner = ThreadTuner(1, CONFIG)
    assert set(drive(tuner, {1: 0.01}, 50)) == {1}


def test_empty_or_zero_samples_are_ignored() -> None:
    tuner = ThreadTuner(2, CONFIG)
    for _ in range(50):
        tuner.record(0, 0.1)
        tuner.record(4, 0.0)
    assert tuner.threads() == 2 and tuner.switches == 0


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError):
        TunerConfig(probe_every=0)


def test_a_probe_is_judged_against_steps_as_wide_as_its_own() -> None:
    """Two threads are faster at every width, but the probe at one thread lands on wide
    steps while the steps before it were narrow: rows per second over mixed widths said
    one thread was faster (a wide step makes more rows a second at any count)."""
    tuner = ThreadTuner(2, CONFIG)
    seconds = {1: {1: 0.010, 16: 0.080}, 2: {1: 0.006, 16: 0.050}}  # by threads, then rows

    def step(rows: int) -> None:
        tuner.record(rows, seconds[tuner.threads()][rows])

    for _ in range(3):
        step(16)  # the current count has seen wide steps too
    for _ in range(CONFIG.probe_every - 3):
        step(1)
    assert tuner.threads() == 1  # probing
    while tuner.threads() == 1:
        step(16)
    assert tuner.current == 2 and tuner.switches == 0
