"""A fake OpenAI-compatible upstream that answers every chat completion at once.

It is what LiteLLM's proxy forwards to in bench/gateway.py, and, called directly, the
baseline for "added latency": the cost of one HTTP round trip to a server doing nothing.
A bare ASGI app (no framework) with a response prepared once:

    python bench/fake_upstream.py --port 8002
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

COMPLETION = json.dumps({
    "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
    "model": "fake-instant", "system_fingerprint": None,
    "choices": [{"index": 0, "message": {"role": "assistant",
                                         "content": "Hello! I am an instant fake engine."},
                 "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21},
}).encode()
MODELS = json.dumps({"object": "list", "data": [
    {"id": "fake-instant", "object": "model", "created": 0, "owned_by": "bench"}]}).encode()


async def drain(receive: Receive) -> None:
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    await drain(receive)
    body = MODELS if scope["method"] == "GET" else COMPLETION
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False,
                loop="uvloop", http="httptools")


if __name__ == "__main__":
    main()
