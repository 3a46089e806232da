"""One engine replica: a Ray actor in its own worker process, placed by Ray's resources.

Events are shipped in lists (everything a step produced), not one Ray object per token:
a Ray round trip costs about a millisecond, a decoding step tens of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from aicloud.engines.base import (
    ChatMessage,
    EmbeddingRequest,
    Embeddings,
    Engine,
    EngineInfo,
    EngineStats,
    GenerationRequest,
    GenerationStream,
    TokenEvent,
)

EngineFactory = Callable[[], Engine]


@dataclass(slots=True, frozen=True)
class ReplicaSpec:
    """How to build and place one replica. `make_engine` runs inside the actor."""

    model_id: str
    make_engine: EngineFactory
    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass(slots=True, frozen=True)
class Whereabouts:
    node_id: str
    node_ip: str
    pid: int


class EngineReplica:
    """The actor's class (wrapped with `ray.remote` by the replica set)."""

    def __init__(self, make_engine: EngineFactory) -> None:
        self._engine = make_engine()
        self._started = False
        self._lock = asyncio.Lock()
        self._streams: dict[str, GenerationStream] = {}

    async def start(self) -> EngineInfo:
        """Idempotent: after Ray restarts a dead replica, the first call loads it again."""
        async with self._lock:
            if not self._started:
                await self._engine.start()
                self._started = True
        return self._engine.info()

    def whereabouts(self) -> Whereabouts:
        import ray

        context = ray.get_runtime_context()
        return Whereabouts(context.get_node_id(), ray.util.get_node_ip_address(), os.getpid())

    async def encode_chat(self, messages: list[ChatMessage],
                          tools: list[dict[str, Any]] | None = None) -> list[int]:
        await self.start()
        return await self._engine.encode_chat(messages, tools)

    async def encode_text(self, text: str) -> list[int]:
        await self.start()
        return await self._engine.encode_text(text)

    async def embed(self, request: EmbeddingRequest) -> Embeddings:
        await self.start()
        return await self._engine.embed(request)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[list[TokenEvent]]:
        await self.start()
        stream = await self._engine.generate(request)
        self._streams[request.request_id] = stream
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        pump = asyncio.create_task(self._pump(stream, events))
        try:
            while True:
                batch = [await events.get()]
                while not events.empty():
                    batch.append(events.get_nowait())
                yield batch
                if batch[-1].finish_reason is not None:
                    return
        finally:
            self._streams.pop(request.request_id, None)
            stream.cancel()  # a no-op once finished; stops it if the consumer went away
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump

    @staticmethod
    async def _pump(stream: GenerationStream, events: asyncio.Queue[TokenEvent]) -> None:
        async for event in stream:
            events.put_nowait(event)

    def cancel(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.cancel()

    def stats(self) -> EngineStats:
        return self._engine.stats()

    async def close(self) -> None:
        await self._engine.close()
