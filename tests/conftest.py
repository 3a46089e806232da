"""Shared fixtures: a real server process with the bundled model, real databases.

Services a test needs must be there: with CI=true a missing one fails the run instead
of skipping (a skipped store test proves nothing)."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

T = TypeVar("T")
PG_ADMIN_URL = os.environ.get("AICLOUD_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Test servers share re-typed weights and the format decision (measured once per machine).
SHARED_WEIGHTS = Path(tempfile.gettempdir()) / "aicloud-test-weights"


def need_service(name: str, error: Exception) -> None:
    message = f"{name} is not reachable: {error}"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    base_url: str
    home: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    log: Path
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def db(self) -> Path:
        return self.home / "aicloud.db"

    def cli(self, *args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "aicloud", *args], env=self.env,
                             capture_output=True, text=True, timeout=60, check=True)
        return out.stdout

    def new_key(self, project: str) -> str:
        return self.cli("keys", "create", "--project", project).strip().splitlines()[-1]

    def admin_key(self, role: str = "owner", org: str | None = None) -> str:
        args = ["admin-keys", "create", "--role", role, *(["--org", org] if org else [])]
        return self.cli(*args).strip().splitlines()[-1]

    def admin(self, secret: str | None = None) -> httpx.Client:
        """A client for /admin/v1 with an installation owner key (or the one given)."""
        key = secret or self.keys.setdefault("admin", self.admin_key())
        return httpx.Client(base_url=self.base_url + "/admin/v1", timeout=60,
                            headers={"Authorization": f"Bearer {key}"})

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_server(home: Path, *args: str, extra_env: dict[str, str] | None = None,
                 ready_within: float = 120, port: int | None = None) -> Server:
    port = port or free_port()
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("AICLOUD_")}
    env = {**inherited, "AICLOUD_HOME": str(home), "AICLOUD_WEIGHTS_DIR": str(SHARED_WEIGHTS),
           **(extra_env or {})}
    log = home / "server.log"
    home.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "aicloud", "serve", "--port", str(port), *args],
        env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )
    server = Server(f"http://127.0.0.1:{port}", home, env, proc, log)
    deadline = time.monotonic() + ready_within
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log.read_text()}")
        try:
            if httpx.get(f"{server.base_url}/healthz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"server did not become ready:\n{log.read_text()}")


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the e2e suite: bundled model, small contexts so limits are cheap to hit,
    a small body limit so 413 is cheap to provoke."""
    home = tmp_path_factory.mktemp("aicloud-home")
    srv = start_server(home, "--context", "1024", "--sequences", "20",
                       extra_env={"AICLOUD_MAX_BODY_BYTES": "262144"})
    srv.keys["alpha"] = srv.new_key("alpha")
    yield srv
    srv.stop()


class LoopThread:
    """An event loop in a thread, so sync tests can drive async engines directly."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 180) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this run, dropped afterwards."""
    import psycopg

    name = f"aicloud_test_{secrets.token_hex(4)}"
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        need_service("PostgreSQL", exc)
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated-from-nothing database of each kind, empty for every test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'aicloud.db'}"
        return
    import psycopg

    base = request.getfixturevalue("pg_url")
    name = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"{base.rsplit('/', 1)[0]}/{name}"
    yield url
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The Redis every test shares; each test namespaces its keys."""
    import redis

    url = os.environ.get("AICLOUD_TEST_REDIS", "redis://127.0.0.1:6379/0")
    try:
        redis.Redis.from_url(url, socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        need_service("Redis", exc)
    return url


@pytest.fixture(scope="session")
def hf_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled model as a Hugging Face folder for vLLM, made from its GGUF (no download).
    With CI=true a missing vLLM fails the run: the vllm extra is part of the test setup."""
    if importlib.util.find_spec("vllm") is None:
        need_service("vLLM", ModuleNotFoundError("not installed: pip install -e '.[vllm]'"))
    from aicloud.engines.vllm_convert import ensure_hf_folder
    from aicloud.models.catalog import bundled_model

    return ensure_hf_folder(bundled_model().path, tmp_path_factory.getbasetemp() / "weights")
