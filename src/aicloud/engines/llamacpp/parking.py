"""Pausing a running sequence so that another takes its slot, and resuming it later.

Admission fills every slot (a tenant alone gets the whole engine), so a newcomer of a
tenant below its share may find none free: the engine then parks a sequence of a tenant
above its share. Its KV cells are copied to host memory (`llama_state_seq_get_data`) and
back into whichever slot is free when it resumes (`llama_state_seq_set_data`), byte for
byte: recomputing them as a prompt would run other kernels than the one-token steps that
made them, and change its text at temperature 0. SmolLM2 holds about 23 KB per token, so
a 200-token sequence parks in ~5 MB and a millisecond. Its sampler and grammar state stay
with the sequence, untouched.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import llama_cpp

from aicloud.engines.llamacpp.slots import Slot, SlotTable


@dataclass(slots=True, eq=False)
class ParkedCells:
    """A parked sequence's KV cells and the tokens at their positions."""

    data: ctypes.Array[ctypes.c_uint8]
    tokens: list[int]
    scope: str


def park(ctx: llama_cpp.llama_context_p, slots: SlotTable, slot: Slot,
         keep: int) -> ParkedCells | None:
    """Copy the slot's cells out and release it (keeping `keep` prompt tokens cached for
    prefix reuse, as a finished sequence does); None when llama.cpp cannot save them, and
    then the slot is untouched."""
    size = llama_cpp.llama_state_seq_get_size(ctx, slot.seq_id)
    if size <= 0:
        return None
    data = (ctypes.c_uint8 * size)()
    if llama_cpp.llama_state_seq_get_data(ctx, data, size, slot.seq_id) != size:
        return None
    cells = ParkedCells(data, list(slot.tokens), slot.scope)
    slots.release(slot, keep)
    return cells


def resume(ctx: llama_cpp.llama_context_p, slots: SlotTable, cells: ParkedCells) -> Slot | None:
    """Restore the cells into a free slot (one with the least cached, emptied first); None
    when llama.cpp refuses them (then the slot is left free)."""
    slot = slots.acquire_empty(cells.scope)
    read = llama_cpp.llama_state_seq_set_data(ctx, cells.data, len(cells.data), slot.seq_id)
    if read != len(cells.data):
        slots.release(slot, 0)
        return None
    slots.append(slot, cells.tokens)
    return slot
