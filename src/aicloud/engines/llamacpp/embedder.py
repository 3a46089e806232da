"""Embeddings on the loaded weights: a second llama.cpp context with embeddings on.

The context shares the model (no second copy of the weights) and its decodes run on the
batcher's thread between generation steps (`Batcher.between_steps`), so the two never
compute at the same time on the same cores. Inputs of all waiting requests are packed
together: one sequence id per input, several inputs per `llama_decode`, each input whole
inside one decode (pooling reads all of a sequence's rows at once), up to about the
tokens of one generation step per decode, so a flood of embeddings delays a token stream
by about one prompt chunk per step, not by the whole flood.

Batch identity: an input gets the same vector alone and packed with others (to ~6e-8,
last-bit noise) only if its rows start at a multiple of `ALIGN` in the decode. Packed at
other offsets, vectors of SmolLM2-135M moved by up to 9e-4 (max abs, unit vectors): the
attention sums over the KV cells run in SIMD lanes, and where a sequence's cells fall
among the lanes changes their order. Offsets that are multiples of 8 (AVX2's f32 lanes)
measured identical over 6 random packings of 16 inputs, multiples of 4 did not; 16 covers
AVX-512's lanes too. The gaps are filled with tokens of filler sequences (one per gap: a
single filler sequence spread over several gaps trips a llama.cpp assertion) that every
input's attention masks out; for inputs of ~10 tokens they cost ~40 % of the rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import llama_cpp
import numpy as np

from aicloud.engines.base import EngineError
from aicloud.engines.llamacpp.model import LlamaModel

log = logging.getLogger(__name__)

# Sequences per decode: the context's n_seq_max. With one unified KV cache the memory is
# n_ctx cells whatever this is; llama.cpp allows up to 256.
MAX_SEQUENCES = 64
ALIGN = 16
FILLER_TOKEN = 0  # the gap before input k is sequence MAX_SEQUENCES + k, never read back


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def pooling_of(model: LlamaModel) -> int | None:
    """The pooling the model declares; mean for decoder models that declare none (or
    "none": one vector per token is not an embedding); None for rerankers (rank pooling)."""
    arch = model.metadata("general.architecture")
    declared = model.metadata(f"{arch}.pooling_type") if arch else None
    try:
        pooling = int(declared) if declared is not None else llama_cpp.LLAMA_POOLING_TYPE_NONE
    except ValueError:
        pooling = llama_cpp.LLAMA_POOLING_TYPE_NONE
    if pooling == llama_cpp.LLAMA_POOLING_TYPE_RANK:
        return None
    if pooling <= llama_cpp.LLAMA_POOLING_TYPE_NONE:
        return llama_cpp.LLAMA_POOLING_TYPE_MEAN
    return pooling


@dataclass(slots=True, eq=False)
class EmbeddingJob:
    """One request's inputs; resolved on its loop once every vector is in."""

    inputs: list[list[int]]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[list[float]]]
    vectors: list[list[float] | None] = field(default_factory=list)
    left: int = 0
    failed: bool = False

    def __post_init__(self) -> None:
        self.vectors = [None] * len(self.inputs)
        self.left = len(self.inputs)

    def put(self, index: int, vector: list[float]) -> None:
        self.vectors[index] = vector
        self.left -= 1
        if self.left == 0 and not self.failed:
            done = [v for v in self.vectors if v is not None]
            self._settle(lambda: self.future.set_result(done))

    def fail(self, error: Exception) -> None:
        if not self.failed:
            self.failed = True
            self._settle(lambda: self.future.set_exception(error))

    def _settle(self, action: Callable[[], None]) -> None:
        def run() -> None:
            if not self.future.done():  # the caller may have been cancelled meanwhile
                action()

        with contextlib.suppress(RuntimeError):  # a closed loop has nobody listening
            self.loop.call_soon_threadsafe(run)


Item = tuple[EmbeddingJob, int]


class Embedder:
    """Owns the embedding context; `submit` from the event loop, decodes on the batcher's
    thread through `schedule` (`Batcher.between_steps`)."""

    def __init__(self, model: LlamaModel, pooling: int, window: int, threads: int,
                 step_tokens: int, schedule: Callable[[Callable[[], None]], None]) -> None:
        self.model = model
        self.pooling = pooling
        self.window = window
        self.step_tokens = max(step_tokens, 1)
        self.n_embd = llama_cpp.llama_model_n_embd(model.model)
        self._schedule = schedule
        self._ctx = self._new_context(threads)
        self._batch = llama_cpp.llama_batch_init(window, 0, 1)
        self._pending: deque[Item] = deque()
        self._lock = threading.Lock()
        self._scheduled = False
        self._closed = False

    def _new_context(self, threads: int) -> llama_cpp.llama_context_p:
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = self.window
        cparams.n_batch = self.window  # a whole input in one ubatch, as pooling needs
        cparams.n_ubatch = self.window
        cparams.n_seq_max = 2 * MAX_SEQUENCES  # inputs and the gaps between them
        cparams.kv_unified = True  # the inputs of a decode share the window's cells
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.embeddings = True
        cparams.pooling_type = self.pooling
        cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cparams.no_perf = True
        ctx: llama_cpp.llama_context_p = llama_cpp.llama_init_from_model(self.model.model,
                                                                         cparams)
        if not ctx:
            raise EngineError("llama.cpp could not create the embedding context "
                              "(out of memory?)")
        return ctx

    # -- the event loop -------------------------------------------------------------------

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        loop = asyncio.get_running_loop()
        job = EmbeddingJob(inputs, loop, loop.create_future())
        with self._lock:
            self._pending.extend((job, i) for i in range(len(inputs)))
            wake, self._scheduled = not self._scheduled, True
        if wake:
            self._wake()
        return await job.future

    def _wake(self) -> None:
        try:
            self._schedule(self._work)
        except RuntimeError as exc:  # shutting down: nobody will decode them
            with self._lock:
                items, self._scheduled = list(self._pending), False
                self._pending.clear()
            for job, _ in items:
                job.fail(EngineError(str(exc)))

    # -- the engine thread ------------------------------------------------------------------

    def _work(self) -> None:
        """One decode of what fits, then back in line if more waits."""
        with self._lock:
            items = self._take()
        try:
            self._decode(items)
        except Exception as exc:
            log.exception("embedding decode failed")
            for job, _ in items:
                job.fail(EngineError(f"the engine failed while embedding: {exc}"))
        with self._lock:
            again = self._scheduled = bool(self._pending)
        if again:
            self._wake()

    def _take(self) -> list[Item]:
        """Inputs in arrival order, each at an `ALIGN`ed row, up to `step_tokens` rows (one
        input always, however long; each is at most `window`) and `MAX_SEQUENCES`."""
        items: list[Item] = []
        rows = 0
        while self._pending and len(items) < MAX_SEQUENCES:
            job, index = self._pending[0]
            end = aligned(rows) + len(job.inputs[index])
            if items and end > min(self.step_tokens, self.window):
                break
            items.append(self._pending.popleft())
            rows = end
        return items

    def _decode(self, items: list[Item]) -> None:
        live = [(job, i) for job, i in items if not job.failed and not job.future.cancelled()]
        if not live:
            return
        batch, n = self._batch, 0
        for seq, (job, index) in enumerate(live):
            for pos in range(aligned(n) - n):
                n = self._put(n, FILLER_TOKEN, pos, MAX_SEQUENCES + seq)
            for pos, token in enumerate(job.inputs[index]):
                n = self._put(n, token, pos, seq)
        batch.n_tokens = n
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
        status = llama_cpp.llama_decode(self._ctx, batch)
        if status != 0:
            raise EngineError(f"llama_decode failed with status {status}")
        for seq, (job, index) in enumerate(live):
            job.put(index, self._vector(seq))

    def _put(self, row: int, token: int, pos: int, seq: int) -> int:
        batch = self._batch
        batch.token[row], batch.pos[row], batch.n_seq_id[row] = token, pos, 1
        batch.seq_id[row][0] = seq
        batch.logits[row] = 1  # pooling reads every row
        return row + 1

    def _vector(self, seq: int) -> list[float]:
        pointer = llama_cpp.llama_get_embeddings_seq(self._ctx, seq)
        if not pointer:
            raise EngineError(f"llama.cpp has no pooled embedding for sequence {seq}")
        raw = np.ctypeslib.as_array(pointer, shape=(self.n_embd,)).astype(np.float64)
        norm = float(np.linalg.norm(raw))
        unit = raw / norm if norm > 0 else raw
        vector: list[float] = unit.astype(np.float32).tolist()
        return vector

    def close(self) -> None:
        """Free the context; once, after the batcher thread (its only user) has stopped."""
        if not self._closed:
            self._closed = True
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
