"""SIGKILL a server while it streams, restart it on the same home, port and database: every
stream that sent tokens has one `interrupted` usage row short of what its client got by at
most about a second of tokens, its budget holds are gone, and normal requests keep exactly
one row each, however many times the server restarts."""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
from sqlalchemy import create_engine, text

from aicloud.store import db
from tests.billing.test_ledger import assert_counters_match_rows
from tests.conftest import Server, start_server

MODEL = "smollm2-135m-instruct"
SMALL = ("--context", "1024", "--sequences", "8")
STREAMS = 6
# at $1 an output token each stream holds $300 of the $1,820 budget; a probe of $900 fits
# only once the holds of the running streams are gone (with three or more of them live)
MAX_TOKENS = 300
BUDGET_USD = 1820
PROBE = 900
WINDOW = 1.5  # the journal writes every second; half a second more for a loaded machine
PROMPT = [{"role": "user", "content": "Count from 1 to 500, one number per line."}]


@dataclass
class Reader:
    """One stream read chunk by chunk, with the time each piece of text arrived."""

    max_tokens: int = MAX_TOKENS
    request_id: str = ""
    arrivals: list[float] = field(default_factory=list)
    finished: bool = False
    cut_by: Exception | None = None

    def read(self, client: openai.OpenAI, chunks: int | None = None) -> None:
        """Read to the end, or only the first `chunks` pieces of text."""
        try:
            # greedy: the model counts on for the whole budget (sampled at temperature 1,
            # a stream could end after a few tokens and leave too few running at the kill)
            with client.chat.completions.create(model=MODEL, messages=PROMPT,
                                                max_tokens=self.max_tokens, temperature=0,
                                                stream=True) as stream:
                for chunk in stream:
                    self.request_id = chunk.id
                    if chunk.choices and chunk.choices[0].delta.content:
                        self.arrivals.append(time.monotonic())
                    if chunk.choices and chunk.choices[0].finish_reason:
                        self.finished = True
                    if chunks is not None and len(self.arrivals) >= chunks:
                        return
        except Exception as exc:  # the server died mid-stream (a broken chunked body)
            self.cut_by = exc


def usage_rows(url: str) -> dict[str, list[tuple[Any, ...]]]:
    engine = create_engine(db.sync_url(url))
    with engine.connect() as conn:
        found = conn.execute(text("SELECT request_id, status, completion_tokens, cost_pico "
                                  "FROM usage")).all()
        held = conn.execute(text("SELECT count(*) FROM reservations")).scalar()
    engine.dispose()
    rows: dict[str, list[tuple[Any, ...]]] = {}
    for request_id, *rest in found:
        rows.setdefault(request_id, []).append(tuple(rest))
    assert held == 0, "a budget hold outlived its server's restart"
    return rows


def restart(home: Path, port: int, env: dict[str, str]) -> Server:
    return start_server(home, *SMALL, port=port, extra_env=env)


def test_sigkill_bills_streamed_tokens_and_frees_holds(db_url: str, tmp_path: Path) -> None:
    home, env = tmp_path / "home", {"AICLOUD_DATABASE_URL": db_url}
    srv = start_server(home, *SMALL, extra_env=env)
    port = int(srv.base_url.rsplit(":", 1)[1])
    try:
        with srv.admin() as admin:
            org = admin.post("/organizations", json={"name": "crash"}).json()
            project = admin.post("/projects", json={"organization_id": org["id"], "name": "p",
                                                    "budget_usd": str(BUDGET_USD)}).json()
            secret = admin.post("/keys", json={"project_id": project["id"]}).json()["secret"]
            assert admin.put(f"/prices/{MODEL}", json={"input_per_million": 0,
                                                       "output_per_million": 1_000_000}
                             ).status_code == 200
        client = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key=secret, max_retries=0)
        normal = [client.chat.completions.create(model=MODEL, messages=PROMPT,
                                                 max_tokens=8).id]
        tail = Reader(max_tokens=8)
        tail.read(client)
        normal.append(tail.request_id)

        readers = [Reader() for _ in range(STREAMS)]
        threads = [threading.Thread(target=r.read, args=(client,)) for r in readers]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 120
        while not all(len(r.arrivals) >= 5 or r.finished for r in readers):
            assert time.monotonic() < deadline, "the streams never got going"
            time.sleep(0.05)
        time.sleep(2.5)  # a few journal ticks into every stream
        assert over_budget(client), [(len(r.arrivals), r.finished) for r in readers]
        killed_at = time.monotonic()
        srv.process.send_signal(signal.SIGKILL)
        srv.process.wait(10)
        for thread in threads:
            thread.join(30)
    finally:
        srv.stop()

    cut = [r for r in readers if not r.finished]
    assert len(cut) >= 3, "most streams should still be running at the kill"
    again = restart(home, port, env)
    try:
        rows = usage_rows(db_url)  # the restart settled the dead instance before serving
        for request_id in normal:
            assert len(rows[request_id]) == 1 and rows[request_id][0][0] in (
                "completed", "length")
        for reader in cut:
            received = len(reader.arrivals)
            last_second = sum(t > killed_at - WINDOW for t in reader.arrivals)
            print(f"stream {reader.request_id}: {received} chunks received, {last_second} "
                  f"in the last {WINDOW} s, billed {rows[reader.request_id]}")
            [(status, completion, cost)] = rows[reader.request_id]
            assert status == "interrupted"
            assert received - last_second <= completion <= MAX_TOKENS
            assert cost == completion * 10**12  # $1 per output token, prompt free
        # the dead server's holds are gone: the budget admits a full-size request at once
        # (its first token proves it; the rest would only take time here)
        spender = Reader(max_tokens=PROBE)
        spender.read(openai.OpenAI(base_url=f"{again.base_url}/v1", api_key=secret,
                                   max_retries=0), chunks=1)
        assert spender.cut_by is None and spender.arrivals
    finally:
        again.stop()
    last = restart(home, port, env)
    last.stop()
    final = usage_rows(db_url)
    assert {k: v for k, v in final.items() if k != spender.request_id} == rows
    [(status, _, _)] = final[spender.request_id]  # its client left, then a clean stop
    assert status in ("cancelled", "interrupted", "length")
    assert_counters_match_rows(db_url)


def over_budget(client: openai.OpenAI) -> bool:
    try:
        client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=PROBE,
                                       stream=True).close()
    except openai.RateLimitError as exc:
        return exc.code == "insufficient_quota"
    return False


def test_a_server_that_never_returns_is_settled_by_another(pg_url: str, tmp_path: Path) -> None:
    """Two servers on one PostgreSQL: A is killed and stays dead; B, streaming all along,
    bills A's cut stream once A's heartbeat is older than the timeout, never its own."""
    import psycopg

    name = f"crash_{int(time.time() * 1000)}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"{pg_url.rsplit('/', 1)[0]}/{name}"
    env = {"AICLOUD_DATABASE_URL": url, "AICLOUD_INSTANCE_TIMEOUT": "10"}
    a = start_server(tmp_path / "a", *SMALL, extra_env=env)
    b = start_server(tmp_path / "b", *SMALL, extra_env=env)
    try:
        secret = a.new_key("p")
        on_a, on_b = Reader(), Reader()
        threads = [threading.Thread(target=r.read, args=(openai.OpenAI(
            base_url=f"{s.base_url}/v1", api_key=secret, max_retries=0),))
            for r, s in ((on_a, a), (on_b, b))]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 120
        while len(on_a.arrivals) < 5 or len(on_b.arrivals) < 1:
            assert time.monotonic() < deadline and not on_a.finished
            time.sleep(0.05)
        time.sleep(2)
        a.process.send_signal(signal.SIGKILL)
        a.process.wait(10)
        killed_at = time.monotonic()
        while on_a.request_id not in (found := usage_rows(url)):
            assert time.monotonic() - killed_at < 10 + 5 + 20, "A was never settled"
            time.sleep(0.5)
        settled_after = time.monotonic() - killed_at
        print(f"A settled by B {settled_after:.1f} s after its kill")
        [(status, completion, _)] = found[on_a.request_id]
        assert status == "interrupted" and completion >= 5
        assert settled_after >= 9, "A was settled before its heartbeat went stale"
        # B streamed all along: alive, so nothing of it was settled
        assert on_b.cut_by is None and len(on_b.arrivals) > 1
        assert all(s != "interrupted" for s, *_ in found.get(on_b.request_id, []))
    finally:
        a.stop()
        b.stop()
        for thread in threads:
            thread.join(60)
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
