"""Tenant-fair scheduling on the real model: a light tenant is served while a heavy one
floods; back-pressure answers 429/503 with retry-after; /metrics shows it all."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Server, start_server

MODEL = "smollm2-135m-instruct"


def ask(server: Server, key: str, max_tokens: int, stream: bool = True,
        text: str = "Tell me a long story about ships.") -> tuple[int, float, httpx.Headers]:
    """(status, seconds to the first content chunk or to the response, headers)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens, "stream": stream}
    start = time.perf_counter()
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body,
                      timeout=300, headers={"Authorization": f"Bearer {key}"}) as resp:
        first = None
        for line in resp.iter_lines():
            if first is None and line.startswith("data: "):
                first = time.perf_counter() - start
        return resp.status_code, first or time.perf_counter() - start, resp.headers


def tenants(server: Server) -> dict[str, dict[str, Any]]:
    with server.admin() as admin:
        model = admin.get("/models").json()["data"][0]
    return {t["tenant"]: t for t in model["tenants"]}


def project_of(server: Server, name: str) -> str:
    with server.admin() as admin:
        projects = admin.get("/projects").json()["data"]
    return next(p["id"] for p in projects if p["name"] == name)


@pytest.fixture(scope="module")
def fair_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("fair"), "--context", "512",
                       "--sequences", "8")
    srv.keys["heavy"] = srv.new_key("heavy")
    srv.keys["light"] = srv.new_key("light")
    yield srv
    srv.stop()


def test_light_tenant_is_served_during_a_flood(fair_server: Server) -> None:
    heavy, light = project_of(fair_server, "heavy"), project_of(fair_server, "light")
    with ThreadPoolExecutor(32) as pool:
        flood = [pool.submit(ask, fair_server, fair_server.keys["heavy"], 48)
                 for _ in range(30)]
        deadline = time.monotonic() + 60
        while tenants(fair_server).get(heavy, {}).get("waiting", 0) < 10:
            assert time.monotonic() < deadline, "the flood never queued"
            time.sleep(0.1)
        light_ttft = [ask(fair_server, fair_server.keys["light"], 8)[1] for _ in range(3)]
        backlog = tenants(fair_server)[heavy]["waiting"]
        heavy_ttft = [f.result()[1] for f in flood]
    assert backlog > 0, "the light requests only ran after the flood drained"
    assert max(light_ttft) < statistics.median(heavy_ttft) / 3, (light_ttft, heavy_ttft)
    state = tenants(fair_server)
    with fair_server.admin() as admin:
        billed = {u["project"]: u for u in admin.get(
            "/usage", params={"group_by": "project"}).json()["data"]}
    # the scheduler counts exactly the tokens the ledger bills
    for tenant in (heavy, light):
        assert state[tenant]["served_output_tokens"] == billed[tenant]["completion_tokens"]
    assert state[light]["counter"] > 0 and state[heavy]["running"] == 0


def test_metrics_need_an_admin_key_and_show_tenants(fair_server: Server) -> None:
    assert httpx.get(fair_server.base_url + "/metrics").status_code == 401
    with fair_server.admin() as admin:
        text = httpx.get(fair_server.base_url + "/metrics",
                         headers={"Authorization": admin.headers["authorization"]}).text
    heavy = project_of(fair_server, "heavy")
    assert f'aicloud_tenant_virtual_counter{{model="{MODEL}",tenant="{heavy}"}}' in text
    assert f'aicloud_tenant_served_tokens_total{{model="{MODEL}",tenant="{heavy}",' \
           f'kind="output"}}' in text
    assert f'aicloud_time_to_first_token_seconds_bucket{{model="{MODEL}",le="+Inf"}}' in text
    assert f'aicloud_inter_token_latency_seconds_count{{model="{MODEL}"}}' in text
    assert 'aicloud_engine_running{model="' in text


def test_back_pressure_refuses_with_retry_after(tmp_path: Path) -> None:
    """One slot, a line of two, two seconds of patience. A counting completion holds the
    slot; what waits too long or does not fit is refused with a real status (also for
    streams): 429 for the tenant that floods, 503 for one that merely arrives into it."""
    srv = start_server(tmp_path / "home", "--context", "1024", "--sequences", "1",
                       extra_env={"AICLOUD_MAX_QUEUE": "2", "AICLOUD_MAX_QUEUE_WAIT": "2"})
    try:
        hog, other = srv.new_key("hog"), srv.new_key("other")
        auth = {"Authorization": f"Bearer {hog}"}
        # counts for ~9 s alone (900 tokens): it must outlast every wait below (~5 s)
        counting = {"model": MODEL, "prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 900,
                    "temperature": 0, "stream": True}
        with ThreadPoolExecutor(8) as pool, httpx.stream(
                "POST", srv.base_url + "/v1/completions", json=counting, headers=auth,
                timeout=120) as holder:
            assert holder.status_code == 200
            late = ask(srv, hog, 8, stream=True)  # waits 2 s behind the holder
            assert late[0] == 429 and int(late[2]["retry-after"]) >= 1
            queued = [pool.submit(ask, srv, hog, 8, False) for _ in range(2)]
            time.sleep(0.5)
            assert ask(srv, hog, 8, stream=False)[0] == 429  # the line is full: refused now
            arriving = pool.submit(ask, srv, other, 8, True)  # makes room: evicts the hog
            statuses = sorted(f.result()[0] for f in queued)
            assert statuses == [429, 429]
            newcomer = arriving.result()
            assert newcomer[0] == 503 and newcomer[2]["retry-after"]
        text = httpx.get(srv.base_url + "/metrics", headers={
            "Authorization": f"Bearer {srv.admin_key()}"}).text
        assert 'aicloud_requests_refused_total{model="' + MODEL + '",reason="throttled"}' in text
        with srv.admin() as admin:
            usage = admin.get("/usage", params={"group_by": "project"}).json()["data"]
        refused = [u for u in usage if u["project"] == project_of(srv, "other")]
        assert refused == [] or refused[0]["prompt_tokens"] == 0  # shed requests cost nothing
    finally:
        srv.stop()
