"""Which idle slot a new sequence takes: busy slots stay one run of sequence ids (llama.cpp
computes only consecutive sequence ids as one ubatch), without losing prefix reuse."""

from __future__ import annotations

from typing import cast

import llama_cpp
import pytest

from aicloud.engines.llamacpp.slots import SlotTable

PROMPTS = [[1, 2, 3, 10 + k, 20 + k, 30 + k] for k in range(4)]


@pytest.fixture
def table(monkeypatch: pytest.MonkeyPatch) -> SlotTable:
    """The bookkeeping alone: llama.cpp's cache calls do nothing here."""
    monkeypatch.setattr(llama_cpp, "llama_memory_seq_rm", lambda *_: True)
    monkeypatch.setattr(llama_cpp, "llama_memory_seq_cp", lambda *_: None)
    table = SlotTable(cast(llama_cpp.llama_memory_t, None), len(PROMPTS))
    for prompt in PROMPTS:  # slot k caches prompt k
        slot, reuse = table.acquire(prompt)
        table.append(slot, prompt[reuse:])
    for slot in table.slots:
        table.release(slot, keep=len(slot.tokens))
    assert [s.tokens for s in table.slots] == PROMPTS
    return table


def test_a_newcomer_takes_the_hole_and_copies_its_prefix_there(table: SlotTable) -> None:
    """Slots 0-2 run and 1 finishes; a newcomer whose prompt slot 3 caches takes slot 1
    (with the prefix copied over), not slot 3, which would leave 0, 2, 3: two graphs a step."""
    running = [table.acquire(PROMPTS[k])[0] for k in range(3)]
    assert [s.seq_id for s in running] == [0, 1, 2]
    table.release(running[1], keep=len(PROMPTS[1]))
    slot, reuse = table.acquire(PROMPTS[3])
    assert slot.seq_id == 1
    assert reuse == len(PROMPTS[3]) - 2  # still cached: two tokens are always computed
    assert slot.tokens == PROMPTS[3][:reuse]


def test_with_no_hole_a_newcomer_takes_a_neighbour_of_the_run(table: SlotTable) -> None:
    table.acquire(PROMPTS[1])
    table.acquire(PROMPTS[2])  # slots 1 and 2 run
    slot, _ = table.acquire([9, 9, 9, 9])
    assert slot.seq_id in (0, 3)


def test_alone_a_request_takes_the_slot_caching_its_prompt(table: SlotTable) -> None:
    """Nothing runs: no run to keep together, so no cached prompt is given up for one."""
    slot, reuse = table.acquire(PROMPTS[2])
    assert slot.seq_id == 2 and reuse == len(PROMPTS[2]) - 2
