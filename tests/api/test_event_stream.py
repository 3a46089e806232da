"""The SSE response of generations, driven as an ASGI server at spec 2.3 (uvicorn's)
drives it: the whole body goes out; a client that leaves stops the body generator at once
(its `finally`, where a run bills what it produced, runs) and the response ends quietly;
a cancellation that is not the client's still propagates."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from aicloud.api.event_stream import EventStream

SCOPE = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}}


class Client:
    def __init__(self, leave_after: int | None = None) -> None:
        self.sent: list[dict[str, Any]] = []
        self.leave_after = leave_after
        self.left = asyncio.Event()
        self.started = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.left.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        self.started.set()
        bodies = sum(m["type"] == "http.response.body" for m in self.sent)
        if self.leave_after is not None and bodies >= self.leave_after:
            self.left.set()


def body(closed: list[str], chunks: int, then_wait: bool = False) -> AsyncIterator[bytes]:
    async def gen() -> AsyncIterator[bytes]:
        try:
            for i in range(chunks):
                yield f"data: {i}\n\n".encode()
            if then_wait:
                await asyncio.Event().wait()
        finally:
            closed.append("closed")

    return gen()


def test_the_whole_body_is_sent() -> None:
    async def go() -> Client:
        client, closed = Client(), []
        await EventStream(body(closed, 3))(SCOPE, client.receive, client.send)
        assert closed == ["closed"]
        return client

    client = asyncio.run(go())
    assert [m.get("body") for m in client.sent[1:]] == [b"data: 0\n\n", b"data: 1\n\n",
                                                       b"data: 2\n\n", b""]
    assert client.sent[-1]["more_body"] is False


def test_a_client_that_leaves_stops_the_body_and_the_response_ends_quietly() -> None:
    async def go() -> tuple[Client, list[str]]:
        client, closed = Client(leave_after=1), []
        async with asyncio.timeout(5):
            await EventStream(body(closed, 1, then_wait=True))(SCOPE, client.receive,
                                                               client.send)
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
        return client, closed

    client, closed = asyncio.run(go())
    assert closed == ["closed"]
    assert all(m.get("more_body", True) for m in client.sent)  # no end was sent


def test_a_cancellation_that_is_not_the_clients_propagates() -> None:
    async def go() -> list[str]:
        client, closed = Client(), []
        task = asyncio.ensure_future(EventStream(body(closed, 1, then_wait=True))(
            SCOPE, client.receive, client.send))
        await client.started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return closed

    assert asyncio.run(go()) == ["closed"]
