"""`x-request-id` on every response: the openai SDK exposes it as `_request_id`, and
support questions start from it. Routes that have their own id (a completion's) set the
header themselves; every other response gets a fresh one here."""

from __future__ import annotations

import secrets

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "x-request-id"


def fresh_request_id() -> str:
    return f"req_{secrets.token_hex(12)}"


class RequestId:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if HEADER not in headers:
                    headers.append(HEADER, fresh_request_id())
            await send(message)

        await self.app(scope, receive, send_with_id)
