"""Embeddings on the loaded weights: a second llama.cpp context with embeddings on.

The context shares the model (no second copy of the weights) and its decodes run on the
batcher's thread between generation steps (`Batcher.between_steps`), so the two never
compute at the same time on the same cores. Each chore takes the inputs of every waiting
request in arrival order, up to about the tokens of one generation step (one input
always), so a flood of embeddings delays a token stream by about one prompt chunk per step,
not by the whole flood.

Each input is decoded alone, in its own `llama_decode` on an emptied cache. An input then
gets the same vector alone and beside others by construction: packed into one decode, its
attention sums would run over KV cells at an offset that depends on the batch, which moved
vectors of SmolLM2-135M by up to 9e-4, and keeping offsets aligned to the SIMD lanes took
filler rows (a third more rows for inputs of ~24 tokens, several times more for short
ones). Alone, an input costs exactly its own rows, and its attention spans its own cells
only, not every cell of a packed batch. On a CPU a decode of a few dozen rows is already
compute-bound (the weights are read once per decode, a few ms against ~100 ms of
arithmetic for 24 tokens here), so packing saved nothing to pay for that.

llama.cpp computes the model's output head for every row of an embedding context too,
whose result nobody reads: an eval callback stops each decode's graph at the final norm
instead, and the norm's rows are pooled here (headless.py), once a check decode has shown
that they pool to llama.cpp's own vector. The thread count is re-decided by measuring, as
for generation (threads.py): beside a busy neighbour, spinning workers make two threads
slower than one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import llama_cpp
import numpy as np

from aicloud.engines.base import EngineError
from aicloud.engines.llamacpp.headless import NormTap, pool, unit
from aicloud.engines.llamacpp.model import LlamaModel
from aicloud.engines.llamacpp.threads import ThreadTuner

log = logging.getLogger(__name__)

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
NULL_CONTEXT = llama_cpp.llama_context_p(0)  # None as llama.cpp sees it


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
        self.threads = ThreadTuner(threads)
        self._threads_set = threads
        self._schedule = schedule
        self._pending: deque[Item] = deque()
        self._lock = threading.Lock()
        self._scheduled = False
        self._closed = False
        self.tap: NormTap | None = NormTap(self.n_embd) if pooling in NormTap.POOLINGS else None
        self._batch = llama_cpp.llama_batch_init(window, 0, 1)
        self._ctx = NULL_CONTEXT
        try:
            self._ctx = self._new_context(threads)
            self._check_tap()
        except BaseException:
            self.close()
            raise

    def _new_context(self, threads: int) -> llama_cpp.llama_context_p:
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = self.window
        cparams.n_batch = self.window  # a whole input in one ubatch, as pooling needs
        cparams.n_ubatch = self.window
        cparams.n_seq_max = 1  # one input per decode
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.embeddings = True
        cparams.pooling_type = self.pooling
        cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cparams.no_perf = True
        if self.tap is not None:
            cparams.cb_eval = self.tap.callback
        ctx: llama_cpp.llama_context_p = llama_cpp.llama_init_from_model(self.model.model,
                                                                         cparams)
        if not ctx:
            raise EngineError("llama.cpp could not create the embedding context "
                              "(out of memory?)")
        return ctx

    def _check_tap(self) -> None:
        """One decode with the whole graph: if the final norm's rows pool to llama.cpp's
        own vector, later decodes stop before the output head; if not (dense layers after
        pooling, a norm by another name), the context is made again without the callback,
        which then costs nothing. Runs where the context is made: on the engine thread,
        between two steps (`LlamaCppEngine._embedding`)."""
        tap = self.tap
        if tap is None:
            return
        tokens = self.model.tokenize("The keeper climbs the stair to light the lamp.",
                                     special=False)[: self.window]
        self._decode(tokens)
        if tap.verify(self.pooling, self._pooled()):
            log.info("%s: embeddings skip the output head", self.model.path.name)
            return
        log.info("%s: embeddings compute the whole graph (the final norm's rows do not "
                 "pool to llama.cpp's vector)", self.model.path.name)
        llama_cpp.llama_free(self._ctx)
        self._ctx, self.tap = NULL_CONTEXT, None
        self._ctx = self._new_context(self._threads_set)

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
        """About one step's worth of inputs, then back in line if more waits."""
        with self._lock:
            items = self._take()
        for k, (job, index) in enumerate(items):
            if job.failed or job.future.cancelled():
                continue
            try:
                vector = self._embed_one(job.inputs[index])
            except Exception as exc:
                log.exception("embedding decode failed")
                for other, _ in items[k:]:
                    other.fail(EngineError(f"the engine failed while embedding: {exc}"))
                break
            job.put(index, vector)
        with self._lock:
            again = self._scheduled = bool(self._pending)
        if again:
            self._wake()

    def _take(self) -> list[Item]:
        """Inputs in arrival order, up to `step_tokens` tokens (one input always, however
        long; each is at most `window`)."""
        items: list[Item] = []
        rows = 0
        while self._pending:
            job, index = self._pending[0]
            rows += len(job.inputs[index])
            if items and rows > self.step_tokens:
                break
            items.append(self._pending.popleft())
        return items

    def _embed_one(self, tokens: list[int]) -> list[float]:
        n = self.threads.threads()
        if n != self._threads_set:
            llama_cpp.llama_set_n_threads(self._ctx, n, n)
            self._threads_set = n
        start = time.perf_counter()
        self._decode(tokens)
        self.threads.record(len(tokens), time.perf_counter() - start)
        rows = self.tap.rows if self.tap is not None else None
        # the tap's rows when it stopped the graph; llama.cpp's vector when the graph ran
        # to its end (no tap, or rows the tap did not recognise as one per token)
        vector: list[float] = (pool(rows, self.pooling) if rows is not None
                               else self._pooled()).astype(np.float32).tolist()
        return vector

    def _decode(self, tokens: list[int]) -> None:
        batch = self._batch
        for pos, token in enumerate(tokens):
            batch.token[pos], batch.pos[pos], batch.n_seq_id[pos] = token, pos, 1
            batch.seq_id[pos][0] = 0
            batch.logits[pos] = 1  # pooling reads every row
        batch.n_tokens = len(tokens)
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
        if self.tap is not None:
            self.tap.expect(len(tokens))
        status = llama_cpp.llama_decode(self._ctx, batch)
        if status != 0:
            raise EngineError(f"llama_decode failed with status {status}")

    def _pooled(self) -> np.ndarray:
        """llama.cpp's own pooled vector of the last decode, as a unit vector."""
        pointer = llama_cpp.llama_get_embeddings_seq(self._ctx, 0)
        if not pointer:
            raise EngineError("llama.cpp has no pooled embedding for the input")
        return unit(np.ctypeslib.as_array(pointer, shape=(self.n_embd,)).astype(np.float64))

    def close(self) -> None:
        """Free the context; once, after the batcher thread (its only user) has stopped."""
        if not self._closed:
            self._closed = True
            llama_cpp.llama_batch_free(self._batch)
            if self._ctx:
                llama_cpp.llama_free(self._ctx)
                self._ctx = NULL_CONTEXT
