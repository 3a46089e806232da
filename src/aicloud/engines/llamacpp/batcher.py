"""Continuous batching on one llama.cpp context, in the engine's own thread.

Each `step` decodes one token for up to `step_sequences` running sequences (in turns, by
the tenants' counters, then those served longest ago first) and, in the same
`llama_decode`, a chunk of the prompts still being prefilled, up to `batch_tokens` in all.
Admitted requests (the admission layer of `aicloud.scheduling` decides who is admitted)
take a slot at the next step, the least-served tenants' first; finished or cancelled ones
leave at once. A tenant alone may fill every slot; a newcomer of a tenant below its share
that finds none free takes one from a tenant above its share, whose sequence is parked
(`parking.py`); and which sequences decode in each step follows the tenants' counters too
(`turns.py`). Batch-class sequences yield to interactive ones at every step: while one of
those runs they sit the steps out (but for rows `ride_rows` lets ride along in its
decode steps, `_riders`; none by default), wait for a slot, and lend theirs (parked, or
back in line before their first token), so batch work uses only capacity left idle;
one slot stays free for an interactive newcomer while batch work fills the others
(`_reserve`); and a step of batch rows only is cut short when an interactive request
arrives (`preempt.py`: its decode stops between two graph nodes and its rows are computed
again later).

A step reads every weight once, so by default it decodes every running sequence (16 per
thread), in one run of KV streams (`SlotTable` keeps busy slots together); a newcomer
waits for the step in flight, and the step that makes its first token decodes only a
quarter as many others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable

import llama_cpp

from aicloud.engines.base import FinishReason, Priority, TokenEvent, TokenLogprobs
from aicloud.engines.llamacpp.constrain import Guidance
from aicloud.engines.llamacpp.logprobs import LogprobRow, log_softmax, token_logprobs
from aicloud.engines.llamacpp.model import LlamaModel
from aicloud.engines.llamacpp.parking import ParkedCells, park, resume
from aicloud.engines.llamacpp.preempt import ABORTED, AbortFlag
from aicloud.engines.llamacpp.sampling import build_sampler
from aicloud.engines.llamacpp.sequence import SeqState, Sequence
from aicloud.engines.llamacpp.slots import Slot, SlotTable
from aicloud.engines.llamacpp.threads import ThreadBudget, ThreadTuner
from aicloud.engines.llamacpp.turns import take_turns

log = logging.getLogger(__name__)

RESERVE_FROM = 16  # slots from which one is always kept for interactive requests
Delivery = tuple[Callable[[TokenEvent], None], TokenEvent]
PlanItem = tuple[Sequence, list[int], bool]
Outcome = tuple[Sequence, TokenEvent]
Sampled = tuple[Sequence, int, TokenLogprobs | None]


class RateMeter:
    """Tokens per second over a sliding window."""

    def __init__(self, window: float = 5.0) -> None:
        self._window = window
        self._marks: deque[tuple[float, int]] = deque()

    def add(self, n: int) -> None:
        now = time.monotonic()
        self._marks.append((now, n))
        while self._marks and self._marks[0][0] < now - self._window:
            self._marks.popleft()

    @property
    def rate(self) -> float:
        marks = list(self._marks)
        if not marks or time.monotonic() - marks[-1][0] > self._window:
            return 0.0
        span = max(time.monotonic() - marks[0][0], 1e-3)
        return sum(n for _, n in marks) / span


class Batcher:
    """Runs what it is given (`submit`): admission and its order are the admission
    layer's; the batcher decides only which of its sequences hold slots and decode."""

    def __init__(self, model: LlamaModel, budget: ThreadBudget | None = None) -> None:
        self.model = model
        self.budget = budget  # the process's decode threads, shared with other models
        self.config = model.config
        self.slots = SlotTable(model.memory, self.config.sequences or 1,
                               None if self.config.unified_kv else model.ctx)
        self.running: list[Sequence] = []  # in a slot
        self.pending: deque[Sequence] = deque()  # submitted, waiting for a slot
        self.parked: dict[Sequence, ParkedCells] = {}  # paused to lend their slot
        self.parks = 0  # sequences parked so far
        self.preempted = 0  # batch steps cut short for an interactive newcomer
        self.steps = 0
        self.meter = RateMeter()
        self.threads = ThreadTuner(self.config.threads or 1)
        self._threads_set = self.config.threads or 1
        self.guidance = Guidance(model.vocab, model.n_vocab, self.config.threads or 1)
        self._batch = llama_cpp.llama_batch_init(self.config.batch_tokens, 0, 1)
        self._abort = AbortFlag(model.ctx)
        self._abortable = False  # a decode of batch rows only is running
        self._newcomer = False  # an interactive sequence came since the last admission
        self._waiting_interactive = False  # one was left without a slot at the last one
        # a slot batch sequences leave free for an interactive newcomer, where the engine
        # holds more sequences than a step decodes (so the batch loses no rows by it) or
        # so many that one is a small share (a 32-slot engine's batch keeps 31)
        slots = len(self.slots.slots)
        self._reserve = int(slots >= RESERVE_FROM or slots > (self.config.step_sequences or 0))
        self._wake = threading.Condition()
        self._stopping = False
        self._chores: deque[Callable[[], None]] = deque()
        self._thread = threading.Thread(target=self._run, name="llamacpp-batcher", daemon=True)

    @property
    def waiting(self) -> int:
        """Submitted sequences without a slot: new ones and parked ones."""
        return len(self.pending) + len(self.parked)

    # -- called from the event loop -------------------------------------------------------

    def load(self) -> tuple[int, int]:
        """Running and waiting sequences at one moment: the engine thread moves a parked
        sequence from one to the other, and two unlocked reads straddling the move counted
        it in neither (an engine holding 4 sequences reported 3)."""
        with self._wake:
            return len(self.running), self.waiting

    def start(self) -> None:
        self._thread.start()

    def submit(self, seq: Sequence) -> None:
        """Start `seq` at the next step (the admission layer has admitted it)."""
        with self._wake:
            if self._stopping:
                raise RuntimeError("engine is shutting down")
            self.pending.append(seq)
            if not batch(seq):
                self._newcomer = True
                if self._abortable:
                    self._abort.raise_flag()
            self._wake.notify()

    def cancel(self, seq: Sequence) -> None:
        """A sequence not yet in a slot is dropped without running; a running or parked
        one ends at the next step."""
        with self._wake:
            if seq in self.pending:
                self.pending.remove(seq)
                seq.loop.call_soon_threadsafe(seq.on_event, seq.finish(FinishReason.CANCELLED))
                return
            seq.cancelled = True
            self._wake.notify()

    def between_steps(self, chore: Callable[[], None]) -> None:
        """Run `chore` on the engine thread between two steps. Work on another context of
        the same weights (embeddings) so never computes while a step does: two graphs at
        once would split the cores, whose workers spin at barriers (4-10x slower each,
        BRIEF section 6). One chore runs per step, so a flood of them only slows the step
        rate, and a chore should be about one step's work."""
        with self._wake:
            if self._stopping:
                raise RuntimeError("engine is shutting down")
            self._chores.append(chore)
            self._wake.notify()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()
        self._abort.close()
        self.guidance.close()
        llama_cpp.llama_batch_free(self._batch)

    # -- the engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self.running or self.waiting or self._chores):
                    self._wake.wait()
                if self._stopping:
                    break
                # cancelled sequences leave before admission, so their slots refill at once
                gone = self._end([s for s in self.running if s.cancelled],
                                 FinishReason.CANCELLED) + self._drop_parked(cancelled=True)
                gone += self._admit()
            self._deliver(gone)
            try:
                self.step()
            except Exception:  # a bug here must not leave clients hanging forever
                log.exception("decoding step failed; ending the running sequences")
                with self._wake:
                    failed = self._end(self.running, FinishReason.ERROR)
                self._deliver(failed)
            self._run_chore()
        self._drain()

    def _run_chore(self) -> None:
        with self._wake:
            chore = self._chores.popleft() if self._chores else None
        if chore is None:
            return
        if self.budget is None:
            _safely(chore)
            return
        with self.budget.held(self.config.threads or 1, exact=True):  # its own context's
            _safely(chore)

    def _admit(self) -> list[Outcome]:
        """Give free slots to waiting sequences, interactive ones first, then the
        least-served tenant's first (a parked one before a newcomer of the same standing);
        with no slot free, an interactive newcomer takes a batch sequence's slot, and one
        of a tenant below its share takes one from a tenant above it. While an interactive
        sequence runs, batch ones wait without a slot (they would not decode anyway, and
        the slot stays free for the next interactive one), and they never take the
        reserved slot (`_reserve`): an interactive newcomer then starts without parking
        anyone, and that idle slot keeps its prompt cached for the next one (a slot of a
        batch's project is emptied for it: measured, 6 and 10 of 37 interactive prompts
        beside a batch were prefilled whole, 42 tokens instead of 8). One that finds no
        room does not hold up the others. Returns the sequences that could not be resumed
        (the lock is held)."""
        failed: list[Outcome] = []
        self._newcomer = False
        yielding = self._yielding()
        for seq in self._by_standing():
            if batch(seq) and yielding:
                continue
            free = self.slots.free - (self._reserve if batch(seq) else 0)
            if free <= 0 and not self._make_room(seq):
                continue
            if seq in self.parked:
                failed += self._resume(seq)
            else:
                self._place(seq)
            yielding = yielding or not batch(seq)
        self._waiting_interactive = any(not batch(s) for s in self.pending)
        return failed

    def _yielding(self) -> bool:
        """Whether batch sequences yield: an interactive one is running."""
        return any(not batch(s) for s in self.running)

    def _by_standing(self) -> list[Sequence]:
        waiting = [*self.parked, *self.pending]
        shares = waiting[0].request.shares if waiting else None
        if shares is None:
            return sorted(waiting, key=lambda s: s.request.priority)
        return sorted(waiting, key=lambda s: (s.request.priority,
                                              shares.standing(s.request.tenant)))

    def _place(self, seq: Sequence) -> None:
        self.pending.remove(seq)
        slot, reuse = self.slots.acquire(seq.prompt, seq.request.cache_scope)
        # placed again after lending its slot mid-prompt (`_unplace`): what it computed
        # itself the first time is not counted as cached
        placed_before = seq.slot >= 0
        seq.slot, seq.n_past = slot.seq_id, reuse
        seq.cached_tokens = min(reuse, seq.cached_tokens) if placed_before else reuse
        seq.sampler = build_sampler(seq.request.sampling, self.model.n_vocab,
                                    seq.request.logit_bias)
        seq.state = SeqState.PREFILL
        self.running.append(seq)

    def _make_room(self, seq: Sequence) -> bool:
        """Free a slot for `seq`: an interactive one takes a batch sequence's (whatever
        the tenants' shares), else a sequence of its own class or lower is parked by the
        tenants' shares (`_share_victim`)."""
        if not batch(seq) and self._lend_batch_slot():
            return True
        victim = self._share_victim(seq)
        return victim is not None and self._park(victim)

    def _lend_batch_slot(self) -> bool:
        """A batch sequence still in its prompt goes back to the line (its computed prefix
        stays cached in the slot it leaves); else the shortest decoding one is parked."""
        lenders = [s for s in self.running if batch(s) and not s.cancelled]
        for seq in lenders:
            if seq.state is SeqState.PREFILL:
                self._unplace(seq)
                return True
        decoding = sorted((s for s in lenders if s.state is SeqState.DECODE),
                          key=lambda s: len(self._slot(s).tokens))
        return any(self._park(s) for s in decoding[:1])

    def _share_victim(self, seq: Sequence) -> Sequence | None:
        """A decoding sequence of the tenant holding the most slots per weight, if it would
        still hold at least as many per weight as `seq`'s tenant once `seq` has its slot
        (so two tenants never trade a slot back and forth); its shortest, the least to
        copy; never one of a higher class than `seq`. Only with the admission layer's
        shares: it is what hands over more sequences than slots, for tenants a whole slot
        below their share."""
        if seq.request.shares is None:
            return None
        tenant = seq.request.tenant
        held = Counter(s.request.tenant for s in self.running)
        after = (held[tenant] + 1) / seq.request.weight

        def per_weight(s: Sequence) -> float:
            return held[s.request.tenant] / s.request.weight

        victims = [s for s in self.running if s.state is SeqState.DECODE and not s.cancelled
                   and s.request.tenant != tenant
                   and s.request.priority >= seq.request.priority
                   and (held[s.request.tenant] - 1) / s.request.weight >= after]
        if not victims:
            return None
        return min(victims, key=lambda s: (-per_weight(s), len(self._slot(s).tokens)))

    def _park(self, victim: Sequence) -> bool:
        cells = park(self.model.ctx, self.slots, self._slot(victim),
                     keep=min(victim.n_past, len(victim.prompt)))
        if cells is None:
            log.warning("could not park a sequence; the newcomer waits for a free slot")
            return False
        self.running.remove(victim)
        self.parked[victim] = cells
        self.parks += 1
        return True

    def _unplace(self, seq: Sequence) -> None:
        """Back to the head of the line, before its first token: nothing to copy out."""
        self.running.remove(seq)
        self.slots.release(self._slot(seq), keep=seq.n_past)
        self._free_sampler(seq)
        seq.state, seq.n_past = SeqState.WAITING, 0
        self.pending.appendleft(seq)
        self.parks += 1

    def _resume(self, seq: Sequence) -> list[Outcome]:
        slot = resume(self.model.ctx, self.slots, self.parked.pop(seq))
        if slot is None:
            log.error("could not restore a parked sequence's cells; ending it")
            self._free_sampler(seq)
            return [(seq, seq.finish(FinishReason.ERROR))]
        seq.slot = slot.seq_id
        self.running.append(seq)
        return []

    def _drop_parked(self, *, cancelled: bool = False) -> list[Outcome]:
        """End parked sequences (the cancelled ones, or all when stopping)."""
        out = []
        for seq in [s for s in self.parked if s.cancelled or not cancelled]:
            del self.parked[seq]
            self._free_sampler(seq)
            out.append((seq, seq.finish(FinishReason.CANCELLED if cancelled
                                        else FinishReason.ERROR)))
        return out

    def step(self) -> None:
        """Decode without the lock (the event loop may submit meanwhile); the bookkeeping
        for what the step produced happens under it."""
        calls = self._plan()
        if calls:
            self._deliver(self._decode(calls))

    def _plan(self) -> list[list[PlanItem]]:
        """Decoding sequences get their next token in turns (`take_turns`: by the tenants'
        counters, then those advanced longest ago first); prompts fill
        what is left of the batch. A step that ends a prompt (and so makes its first token)
        decodes only a quarter as many others, so that first token is not held up by a full
        step; the ones left out go first next step.

        Returns the step as `llama_decode` calls: one on a unified cache. With per-sequence
        KV streams llama.cpp would split a mixed batch itself, in shapes that depend on the
        load (a prompt's first token decoded with the next tokens of other sequences, its
        rest alone): rows of one token and rows of several take different CPU kernels
        (vec_dot vs tinyBLAS for attention), so the decodes share one call and each prompt
        chunk gets its own, and every row is computed as it would be with the request
        alone.

        While an interactive sequence runs, batch ones sit the step out: every row makes a
        CPU step longer, so they would slow every interactive token (issue 16); but for
        those `ride_rows` lets ride its decode rows (`_riders`)."""
        runnable = self._runnable()
        width = self.config.step_sequences or len(runnable)
        decoding = [s for s in runnable if s.state is SeqState.DECODE]
        budget = self.config.batch_tokens - min(width, len(decoding))
        prompts: list[PlanItem] = []
        for seq in runnable:
            if seq.state is SeqState.PREFILL and (n := prompt_chunk(seq.prompt_left, budget)):
                prompts.append((seq, seq.prompt[seq.n_past : seq.n_past + n],
                                n == seq.prompt_left))
                budget -= n
        if any(ends for _, _, ends in prompts):
            width = max(1, width // 4)
        decoding = take_turns(decoding, width, decoding[0].request.shares if decoding else None,
                              lambda s: s.request.tenant, lambda s: s.last_step,
                              lambda s: s.slot)
        self.steps += 1
        # in stream order: with per-sequence streams llama.cpp puts only consecutive
        # sequence ids, in batch order, into one ubatch (`split_equal(sequential)`), so rows
        # in another order were split into several graph computations, each reading every
        # weight again
        decodes: list[PlanItem] = [(seq, [seq.last_token], True)
                                   for seq in sorted(decoding, key=lambda s: s.slot)]
        if self.config.unified_kv:
            return [decodes + prompts] if decodes or prompts else []
        return ([decodes] if decodes else []) + prompt_calls(prompts)

    def _runnable(self) -> list[Sequence]:
        """The running sequences this step may advance: the interactive ones if any (and
        the batch rows riding their decode, `_riders`)."""
        interactive = [s for s in self.running if not batch(s)]
        return interactive + self._riders(interactive) if interactive else self.running

    def _riders(self, interactive: list[Sequence]) -> list[Sequence]:
        """Decoding batch sequences that ride along in a step of interactive decodes, up
        to `ride_rows` rows in all, those advanced longest ago first. A CPU step of one row
        leaves much of what the cores could compute unused (session 9, loaded machine: a
        second row added 3-50 % to a step, 8 rows took 2.1x one row), and while
        interactive traffic runs the batch got nothing else (capacity used: 83 % of idle,
        session 8). Never while an interactive prompt waits for its first token (one in its
        prefill, or handed over and not yet placed): that step stays the newcomer's alone,
        so riders cost no TTFT; they only make interactive decode steps a little longer.
        Prompt chunks never ride: each is a call of its own, as long as several steps."""
        room = min(self.config.ride_rows, self.config.step_sequences or self.config.ride_rows)
        room -= len(interactive)
        if (room <= 0 or self._newcomer or self._waiting_interactive
                or any(s.state is not SeqState.DECODE for s in interactive)):
            return []
        riders = [s for s in self.running if batch(s) and s.state is SeqState.DECODE
                  and not s.cancelled]
        return sorted(riders, key=lambda s: s.last_step)[:room]

    def _decode(self, groups: list[list[PlanItem]]) -> list[Outcome]:
        out: list[Outcome] = []
        for k, group in enumerate(groups):
            outputs = self._fill(group)
            # masks not already coming (a sequence's first) are computed during this decode
            self.guidance.prefetch([seq.guide for seq, _ in outputs if seq.guide is not None])
            status = self._decode_group(group)
            if status == ABORTED:  # the rest of the step waits: a newcomer goes first
                self.preempted += 1
                for seq, _, _ in group:  # llama.cpp removed the cells it had added
                    self.slots.truncate(self._slot(seq), len(self._slot(seq).tokens))
                return out
            if status != 0:
                log.error("llama_decode failed with status %d", status)
                with self._wake:
                    return out + self._end([s for g in groups[k:] for s, _, _ in g],
                                           FinishReason.ERROR)
            for seq, tokens, _ in group:
                seq.last_step = self.steps
                self.slots.append(self._slot(seq), tokens)
                if seq.state is SeqState.PREFILL:
                    seq.n_past += len(tokens)
            # logprobs read from the raw row, then the grammar's mask, then the sampler
            # chain: all before the next llama_decode overwrites the logits
            rows = [(seq, index, self._logprob_row(seq, index)) for seq, index in outputs]
            self.guidance.mask(self.model.ctx, [(seq.guide, index) for seq, index in outputs
                                                if seq.guide is not None])
            sampled = [self._sample(seq, index, row) for seq, index, row in rows]
            with self._wake:
                out += [self._account(*item) for item in sampled]
            # each guide has consumed its token: its next mask is computed while the next
            # decode runs (it depends on nothing else)
            self.guidance.prefetch([seq.guide for seq, _, _ in sampled if seq.guide is not None
                                    and seq.state is not SeqState.FINISHED])
        return out

    def _decode_group(self, group: list[PlanItem]) -> int:
        """One `llama_decode` of `group` (retried once with idle caches dropped when the
        cache is full). A group of batch rows only is preempted by an interactive request
        handed over since the last admission: not started if one already is (ABORTED, as
        if stopped at once), stopped between two graph nodes if one comes meanwhile. Then
        the step ends and the newcomer is placed: it waits for one graph node, not for
        the step's remaining prompt chunks and rows (issue 16)."""
        preemptible = all(batch(seq) for seq, _, _ in group)
        if preemptible and not self._arm_abort():
            return ABORTED
        try:
            status = self._llama_decode(all(len(tokens) == 1 for _, tokens, _ in group),
                                        len(group))
            if status == 1 and self.slots.drop_idle_caches():
                status = self._llama_decode(measured=False, rows=len(group))
        finally:
            if preemptible:  # every other decode runs with the flag down
                with self._wake:
                    self._abortable = False
                    self._abort.clear()
        return status

    def _arm_abort(self) -> bool:
        """Let `submit` stop the next decode, unless a newcomer already waits."""
        with self._wake:
            if self._newcomer:
                return False
            self._abort.clear()
            self._abortable = True
            return True

    def _llama_decode(self, measured: bool, rows: int = 1) -> int:
        """One llama_decode with the tuner's thread count, or fewer if the shared budget
        has fewer free. Only calls of next tokens are timed for it: a prompt chunk is other
        work, its speed would not compare."""
        wanted = self.threads.threads() if self.config.adapt_threads else (
            self.config.threads or 1)
        n = self.budget.take(wanted, rows=rows) if self.budget is not None else wanted
        try:
            if n != self._threads_set:
                llama_cpp.llama_set_n_threads(self.model.ctx, n, n)
                self._threads_set = n
            start = time.perf_counter()
            status: int = llama_cpp.llama_decode(self.model.ctx, self._batch)
        finally:
            if self.budget is not None:
                self.budget.give(n)
        # a decode short of threads (other models held some) says nothing about the count
        if measured and status == 0 and n == wanted:
            self.threads.record(self._batch.n_tokens, time.perf_counter() - start)
        return status

    def _sample(self, seq: Sequence, index: int, row: LogprobRow | None) -> Sampled:
        assert seq.sampler is not None  # placed sequences have one
        token = seq.sampler.sample(self.model.ctx, index)
        if row is None:
            return seq, token, None
        return seq, token, token_logprobs(row, token, seq.top_logprobs or 0, self.model.piece)

    def _logprob_row(self, seq: Sequence, index: int) -> LogprobRow | None:
        """The raw distribution, read before anything writes into the logits row; only
        for sequences that asked for logprobs."""
        if seq.top_logprobs is None:
            return None
        return log_softmax(self.model.ctx, index, self.model.n_vocab)

    def _fill(self, plan: list[PlanItem]) -> list[tuple[Sequence, int]]:
        batch, i = self._batch, 0
        outputs: list[tuple[Sequence, int]] = []
        for seq, tokens, wants_logits in plan:
            start = len(self._slot(seq).tokens)
            for j, token in enumerate(tokens):
                batch.token[i] = token
                batch.pos[i] = start + j
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq.slot
                batch.logits[i] = 0
                i += 1
            if wants_logits:
                batch.logits[i - 1] = 1
                outputs.append((seq, i - 1))
        batch.n_tokens = i
        return outputs

    def _account(self, seq: Sequence, token: int,
                 logprobs: TokenLogprobs | None = None) -> Outcome:
        """Charge the tenant for one sampled token and retire a finished sequence."""
        seq.state = SeqState.DECODE
        event = seq.on_token(token, self.model.piece(token), self.model.is_eog(token),
                             logprobs)
        self.meter.add(1)
        if event.finish_reason is not None:
            self._retire(seq, event)
        return seq, event

    def _slot(self, seq: Sequence) -> Slot:
        return self.slots.slots[seq.slot]

    def _end(self, seqs: list[Sequence], reason: FinishReason) -> list[Outcome]:
        """Finish and retire `seqs` (the lock is held); iterates a copy, as retiring edits
        `running`."""
        return [(s, self._retire(s, s.finish(reason))) for s in list(seqs)]

    def _retire(self, seq: Sequence, event: TokenEvent) -> TokenEvent:
        """Free the sequence's slot, keeping only its prompt for later prefix reuse."""
        self.running.remove(seq)
        self.slots.release(self._slot(seq), keep=min(seq.n_past, len(seq.prompt)))
        self._free_sampler(seq)
        return event

    @staticmethod
    def _free_sampler(seq: Sequence) -> None:
        if seq.sampler is not None:
            seq.sampler.close()
        seq.sampler = None

    @staticmethod
    def _deliver(out: list[Outcome]) -> None:
        """One wake-up per event loop per step, not one per token."""
        by_loop: dict[asyncio.AbstractEventLoop, list[Delivery]] = {}
        for seq, event in out:
            by_loop.setdefault(seq.loop, []).append((seq.on_event, event))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop has nobody listening
                loop.call_soon_threadsafe(_run_all, items)

    def _drain(self) -> None:
        with self._wake:
            waiting = [(seq, seq.finish(FinishReason.ERROR)) for seq in self.pending]
            self.pending.clear()
            running = self._end(self.running, FinishReason.ERROR) + self._drop_parked()
            chores = list(self._chores)
            self._chores.clear()
        self._deliver(waiting + running)
        for chore in chores:  # each is short, and its caller is waiting for the answer
            _safely(chore)


def batch(seq: Sequence) -> bool:
    """Of the batch class: it yields steps and slots to interactive sequences."""
    return seq.request.priority >= Priority.BATCH


def prompt_calls(prompts: list[PlanItem]) -> list[list[PlanItem]]:
    """Prompt chunks as `llama_decode` calls: chunks of one length in neighbouring slots
    share a call, which llama.cpp computes as one ubatch (with a stream per sequence it
    takes equal rows from consecutive sequence ids); others get a call each. Requests that
    arrive together with one system prompt leave two tokens each to compute: 32 of them
    took 32 graphs, each a pass over every weight, before the first token."""
    calls: list[list[PlanItem]] = []
    for item in sorted(prompts, key=lambda p: p[0].slot):
        last = calls[-1][-1] if calls else None
        if last is not None and len(last[1]) == len(item[1]) and last[0].slot + 1 == item[0].slot:
            calls[-1].append(item)
        else:
            calls.append([item])
    return calls


def prompt_chunk(left: int, budget: int) -> int:
    """How many of a prompt's `left` tokens to prefill now: all that fit, but never a piece
    of one token of a longer prompt (nor leave one), since llama.cpp computes a lone row with
    other kernels than several, and the KV cells would depend on how busy the step was."""
    if left <= budget:
        return left
    n = min(budget, left - 2)
    return n if n >= 2 else 0


def _safely(chore: Callable[[], None]) -> None:
    try:
        chore()
    except Exception:  # a chore reports its own failures; this is a bug in one
        log.exception("a chore between steps failed")


def _run_all(items: list[Delivery]) -> None:
    for callback, event in items:
        callback(event)
