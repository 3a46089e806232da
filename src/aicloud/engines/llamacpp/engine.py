"""The llama.cpp engine as the event loop sees it: async methods over the batcher thread."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from pathlib import Path
from typing import Any

from aicloud.engines.base import (
    EMBED,
    GENERATE,
    ChatMessage,
    Constraint,
    EmbeddingRequest,
    Embeddings,
    EngineError,
    EngineInfo,
    EngineStats,
    GenerationRequest,
    TokenEvent,
    Usage,
    check_embedding_inputs,
    completion_limit,
    not_embedding,
)
from aicloud.engines.events import EventQueue
from aicloud.engines.llamacpp.batcher import Batcher
from aicloud.engines.llamacpp.chat import ChatTemplate
from aicloud.engines.llamacpp.constrain import Guide
from aicloud.engines.llamacpp.embedder import Embedder, pooling_of
from aicloud.engines.llamacpp.model import ContextConfig, LlamaModel
from aicloud.engines.llamacpp.sequence import Sequence
from aicloud.engines.llamacpp.threads import ThreadBudget
from aicloud.engines.llamacpp.weights import DEFAULT_CACHE, NATIVE, ensure_weights

log = logging.getLogger(__name__)

# The first constrained request also builds the tokenizer (~1 s); a grammar within the
# parser limits compiles in milliseconds after that.
GUIDE_SECONDS = 10.0

# Tokenizing more text than this goes to a worker thread so the loop stays responsive.
INLINE_TOKENIZE_CHARS = 16_384


class LlamaCppStream(EventQueue):
    """The events of one sequence, delivered on the loop by the batcher thread."""

    def __init__(self, batcher: Batcher) -> None:
        super().__init__()
        self._batcher = batcher
        self.sequence: Sequence | None = None

    def on_event(self, event: TokenEvent) -> None:
        self.put(event)

    def cancel(self) -> None:
        if self.sequence is not None and not self.done:
            self._batcher.cancel(self.sequence)


class LlamaCppEngine:
    kind = "llama.cpp"

    def __init__(self, model_id: str, path: Path, config: ContextConfig | None = None, *,
                 weights: str = NATIVE, weights_cache: Path | None = None,
                 threads_budget: ThreadBudget | None = None) -> None:
        self.model_id = model_id
        self.threads_budget = threads_budget
        self.path = path
        self.weights = weights
        self._weights_cache = (weights_cache or DEFAULT_CACHE).expanduser()
        self._requested = config or ContextConfig()
        self._model: LlamaModel | None = None
        self._batcher: Batcher | None = None
        self._template: ChatTemplate | None = None
        # the embedding context is made by the first embeddings request (`_embedding`): a
        # model loaded to generate, as most are, never pays for it (~0.1 s of a cold
        # request's load, and its memory)
        self._pooling: int | None = None
        self._embedder: Embedder | None = None
        self._embedder_made: asyncio.Future[Embedder | None] | None = None
        self._embedder_lock = threading.Lock()
        self._closing = False

    async def start(self) -> None:
        path = await asyncio.to_thread(ensure_weights, self.path, self.weights,
                                       self._weights_cache)
        model = await asyncio.to_thread(LlamaModel, path, self._requested)
        self._model = model
        self._template = ChatTemplate(
            model.metadata("tokenizer.chat_template"),
            bos_token=model.bos_text, eos_token=model.eos_text, model=self.model_id,
        )
        await asyncio.to_thread(lambda: model.controls)  # read the vocabulary once, off-loop
        self._pooling = pooling_of(model)
        self._batcher = Batcher(model, self.threads_budget)
        self._batcher.start()

    async def _embedding(self) -> Embedder:
        """The embedding context, made once on the engine thread between two steps (so
        llama.cpp never sets up one context while it decodes on another of the same
        weights); a model that cannot have one answers as a model that does not embed."""
        if self._embedder is not None:
            return self._embedder
        if self._pooling is None:
            raise not_embedding(self.model_id)
        if self._embedder_made is None:
            loop = asyncio.get_running_loop()
            made: asyncio.Future[Embedder | None] = loop.create_future()
            model, batcher = self.model, self.batcher
            self._embedder_made = made

            def chore() -> None:
                embedder = None
                try:
                    embedder = self._new_embedder(model, batcher)
                finally:  # whatever happened, the requests waiting for it are answered
                    with self._embedder_lock:  # close() may have begun meanwhile
                        if self._closing and embedder is not None:
                            embedder.close()
                            embedder = None
                        self._embedder = embedder
                    with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits
                        loop.call_soon_threadsafe(_settle, made, embedder)

            try:
                batcher.between_steps(chore)
            except RuntimeError as exc:  # shutting down
                self._embedder_made = None
                raise EngineError(f"model {self.model_id} is not running") from exc
        embedder = await asyncio.shield(self._embedder_made)
        if embedder is None:
            self._pooling = None  # logged once by _new_embedder; no longer listed
            raise not_embedding(self.model_id)
        return embedder

    @staticmethod
    def _new_embedder(model: LlamaModel, batcher: Batcher) -> Embedder | None:
        pooling = pooling_of(model)
        if pooling is None:
            return None
        config = model.config
        try:
            return Embedder(model, pooling, config.context_per_sequence or 0,
                            config.threads or 1, config.batch_tokens, batcher.between_steps)
        except EngineError as exc:  # generation still works; the model just cannot embed
            log.warning("%s: no embeddings: %s", model.path.name, exc.message)
            return None

    async def close(self) -> None:
        if self._template is not None:
            self._template.close()
            self._template = None
        with self._embedder_lock:
            self._closing = True
        if self._batcher is not None:
            await asyncio.to_thread(self._batcher.stop)
            self._batcher = None
        with self._embedder_lock:
            embedder, self._embedder = self._embedder, None
        if embedder is not None:
            embedder.close()
        if self._model is not None:
            self._model.close()
            self._model = None

    @property
    def model(self) -> LlamaModel:
        if self._model is None:
            raise EngineError(f"model {self.model_id} is not loaded")
        return self._model

    @property
    def batcher(self) -> Batcher:
        if self._batcher is None:
            raise EngineError(f"model {self.model_id} is not running")
        return self._batcher

    @property
    def config(self) -> ContextConfig:
        return self.model.config

    async def encode_chat(self, messages: list[ChatMessage],
                          tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Rendered and tokenized on the template's own threads (bounded in time and
        size); control tokens come only from the template, never from message text."""
        if self._template is None:
            raise EngineError(f"model {self.model_id} is not loaded")
        extra = {"tools": tools} if tools else {}
        return await self._template.encode_async(messages, self.model, **extra)

    async def encode_text(self, text: str) -> list[int]:
        return await self._tokenize(text, special=False)

    async def _tokenize(self, text: str, *, special: bool) -> list[int]:
        if len(text) <= INLINE_TOKENIZE_CHARS:
            return self.model.tokenize(text, special=special)
        return await asyncio.to_thread(self.model.tokenize, text, special=special)

    async def generate(self, request: GenerationRequest) -> LlamaCppStream:
        max_tokens = self._check(request)
        guide = await self._guide(request.constraint) if request.constraint else None
        stream = LlamaCppStream(self.batcher)
        stream.sequence = Sequence(
            request, asyncio.get_running_loop(), stream.on_event, max_tokens=max_tokens,
            guide=guide,
        )
        self.batcher.submit(stream.sequence)
        return stream

    async def embed(self, request: EmbeddingRequest) -> Embeddings:
        if self._pooling is None:
            raise not_embedding(self.model_id)
        check_embedding_inputs(request, self.config.context_per_sequence or 0,
                               self.model.n_vocab)
        vectors = await (await self._embedding()).embed(request.inputs)
        return Embeddings(vectors, Usage(sum(len(t) for t in request.inputs), 0))

    async def _guide(self, constraint: Constraint) -> Guide:
        """Compile the grammar against this model's tokens in a worker thread (the first
        one also builds the tokenizer, ~1 s), bounded in time like the API's check."""
        try:
            return await asyncio.wait_for(
                asyncio.to_thread(self.batcher.guidance.guide, constraint), GUIDE_SECONDS)
        except TimeoutError:
            raise EngineError("the response format took too long to compile; simplify it",
                              param="response_format") from None

    def _check(self, request: GenerationRequest) -> int:
        """Refuse what cannot run; return the effective completion limit."""
        return completion_limit(request, self.config.context_per_sequence or 0,
                                self.model.n_vocab)

    def info(self) -> EngineInfo:
        config = self.config
        can = frozenset({GENERATE, EMBED} if self._pooling is not None else {GENERATE})
        return EngineInfo(self.model_id, config.context_per_sequence or 0,
                          config.sequences or 1, self.kind, can,
                          self._template.source if self._template else None, preempts=True)

    def stats(self) -> EngineStats:
        batcher = self._batcher
        if batcher is None:
            return EngineStats(0, 0, 0.0, 0, 0)
        running, waiting = batcher.load()
        return EngineStats(
            running=running,
            waiting=waiting,
            tokens_per_second=round(batcher.meter.rate, 2),
            kv_cells_used=batcher.slots.cells_used,
            kv_cells_total=self.config.n_ctx,
        )


def _settle(made: asyncio.Future[Embedder | None], embedder: Embedder | None) -> None:
    if not made.done():
        made.set_result(embedder)
