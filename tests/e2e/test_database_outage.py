"""The database goes away mid-request: the response still completes, its usage is spooled
to disk and written once the database is back; new requests get a clean 503."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from sqlalchemy.engine import make_url

from tests.conftest import LoopThread, Server, free_port, start_server

MODEL = "smollm2-135m-instruct"


class CuttableLink:
    """A TCP forwarder to the database that the test can cut (every connection dropped,
    new ones refused) and restore."""

    def __init__(self, loop: LoopThread, target: tuple[str, int]) -> None:
        self.loop, self.target, self.port = loop, target, free_port()
        self.up = True
        self._writers: set[asyncio.StreamWriter] = set()
        self._server = loop.run(asyncio.start_server(self._handle, "127.0.0.1", self.port))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer),
                             return_exceptions=True)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()
            self._writers.discard(writer)

    def cut(self) -> None:
        async def cut() -> None:
            self.up = False
            for writer in list(self._writers):
                writer.transport.abort()
        self.loop.run(cut())

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self._server.close()


@pytest.fixture
def link(loop_thread: LoopThread) -> Iterator[CuttableLink]:
    link = CuttableLink(loop_thread, ("127.0.0.1", 5432))
    yield link
    link.close()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_usage_survives_a_database_outage(db_url: str, link: CuttableLink,
                                          tmp_path: Path) -> None:
    proxied = make_url(db_url).set(port=link.port).render_as_string(hide_password=False)
    srv: Server = start_server(tmp_path / "home", "--context", "512", "--sequences", "4",
                               extra_env={"AICLOUD_DATABASE_URL": proxied})
    try:
        secret = srv.new_key("outage")
        headers = {"Authorization": f"Bearer {secret}"}
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell a long story."}],
                "max_tokens": 120, "stream": True}
        events: list[str] = []
        with httpx.stream("POST", srv.base_url + "/v1/chat/completions", json=body,
                          headers=headers, timeout=120) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 2:
                        link.cut()
                        during = httpx.post(srv.base_url + "/v1/chat/completions",
                                            json={**body, "stream": False}, headers=headers,
                                            timeout=60)
        assert events[-1] == "[DONE]"
        request_id = json.loads(events[0])["id"]
        assert during.status_code == 503
        assert during.json()["error"]["code"] == "database_unavailable"
        assert during.headers["retry-after"] == "2"
        spool = list((tmp_path / "home").glob("usage-spool-*.jsonl"))
        assert spool and request_id in spool[0].read_text()

        link.restore()
        deadline = time.monotonic() + 30
        row = None
        while row is None and time.monotonic() < deadline:
            time.sleep(0.5)
            with psycopg.connect(db_url) as conn:
                row = conn.execute("SELECT completion_tokens, status FROM usage "
                                   "WHERE request_id = %s", (request_id,)).fetchone()
        assert row is not None and row[0] > 0
        assert not list((tmp_path / "home").glob("usage-spool-*.jsonl"))
        assert httpx.post(srv.base_url + "/v1/chat/completions", json={**body, "stream": False},
                          headers=headers, timeout=60).status_code == 200
    finally:
        srv.stop()
    assert "Traceback" not in srv.log.read_text()
