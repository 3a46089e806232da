"""Refuse oversized bodies with 413 before they are buffered (ASGI middleware, so it also
covers chunked uploads that carry no Content-Length)."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aicloud.api.errors import error_body


class BodyTooLarge(Exception):
    pass


# multipart framing around an uploaded file: boundaries, part headers, the purpose field
UPLOAD_OVERHEAD = 64 << 10


class BodyLimit:
    """`uploads`: paths that take a file, with their own (larger) limit."""

    def __init__(self, app: ASGIApp, max_bytes: int,
                 uploads: dict[str, int] | None = None) -> None:
        self.app, self.max_bytes, self.uploads = app, max_bytes, uploads or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = self.uploads.get(scope["path"].rstrip("/"))
        limit = self.max_bytes if upload is None else upload + UPLOAD_OVERHEAD
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await self._reject(send, limit)
            return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._reject(send, limit)

    async def _reject(self, send: Send, limit: int) -> None:
        body = json.dumps(error_body(413, f"request body exceeds {limit} bytes")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
