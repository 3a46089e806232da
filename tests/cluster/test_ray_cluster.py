"""A real Ray cluster of two nodes on this machine, with replicas of the bundled model:
routing across replicas, a replica killed under load, scaling through the admin API."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Server, start_server

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A head node and a worker node with 2 (logical) CPUs each, as separate raylets."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    yield cluster.address
    cluster.shutdown()


@pytest.fixture(scope="module")
def cluster_server(ray_address: str, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("ray-home")
    srv = start_server(home, "--ray", ray_address, "--replicas", "2", "--replica-cpus", "1",
                       "--threads", "1", "--context", "512", "--sequences", "4")
    srv.keys["ray"] = srv.new_key("ray")
    yield srv
    srv.stop()


def placement(server: Server) -> dict[str, Any]:
    """As an admin sees it: node addresses and process ids are not for anyone else."""
    admin = server.keys.setdefault("admin", server.admin_key())
    return httpx.get(server.base_url + "/healthz", headers={"Authorization": f"Bearer {admin}"}
                     ).json()["models"][MODEL]["placement"]


def wait_for(check: Any, timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.5)
    raise AssertionError("condition not met in time")


def chat(server: Server, max_tokens: int, stream: bool) -> tuple[int, str | None]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell a story."}],
            "max_tokens": max_tokens, "stream": stream}
    resp = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=180,
                      headers={"Authorization": f"Bearer {server.keys['ray']}"})
    if resp.status_code != 200:
        return resp.status_code, None
    if not stream:
        return 200, resp.json()["id"]
    events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
    if events[-1] != "[DONE]":
        return 500, None
    return 200, json.loads(events[0])["id"]


def usage_ids(server: Server) -> list[str]:
    with sqlite3.connect(server.db) as db:
        return [row[0] for row in db.execute("SELECT request_id FROM usage")]


def test_replicas_share_the_load(cluster_server: Server) -> None:
    layout = placement(cluster_server)
    assert [r["state"] for r in layout["replicas"]] == ["ready", "ready"]
    before = sum(r["served"] for r in layout["replicas"])
    client = openai.OpenAI(base_url=cluster_server.base_url + "/v1", max_retries=0,
                           api_key=cluster_server.keys["ray"], timeout=180)

    def one(i: int) -> str:
        reply = client.chat.completions.create(
            model=MODEL, max_tokens=16,
            messages=[{"role": "user", "content": f"Say something about the number {i}."}])
        assert reply.usage is not None and reply.usage.completion_tokens > 0
        return reply.choices[0].message.content or ""

    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(one, range(8)))
    assert all(texts)
    served = [r["served"] for r in placement(cluster_server)["replicas"]]
    assert sum(served) - before == 8
    assert all(n > 0 for n in served), served


def test_a_replica_killed_under_load(cluster_server: Server) -> None:
    """Queued requests move to the survivor; streams on the dead replica end with an
    error; every 200 is billed once; Ray brings the replica back."""
    plans = [(48, i % 2 == 0) for i in range(14)]
    victim = placement(cluster_server)["replicas"][0]
    billed_before = len(usage_ids(cluster_server))
    with ThreadPoolExecutor(14) as pool:
        futures = [pool.submit(chat, cluster_server, n, s) for n, s in plans]
        wait_for(lambda: placement(cluster_server)["replicas"][0]["running"] > 0, 30)
        time.sleep(1.0)  # let its streams produce some tokens first
        os.kill(victim["pid"], signal.SIGKILL)
        results = [f.result(timeout=300) for f in futures]
    ok = [ident for status, ident in results if status == 200]
    failed = len(plans) - len(ok)
    assert 0 < failed <= victim["capacity"], results  # only what ran there, mid-stream
    assert all(status in (200, 500) for status, _ in results)
    recorded = wait_for(lambda: (ids := usage_ids(cluster_server)) and
                        all(i in ids for i in ok) and ids)
    assert all(recorded.count(i) == 1 for i in ok)
    # the cut streams are billed too, for what they produced
    wait_for(lambda: len(usage_ids(cluster_server)) == billed_before + len(plans))
    layout = wait_for(lambda: (p := placement(cluster_server)) and
                      all(r["state"] == "ready" for r in p["replicas"]) and p, 120)
    assert layout["replicas"][0]["pid"] != victim["pid"]
    assert httpx.get(cluster_server.base_url + "/healthz").json()["status"] == "ok"


def test_scaling_through_the_admin_api(cluster_server: Server, tmp_path: Path) -> None:
    with cluster_server.admin() as admin:
        resp = admin.patch(f"/models/{MODEL}", json={"replicas": 3, "max_replicas": 3})
        assert resp.status_code == 200, resp.text
        replicas = resp.json()["placement"]["replicas"]
        assert len(replicas) == 3 and all(r["state"] == "ready" for r in replicas)
        assert len({r["node_id"] for r in replicas}) == 2  # Ray used both nodes
        assert chat(cluster_server, 4, False)[0] == 200
        down = admin.patch(f"/models/{MODEL}", json={"replicas": 2}).json()
        assert len(down["placement"]["replicas"]) == 2
        assert admin.patch(f"/models/{MODEL}", json={"replicas": 0}).status_code == 400
        listed = admin.get("/models").json()["data"]
        assert listed[0]["engine"] == "llamacpp" and len(listed[0]["placement"]["replicas"]) == 2
    status = cluster_server.cli("status", "--url", cluster_server.base_url)
    assert "replica 0: ready" in status


def test_autoscaling_follows_the_queue(ray_address: str, tmp_path: Path) -> None:
    srv = start_server(tmp_path / "home", "--ray", ray_address, "--replicas", "1",
                       "--max-replicas", "2", "--replica-cpus", "1", "--threads", "1",
                       "--context", "512", "--sequences", "2",
                       extra_env={"AICLOUD_SCALE_UP_AFTER": "1",
                                  "AICLOUD_SCALE_DOWN_AFTER": "3"})
    try:
        srv.keys["ray"] = srv.new_key("scale")
        assert len(placement(srv)["replicas"]) == 1
        with ThreadPoolExecutor(10) as pool:
            futures = [pool.submit(chat, srv, 64, False) for _ in range(10)]
            wait_for(lambda: [r["state"] for r in placement(srv)["replicas"]] ==
                     ["ready", "ready"], 60)
            statuses = [f.result()[0] for f in futures]
        assert statuses == [200] * 10
        assert all(r["served"] > 0 for r in placement(srv)["replicas"])
        assert wait_for(lambda: len(placement(srv)["replicas"]) == 1, 30)
    finally:
        srv.stop()


def test_fairness_holds_across_replicas(cluster_server: Server) -> None:
    """One waiting line for both replicas: a light tenant overtakes a heavy one's backlog."""
    heavy, light = cluster_server.new_key("heavy"), cluster_server.new_key("light")

    def first_token(key: str, max_tokens: int) -> float:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell a story."}],
                "max_tokens": max_tokens, "stream": True}
        start = time.perf_counter()
        with httpx.stream("POST", cluster_server.base_url + "/v1/chat/completions",
                          json=body, timeout=300,
                          headers={"Authorization": f"Bearer {key}"}) as resp:
            assert resp.status_code == 200
            elapsed = None
            for line in resp.iter_lines():
                if elapsed is None and line.startswith("data: "):
                    elapsed = time.perf_counter() - start
        assert elapsed is not None
        return elapsed

    with ThreadPoolExecutor(24) as pool:
        flood = [pool.submit(first_token, heavy, 48) for _ in range(24)]
        wait_for(lambda: placement(cluster_server)["waiting"] >= 8, 60)
        light_ttft = [first_token(light, 4) for _ in range(3)]
        still_waiting = placement(cluster_server)["waiting"]
        heavy_ttft = sorted(f.result() for f in flood)
    assert still_waiting > 0
    assert max(light_ttft) < heavy_ttft[len(heavy_ttft) // 2] / 3, (light_ttft, heavy_ttft)
