"""The event side of a GenerationStream, shared by every engine: events are put on the
event loop as they arrive and iterated once by the API; the final one also resolves
`final()` for whoever bills a cancelled request."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aicloud.engines.base import TokenEvent


class EventQueue:
    def __init__(self) -> None:
        self._events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self._final: asyncio.Future[TokenEvent] = asyncio.get_running_loop().create_future()

    @property
    def done(self) -> bool:
        return self._final.done()

    def put(self, event: TokenEvent) -> None:
        if self._final.done():
            return
        self._events.put_nowait(event)
        if event.finish_reason is not None:
            self._final.set_result(event)

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        while True:
            event = await self._events.get()
            yield event
            if event.finish_reason is not None:
                return

    async def final(self) -> TokenEvent:
        return await asyncio.shield(self._final)
