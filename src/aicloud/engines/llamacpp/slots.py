"""KV-cache slots: which tokens each sequence id holds, and prompt-prefix reuse.

Each slot is a llama.cpp sequence id, with its own KV stream by default (one unified cache
when `ContextConfig.unified_kv`). An idle slot keeps the prompt of its last request (never
the generated tokens, which are freed at once), so a later request with the same system
prompt starts from there. A prefix held by any slot, busy or idle, can be shared into
another slot: in a unified cache `llama_memory_seq_cp` adds the sequence id to the same
cells, across streams its cells are copied (`_copy_cells`); either way, no prefill.

Reuse never crosses an isolation scope (`GenerationRequest.cache_scope`: a project, key or
organization, maybe salted): a slot remembers whose prompt it holds, a prefix is shared
only from a slot of the same scope, and an idle slot holding another scope's prompt is
simply emptied. So a tenant learns nothing about another's prompts, neither from
`cached_tokens` nor from how fast its first token comes.
"""

from __future__ import annotations

import ctypes
import itertools
from dataclasses import dataclass, field

import llama_cpp


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass(slots=True, eq=False)
class Slot:
    seq_id: int
    busy: bool = False
    scope: str = ""  # whose prompt the cells hold (the cache scope of the last request)
    tokens: list[int] = field(default_factory=list)  # token at each KV position
    cells: list[int] = field(default_factory=list)  # identity of the cell at each position


class SlotTable:
    def __init__(self, memory: llama_cpp.llama_memory_t, count: int,
                 ctx: llama_cpp.llama_context_p | None = None) -> None:
        """`ctx`: given when each slot has its own KV stream, so prefixes are copied cell
        by cell rather than as whole streams."""
        self._memory = memory
        self._ctx = ctx
        self.slots = [Slot(i) for i in range(count)]
        self._cell_ids = itertools.count()

    @property
    def free(self) -> int:
        return sum(not s.busy for s in self.slots)

    @property
    def cells_used(self) -> int:
        return len(set().union(*(s.cells for s in self.slots)))

    def acquire(self, prompt: list[int], scope: str = "") -> tuple[Slot, int]:
        """Take an idle slot next to the busy ones (`_idle_by_place`), of those the one that
        best matches `prompt` within `scope`, with a longer prefix that another slot of
        `scope` holds copied into it (`_share`); return it and how many prompt tokens are
        already in its cache. At least two prompt tokens are left to decode (one for the
        logits sampling needs; two because llama.cpp computes a lone row with other
        kernels, so a fully cached prompt would not give the text it gives cold). A slot
        of another scope matches nothing, so it is only ever emptied."""
        def match(s: Slot) -> int:
            return common_prefix(s.tokens, prompt) if s.scope == scope else 0

        slot = max(self._idle_by_place(), key=lambda s: (match(s), -len(s.tokens)))
        source = max(self.slots, key=match)
        reuse = max(0, min(match(source), len(prompt) - 2))
        if reuse > match(slot):
            self._share(source, slot, reuse)
        else:
            self.truncate(slot, reuse)  # 0 for a slot of another scope
        slot.busy, slot.scope = True, scope
        return slot, reuse

    def acquire_empty(self, scope: str) -> Slot:
        """An idle slot next to the busy ones (of those the one caching least), emptied of
        its cache, for cells restored from elsewhere (a parked sequence)."""
        slot = min(self._idle_by_place(), key=lambda s: len(s.tokens))
        self.truncate(slot, 0)
        slot.busy, slot.scope = True, scope
        return slot

    def _idle_by_place(self) -> list[Slot]:
        """Idle slots, those that keep the busy ones in one run of sequence ids first: a
        hole between busy slots, then a neighbour of the run. llama.cpp puts into one
        ubatch only rows whose sequence ids follow each other (`split_equal(sequential)`
        with a KV stream per sequence), so a step over slots 0, 1, 2, 4, 5 costs two passes
        over every weight instead of one. With nothing busy, or no slot next to the run,
        any idle slot serves (the caller picks by what it caches)."""
        busy = [s.seq_id for s in self.slots if s.busy]
        idle = [s for s in self.slots if not s.busy]
        if not busy:
            return idle
        low, high = min(busy), max(busy)
        holes = [s for s in idle if low < s.seq_id < high]
        edges = [s for s in idle if s.seq_id in (low - 1, high + 1)]
        return holes or edges or idle

    def _share(self, source: Slot, slot: Slot, n: int) -> None:
        llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
        if not (self._ctx is not None and self._copy_cells(source, slot)):
            # the form every KV layout supports: across streams it copies whole streams
            # (all of their cells, used or not: 47 MB per SmolLM2 slot of 2,048 tokens)
            llama_cpp.llama_memory_seq_cp(self._memory, source.seq_id, slot.seq_id, -1, -1)
        llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, n, -1)
        slot.tokens = source.tokens[:n]
        slot.cells = source.cells[:n]

    def _copy_cells(self, source: Slot, slot: Slot) -> bool:
        """Copy only `source`'s own cells, byte for byte, as parking does (a 30-token
        prompt is 0.7 MB): 32 requests arriving at once with one system prompt spent
        ~0.3 s copying whole streams before their first tokens."""
        size = llama_cpp.llama_state_seq_get_size(self._ctx, source.seq_id)
        if size <= 0:
            return False
        data = (ctypes.c_uint8 * size)()
        if llama_cpp.llama_state_seq_get_data(self._ctx, data, size, source.seq_id) != size:
            return False
        if llama_cpp.llama_state_seq_set_data(self._ctx, data, size, slot.seq_id) == size:
            return True
        llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
        return False

    def truncate(self, slot: Slot, n: int) -> None:
        """Free every cell of `slot` at position `n` and beyond (including cells a failed
        decode may have left past what we recorded)."""
        llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, n, -1)
        del slot.tokens[n:]
        del slot.cells[n:]

    def append(self, slot: Slot, tokens: list[int]) -> None:
        slot.tokens.extend(tokens)
        slot.cells.extend(itertools.islice(self._cell_ids, len(tokens)))

    def release(self, slot: Slot, keep: int) -> None:
        self.truncate(slot, keep)
        slot.busy = False

    def drop_idle_caches(self) -> int:
        """Free what idle slots keep; used when llama.cpp finds no room for a batch."""
        freed = 0
        for slot in self.slots:
            if not slot.busy and slot.tokens:
                freed += len(slot.tokens)
                self.truncate(slot, 0)
        return freed
