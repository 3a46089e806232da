"""The fake provider (bench/fake_provider.py) served by uvicorn in a thread on 127.0.0.1."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn
from bench.fake_provider import FakeProvider

from tests.conftest import free_port


class RunningFake:
    def __init__(self, app: FakeProvider, port: int) -> None:
        self.app = app
        self.url = f"http://127.0.0.1:{port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def received(self) -> list[dict[str, Any]]:
        return list(self.app.received)

    def fail_next(self, n: int, status: int = 500, retry_after: str | None = None) -> None:
        self.app.fail_next, self.app.fail_status, self.app.retry_after = n, status, retry_after

    def reset(self) -> None:
        self.app.received.clear()
        self.app.fail_next = self.app.disconnects = 0


@contextmanager
def running_fake(fail_rate: float = 0.0) -> Iterator[RunningFake]:
    app = FakeProvider(fail_rate)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error",
                                          access_log=False, lifespan="off",
                                          timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the fake provider did not start")
        time.sleep(0.02)
    httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).raise_for_status()
    try:
        yield RunningFake(app, port)
    finally:
        server.should_exit = True
        thread.join(10)
