"""Several server processes on one database (and one Redis), and a server killed with
SIGKILL: budgets, limits and the ledger must hold across processes and crashes."""

from __future__ import annotations

import csv
import io
import json
import random
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Server, start_server

MODEL = "smollm2-135m-instruct"
SMALL = ("--context", "512", "--sequences", "8")


def chat(server: Server, secret: str, max_tokens: int, stream: bool = False) -> tuple[int, Any]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}],
            "max_tokens": max_tokens, "stream": stream}
    try:
        resp = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {secret}"})
    except httpx.HTTPError:
        return 0, None
    if resp.status_code != 200:
        return resp.status_code, resp.json()["error"]
    if not stream:
        return 200, resp.json()["id"]
    events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        return 0, None  # cut off: not a complete 200 response
    return 200, json.loads(events[0])["id"]


@pytest.fixture
def two_servers(db_url: str, redis_url: str, tmp_path: Path) -> Iterator[tuple[Server, Server]]:
    env = {"AICLOUD_DATABASE_URL": db_url, "AICLOUD_REDIS_URL": redis_url}
    with ThreadPoolExecutor(2) as pool:
        started = [pool.submit(start_server, tmp_path / name, *SMALL, extra_env=env)
                   for name in ("a", "b")]
        failures = [f.exception() for f in started]
    servers = [f.result() for f in started if f.exception() is None]
    if any(failures):
        for srv in servers:
            srv.stop()
        raise next(e for e in failures if e is not None)
    yield servers[0], servers[1]
    for srv in servers:
        srv.stop()


def test_budget_and_limits_hold_across_two_processes(two_servers: tuple[Server, Server]) -> None:
    a, b = two_servers
    with a.admin() as admin:
        org = admin.post("/organizations", json={"name": "shared"}).json()
        budgeted = admin.post("/projects", json={"organization_id": org["id"], "name": "b",
                                                  "budget_usd": "10"}).json()
        limited = admin.post("/projects", json={"organization_id": org["id"], "name": "r",
                                                 "rpm_limit": 5}).json()
        secrets = [admin.post("/keys", json={"project_id": p["id"]}).json()["secret"]
                   for p in (budgeted, limited)]
        # $1 per output token: a request of 8 tokens holds $8 of the $10
        assert admin.put(f"/prices/{MODEL}", json={"input_per_million": 0,
                                                   "output_per_million": 1_000_000}
                         ).status_code == 200
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda i: chat((a, b)[i % 2], secrets[0], 8), range(50)))
        statuses = [status for status, _ in results]
        assert statuses.count(200) >= 1
        assert statuses.count(200) + statuses.count(429) == 50
        assert all(err["code"] == "insufficient_quota" for s, err in results if s == 429)
        usage = admin.get("/usage", params={"project_id": budgeted["id"],
                                            "group_by": "project"}).json()["data"]
        assert usage[0]["requests"] == statuses.count(200)
        assert 0 < float(usage[0]["cost_usd"]) <= 10

        with ThreadPoolExecutor(6) as pool:
            limited_statuses = [s for s, _ in pool.map(
                lambda i: chat((a, b)[i % 2], secrets[1], 1), range(12))]
        assert limited_statuses.count(200) == 5
        assert limited_statuses.count(429) == 7
        admin.put(f"/prices/{MODEL}", json={"input_per_million": 0, "output_per_million": 0})


def test_sigkill_under_load_loses_no_usage(tmp_path: Path) -> None:
    home = tmp_path / "home"
    srv = start_server(home, *SMALL)
    secret = srv.new_key("crash")
    rng = random.Random(7)
    plans = [(rng.randint(2, 48), i % 3 == 0) for i in range(24)]
    with ThreadPoolExecutor(24) as pool:
        futures = [pool.submit(chat, srv, secret, n, stream) for n, stream in plans]
        done_before_kill = 0
        while done_before_kill < 4:
            time.sleep(0.02)
            done_before_kill = sum(f.done() for f in futures)
        srv.process.send_signal(signal.SIGKILL)
        srv.process.wait(10)
        results = [f.result() for f in futures]
    completed = [ident for status, ident in results if status == 200]
    assert len(completed) >= 4
    assert len(completed) < len(plans), "the kill came too late to test anything"

    again = start_server(home, *SMALL)
    try:
        rows = list(csv.DictReader(io.StringIO(again.cli("billing", "usage", "--csv"))))
    finally:
        again.stop()
    recorded = [r["request_id"] for r in rows]
    for ident in completed:
        assert recorded.count(ident) == 1, ident
