"""One budget of decode threads for every loaded model: the sum in use never exceeds it,
and waiting decoders take turns by the sequences each decode advances."""

from __future__ import annotations

import threading
import time

from aicloud.engines.llamacpp.threads import ThreadBudget


def test_models_decoding_at_once_never_use_more_threads_than_the_budget() -> None:
    budget = ThreadBudget(2)
    in_use, most, lock = [0], [0], threading.Lock()

    def decoder() -> None:
        for _ in range(50):
            with budget.held(2) as got:
                assert 1 <= got <= 2
                with lock:
                    in_use[0] += got
                    most[0] = max(most[0], in_use[0])
                time.sleep(0.0005)
                with lock:
                    in_use[0] -= got

    threads = [threading.Thread(target=decoder) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert most[0] == 2 and budget.free == 2


def test_a_decode_gets_what_is_free_and_an_exact_one_waits_for_all() -> None:
    budget = ThreadBudget(4)
    assert budget.take(3) == 3
    assert budget.take(4) == 1  # only one free: a decode runs on fewer rather than wait
    got: list[int] = []
    waiter = threading.Thread(target=lambda: got.append(budget.take(2, exact=True)))
    waiter.start()
    time.sleep(0.05)
    budget.give(1)  # one free: not enough for the exact taker
    time.sleep(0.05)
    assert got == []
    budget.give(3)
    waiter.join(5)
    assert got == [2] and budget.free == 2


def test_turns_go_by_rows_so_a_model_decoding_four_sequences_gets_four_turns_to_one() -> None:
    """In arrival order the two alternated: the hot model of a heavy-tailed load got one
    step in three beside two others while it held most of the requests."""
    budget = ThreadBudget(1)
    order: list[str] = []
    budget.take(1)  # held while both decoders join the line

    def decoder(name: str, rows: int, steps: int) -> None:
        for _ in range(steps):
            got = budget.take(1, rows=rows)
            order.append(name)
            budget.give(got)

    threads = [threading.Thread(target=decoder, args=("wide", 4, 16)),
               threading.Thread(target=decoder, args=("narrow", 1, 4))]
    for t in threads:
        t.start()
    time.sleep(0.1)
    budget.give(1)
    for t in threads:
        t.join(10)
    assert len(order) == 20 and budget.free == 1
    assert order[:10].count("wide") >= 7  # 8 by the rule, 5 in arrival order

