"""A fake OpenAI-compatible provider that streams, for the upstream engine's tests and
bench/upstream.py. A bare ASGI app (no framework), so its own cost stays near zero.

Its behaviour is picked by the requested model (persistent faults), by `POST /control`
(the next N requests fail with a status, and a Retry-After), or by `--fail-rate` (a
share of requests answered 500, for the fallback benchmark):

    fake              an answer in CHUNKS chunks, then a usage chunk (include_usage)
    fake-nousage      the same without the usage chunk
    fake-broken       two chunks, then a line that is not SSE
    fake-cut          two chunks, then the connection drops
    fake-stall-mid    two chunks, then nothing for a minute
    fake-stall-first  nothing for a minute before the response starts
    fake-slow         one chunk every 50 ms, 200 chunks (clients that leave early)
    fake-500          always HTTP 500
    fake-echo         HTTP 400 whose message repeats the request's headers (a leak test)

With `tools`, the answer is a call of the first tool; with a `json_schema`
response_format, a JSON text naming the schema. Usage: prompt_tokens = words of the
messages + 3, completion_tokens = content chunks. `GET /received` lists what came in
(model, the client's address, the Authorization header, stream_options, the body),
`POST /reset` clears it.

`POST /v1/embeddings` answers one vector per input, [characters (or ids) of the
input, its index, 0.5, -0.25] (cut or repeated to `dimensions`), as floats or base64,
with usage prompt_tokens = words of the strings + ids of the token arrays, in reverse
order (each with its index); the models above pick faults the same way (fake-nousage,
fake-500, fake-echo, fake-stall-first).

    python bench/fake_provider.py --port 8003 [--fail-rate 0.3]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import random
import struct
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

WORDS = ["Hello", " from", " the", " fake", " provider", "."]
STALL = 60.0


class FakeProvider:
    def __init__(self, fail_rate: float = 0.0, chunk_delay: float = 0.0) -> None:
        self.fail_rate = fail_rate
        self.chunk_delay = chunk_delay
        self.received: list[dict[str, Any]] = []
        self.fail_next = 0
        self.fail_status = 500
        self.retry_after: str | None = None
        self.disconnects = 0
        self.record = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        raw = await _body(receive)
        path, method = scope["path"], scope["method"]
        if path == "/received":
            await _json(send, 200, self.received)
        elif path == "/reset":
            self.received.clear()
            self.fail_next, self.disconnects = 0, 0
            await _json(send, 200, {"ok": True})
        elif path == "/control":
            control = json.loads(raw)
            self.fail_next = int(control.get("fail_next", 0))
            self.fail_status = int(control.get("status", 500))
            self.retry_after = control.get("retry_after")
            await _json(send, 200, {"ok": True})
        elif path == "/stats":
            await _json(send, 200, {"disconnects": self.disconnects})
        elif method == "GET" and path.endswith("/models"):
            await _json(send, 200, {"object": "list", "data": [
                {"id": "fake", "object": "model", "created": 0, "owned_by": "fake"}]})
        elif method == "POST" and path.endswith("/embeddings"):
            await self.embed(scope, raw, send)
        elif method == "POST" and path.endswith(("/chat/completions", "/completions")):
            await self.complete(scope, raw, send, receive, path.endswith("/chat/completions"))
        else:
            await _json(send, 404, {"error": {"message": "no such route", "type": "x"}})

    async def embed(self, scope: Scope, raw: bytes, send: Send) -> None:
        body = json.loads(raw)
        model = str(body.get("model", ""))
        if await self.refuse(scope, body, send):
            return
        if model == "fake-stall-first":
            await asyncio.sleep(STALL)
        value = body.get("input")
        items = [value] if isinstance(value, str) or (
            value and isinstance(value[0], int)) else list(value)
        dims = int(body.get("dimensions") or 4)
        data = []
        for i, item in enumerate(items):
            vector = ([float(len(item)), float(i), 0.5, -0.25] * dims)[:dims]
            embedding: Any = vector
            if body.get("encoding_format") == "base64":
                embedding = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": embedding})
        answer: dict[str, Any] = {"object": "list", "model": model, "data": data[::-1]}
        if model != "fake-nousage":
            tokens = sum(len(item.split()) if isinstance(item, str) else len(item)
                         for item in items)
            answer["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
        await _json(send, 200, answer)

    async def refuse(self, scope: Scope, body: dict[str, Any], send: Send) -> bool:
        """Record the request; answer it with an error if a fault says so."""
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        if self.record:
            self.received.append({"model": body.get("model"), "client": scope.get("client"),
                                  "authorization": headers.get("authorization"),
                                  "stream_options": body.get("stream_options"), "body": body})
        model = str(body.get("model", ""))
        if self.fail_next > 0:
            self.fail_next -= 1
            extra = {"retry-after": self.retry_after} if self.retry_after else {}
            await _json(send, self.fail_status, {"error": {
                "message": "try later", "type": "server_error"}}, extra)
            return True
        if model == "fake-500" or (self.fail_rate and random.random() < self.fail_rate):
            await _json(send, 500, {"error": {"message": "boom", "type": "server_error"}})
            return True
        if model == "fake-echo":
            await _json(send, 400, {"error": {"message": f"bad request; you sent {headers}",
                                              "type": "invalid_request_error",
                                              "param": "messages"}})
            return True
        return False

    async def complete(self, scope: Scope, raw: bytes, send: Send, receive: Receive,
                       chat: bool) -> None:
        body = json.loads(raw)
        model = str(body.get("model", ""))
        if await self.refuse(scope, body, send):
            return
        if model == "fake-stall-first":
            await asyncio.sleep(STALL)
        await self.stream(body, model, chat, send, receive)

    async def stream(self, body: dict[str, Any], model: str, chat: bool, send: Send,
                     receive: Receive) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        pieces = _pieces(body, model)
        envelope = {"id": "chatcmpl-fake", "object": "chat.completion.chunk" if chat
                    else "text_completion", "created": 0, "model": model}
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.ensure_future(watch())
        try:
            await self._pieces(pieces, envelope, body, model, chat, send, gone)
        finally:
            watcher.cancel()

    async def _pieces(self, pieces: list[dict[str, Any]], envelope: dict[str, Any],
                      body: dict[str, Any], model: str, chat: bool, send: Send,
                      gone: asyncio.Event) -> None:
        sent = 0
        for i, piece in enumerate(pieces):
            if model in ("fake-broken", "fake-cut", "fake-stall-mid") and i == 2:
                if model == "fake-broken":
                    await _chunk(send, b"this is not an SSE line\n\n")
                    break
                if model == "fake-cut":
                    raise ConnectionAbortedError("the fake provider drops the connection")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(gone.wait(), STALL)
                return
            choice = _choice(piece, chat, last=i == len(pieces) - 1,
                             finish="tool_calls" if "tool_calls" in piece else "stop")
            if gone.is_set() or not await _event(send, {**envelope, "choices": [choice]}):
                self.disconnects += 1
                return
            sent += 1
            if self.chunk_delay or model == "fake-slow":
                await asyncio.sleep(self.chunk_delay or 0.05)
        wants_usage = (body.get("stream_options") or {}).get("include_usage")
        if wants_usage and model != "fake-nousage":
            usage = {"prompt_tokens": _prompt_tokens(body), "completion_tokens": sent,
                     "total_tokens": _prompt_tokens(body) + sent}
            await _event(send, {**envelope, "choices": [], "usage": usage})
        await _chunk(send, b"data: [DONE]\n\n", more=False)


def _pieces(body: dict[str, Any], model: str) -> list[dict[str, Any]]:
    if body.get("tools"):
        name = body["tools"][0]["function"]["name"]
        return [{"tool_calls": [{"index": 0, "id": "call_fake", "type": "function",
                                 "function": {"name": name, "arguments": ""}}]},
                {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]},
                {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}]
    fmt = body.get("response_format") or {}
    if fmt.get("type") == "json_schema":
        return [{"content": '{"schema": '}, {"content": json.dumps(fmt["json_schema"]["name"])},
                {"content": "}"}]
    count = 200 if model == "fake-slow" else len(WORDS)
    return [{"content": WORDS[i % len(WORDS)]} for i in range(count)]


def _choice(piece: dict[str, Any], chat: bool, last: bool, finish: str) -> dict[str, Any]:
    if chat:
        return {"index": 0, "delta": piece, "logprobs": None,
                "finish_reason": finish if last else None}
    return {"index": 0, "text": piece.get("content", ""), "logprobs": None,
            "finish_reason": "stop" if last else None}


def _prompt_tokens(body: dict[str, Any]) -> int:
    if "messages" in body:
        text = " ".join(str(m.get("content") or "") for m in body["messages"])
    else:
        text = str(body.get("prompt", ""))
    return len(text.split()) + 3


async def _body(receive: Receive) -> bytes:
    raw, more = b"", True
    while more:
        message = await receive()
        raw += message.get("body", b"")
        more = message.get("more_body", False)
    return raw


async def _json(send: Send, status: int, data: Any, headers: dict[str, str] | None = None
                ) -> None:
    body = json.dumps(data).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        *((k.encode(), v.encode()) for k, v in (headers or {}).items())]})
    await send({"type": "http.response.body", "body": body})


async def _chunk(send: Send, data: bytes, more: bool = True) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": more})


async def _event(send: Send, data: dict[str, Any]) -> bool:
    """False once the client has gone."""
    try:
        await _chunk(send, b"data: " + json.dumps(data).encode() + b"\n\n")
    except OSError:
        return False
    return True


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fail-rate", type=float, default=0.0)
    parser.add_argument("--chunk-delay", type=float, default=0.0)
    parser.add_argument("--no-record", action="store_true", help="keep no request bodies")
    args = parser.parse_args()
    app = FakeProvider(args.fail_rate, args.chunk_delay)
    app.record = not args.no_record
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False,
                loop="uvloop", http="httptools")


if __name__ == "__main__":
    main()
