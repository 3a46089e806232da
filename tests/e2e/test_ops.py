"""What an operator sees: /metrics scoped to the admin key's organization, /health and
/healthz without whereabouts for strangers, the OpenAPI document as the API behaves,
errors that mean the same everywhere, DEBUG logs without secrets, and `aicloud serve`
failing in one line or picking its own port."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from aicloud.accounts.base import AdminScope
from aicloud.api.app import create_app
from aicloud.api.routes.health import engine_view
from aicloud.cluster.replica import ReplicaSpec, Whereabouts
from aicloud.cluster.replica_set import Replica, ReplicaSet, Scaling
from aicloud.config import Settings
from aicloud.engines.base import EngineInfo
from aicloud.models.catalog import bundled_model
from aicloud.models.pool import ModelPool
from tests.conftest import Server, start_server

MODEL = "smollm2-135m-instruct"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Count to ten."}],
        "max_tokens": 8}


def ok(resp: httpx.Response, status: int = 200) -> Any:
    assert resp.status_code == status, resp.text
    return resp.json()


def tenant(root: httpx.Client, name: str) -> dict[str, Any]:
    """An organization with one project and one API key."""
    org = ok(root.post("/organizations", json={"name": name}), 201)
    proj = ok(root.post("/projects", json={"organization_id": org["id"], "name": "main"}), 201)
    key = ok(root.post("/keys", json={"project_id": proj["id"], "name": "k"}), 201)
    return {"org": org, "project": proj, "key": key}


def chat(server: Server, secret: str, **extra: Any) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/chat/completions", json={**CHAT, **extra},
                      headers=bearer(secret), timeout=120)


@pytest.fixture
def root(server: Server) -> Iterator[httpx.Client]:
    with server.admin() as client:
        yield client


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def test_metrics_show_an_organization_only_its_own_tenants(server: Server,
                                                           root: httpx.Client) -> None:
    mine, theirs = tenant(root, "metrics-mine"), tenant(root, "metrics-theirs")
    for t in (mine, theirs):
        assert chat(server, t["key"]["secret"], max_tokens=2).status_code == 200
    viewer = server.admin_key("viewer", org=mine["org"]["id"])
    scoped = httpx.get(server.base_url + "/metrics", headers=bearer(viewer)).text
    everything = httpx.get(server.base_url + "/metrics",
                           headers={"Authorization": root.headers["authorization"]}).text
    label = 'tenant="{}"'.format
    assert label(mine["project"]["id"]) in scoped
    assert label(theirs["project"]["id"]) not in scoped
    assert 'aicloud_engine_running{model="' in scoped  # the model's own load is not private
    assert label(mine["project"]["id"]) in everything
    assert label(theirs["project"]["id"]) in everything
    with server.admin(viewer) as admin:  # the same view as the admin API's
        listed = admin.get("/models").json()["data"][0]["tenants"]
    assert {t["tenant"] for t in listed} == {mine["project"]["id"]}


def test_health_and_healthz_answer_probes_without_a_key(server: Server) -> None:
    for path in ("/health", "/healthz"):
        resp = httpx.get(server.base_url + path)
        assert resp.status_code == 200, resp.text
        assert resp.json()["status"] == "ok" and MODEL in resp.json()["models"]
        for secret in (server.admin_key(), server.keys["alpha"], "sk-aic-admin-" + "0" * 43):
            # an admin key adds whereabouts (on Ray); other credentials never fail a probe
            resp = httpx.get(server.base_url + path, headers=bearer(secret))
            assert resp.status_code == 200 and resp.json()["status"] == "ok"


def test_replica_whereabouts_are_for_admins_only() -> None:
    replicas = ReplicaSet(ReplicaSpec(MODEL, lambda: None), Scaling())
    replicas.replicas.append(Replica(index=0, capacity=4, state="ready",
                                     where=Whereabouts("node-1", "10.1.2.3", 4242)))
    public = engine_view(replicas, whereabouts=False)["placement"]["replicas"][0]
    assert public["state"] == "ready" and public["capacity"] == 4
    assert not {"node_id", "node_ip", "pid"} & set(public)
    admin = engine_view(replicas)["placement"]["replicas"][0]
    assert (admin["node_ip"], admin["pid"]) == ("10.1.2.3", 4242)


def test_unknown_model_on_the_admin_api_is_404(root: httpx.Client) -> None:
    resp = root.patch("/models/no-such-model", json={"replicas": 2})
    assert resp.status_code == 404, resp.text
    assert resp.json()["error"]["code"] == "not_found"


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_openapi_describes_v1_bodies_and_the_400_actually_sent(server: Server) -> None:
    spec = httpx.get(server.base_url + "/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for path, field in (("/v1/chat/completions", "messages"), ("/v1/completions", "prompt")):
        operation = spec["paths"][path]["post"]
        body = operation["requestBody"]["content"]["application/json"]["schema"]
        assert {"model", field, "max_tokens", "stream"} <= set(body["properties"])
        assert operation["responses"]["400"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/Error"}
    operations = [op for item in spec["paths"].values() for op in item.values()]
    responses = [code for op in operations for code in op["responses"]]
    assert all(op["responses"]["default"] == operation["responses"]["400"]
               | {"description": op["responses"]["default"]["description"]}
               for op in operations)  # 401, 404, 429, 503...: the same shape
    assert "422" not in responses and "HTTPValidationError" not in schemas
    error = schemas["Error"]["properties"]["error"]
    assert set(error["required"]) == {"message", "type", "param", "code"}
    # every reference resolves inside the document (pydantic's own `#/$defs/...` would not)
    for ref in set(_refs(spec)):
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.rsplit("/", 1)[1] in schemas, ref
    # and the 400 documented is the 400 sent
    resp = httpx.post(server.base_url + "/v1/completions", headers=bearer(server.keys["alpha"]),
                      json={"model": MODEL, "prompt": "hi", "max_tokens": -1})
    assert resp.status_code == 400 and set(resp.json()["error"]) == set(error["properties"])


class AllReplicasDown(ReplicaSet):
    """A model on Ray whose replicas are all down (the reviver still at work): only
    `start` differs, so no Ray cluster is needed; everything a request meets is real."""

    async def start(self) -> None:
        self._info = EngineInfo(MODEL, 2048, 4, self.kind)


def test_no_replica_available_is_503_with_retry_after_on_every_route(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    down = AllReplicasDown(ReplicaSpec(MODEL, lambda: None), Scaling())
    app = create_app(settings, ModelPool({MODEL: down}))

    async def go() -> list[httpx.Response]:
        async with app.router.lifespan_context(app):
            cloud = app.state.cloud
            root = AdminScope.installation()
            org = await cloud.orgs.create_org(root, "acme", None)
            project = await cloud.orgs.create_project(root, org.id, "web", {})
            _, secret = await cloud.keys.create_key(root, project.id)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://aicloud",
                                         headers=bearer(secret)) as client:
                return [
                    await client.post("/v1/chat/completions", json={
                        "model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
                    await client.post("/v1/completions", json={"model": MODEL,
                                                               "prompt": "hi"}),
                ]

    for resp in asyncio.run(go()):
        assert resp.status_code == 503, resp.text
        assert int(resp.headers["retry-after"]) >= 1
        assert resp.json()["error"]["code"] == "model_unavailable"


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> Iterator[tuple[dict[str, str], str | None]]:
    """Server environment for each database; on PostgreSQL a fresh database whose URL
    carries a canary password (local connections are trusted, so any password is
    accepted: it only has to leak)."""
    if request.param == "sqlite":
        yield {}, None
        return
    pg_url = request.getfixturevalue("pg_url")
    name = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    password = "pw-" + secrets.token_hex(12)
    yield {"AICLOUD_DATABASE_URL": f"postgresql://postgres:{password}@127.0.0.1:5432/{name}"}, \
        password
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_debug_logs_hold_no_secrets(tmp_path: Path,
                                    database: tuple[dict[str, str], str | None]) -> None:
    """At DEBUG, aiosqlite logs each statement as a `functools.partial` holding its
    parameters: masking plain string arguments alone let them through."""
    env, password = database
    srv = start_server(tmp_path / "home", "--context", "512", "--sequences", "2",
                       extra_env={"AICLOUD_LOG_LEVEL": "debug", **env})
    try:
        admin = srv.admin_key()
        canary = "sk-aic-" + "CANARY" * 7 + "x"
        in_body = "sk-aic-" + "BODYCANARY" * 4
        with srv.admin(admin) as root:
            t = tenant(root, "canaries")
            key = t["key"]["secret"]
            assert chat(srv, key, max_tokens=2, messages=[
                {"role": "user", "content": f"my key is {in_body}"}]).status_code == 200
            assert chat(srv, canary).status_code == 401
            assert root.get(f"/keys/{canary}").status_code == 404
            assert root.get("/usage", params={"api_key_id": canary}).status_code == 404
            ok(root.post("/keys", json={"project_id": t["project"]["id"], "name": in_body}),
               201)  # a name is no secret, but one pasted there must not be logged
            rotated = ok(root.post(f"/keys/{t['key']['id']}/rotate"))["secret"]
    finally:
        srv.stop()
    log = srv.log.read_text(errors="replace")
    assert "DEBUG" in log
    if password is None:  # the statements and their parameters were there, masked
        assert "executing functools.partial" in log and "sk-aic-***" in log
    for secret in (admin, canary, in_body, key, rotated, password or admin):
        assert secret not in log, secret
        assert secret[-16:] not in log, secret


def test_port_zero_serves_on_a_free_port_it_names(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    log = home / "server.log"
    env = {**{k: v for k, v in os.environ.items()
              if not k.startswith("AICLOUD_")}, "AICLOUD_HOME": str(home)}
    proc = subprocess.Popen([sys.executable, "-m", "aicloud", "serve", "--port", "0",
                             "--context", "256", "--sequences", "1"],
                            env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        deadline, port = time.monotonic() + 120, None
        while port is None:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            found = re.search(r"running on http://127\.0\.0\.1:(\d+)", log.read_text())
            port = int(found.group(1)) if found else None
            time.sleep(0.2)
        assert port not in (0, 8000)
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_corrupt_model_file_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    with bundled_model().path.open("rb") as whole:
        truncated.write_bytes(whole.read(5_000_000))  # the header is intact, tensors cut
    env = {**{k: v for k, v in os.environ.items()
              if not k.startswith("AICLOUD_")}, "AICLOUD_HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "-m", "aicloud", "serve", "--port", "0",
                           "--model", str(truncated)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0
    lines = done.stderr.splitlines()
    assert "Traceback" not in done.stderr and len(lines) < 15, done.stderr
    about = [line for line in lines if "truncated.gguf" in line]
    assert len(about) == 1 and "ERROR" in about[0], done.stderr


def test_which_refusals_leave_a_usage_row(tmp_path: Path) -> None:
    """As docs/operations.md says: a request shed from the model's line after admission
    leaves a row with its status and no tokens (the row releases its hold); one refused
    at admission (RPM) or at the door of a full line leaves none."""
    srv = start_server(tmp_path / "home", "--context", "1024", "--sequences", "1",
                       extra_env={"AICLOUD_MAX_QUEUE": "1", "AICLOUD_MAX_QUEUE_WAIT": "3"})
    try:
        with srv.admin() as root:
            t = tenant(root, "refusals")
            limited = ok(root.post("/keys", json={"project_id": t["project"]["id"],
                                                  "name": "slow", "rpm_limit": 1}), 201)
        assert chat(srv, limited["secret"], max_tokens=2).status_code == 200
        assert chat(srv, limited["secret"], max_tokens=2).status_code == 429  # RPM
        key = t["key"]["secret"]
        counting = {"model": MODEL, "prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 1000,
                    "temperature": 0, "stream": True}
        with ThreadPoolExecutor(1) as pool, httpx.stream(
                "POST", srv.base_url + "/v1/completions", json=counting, headers=bearer(key),
                timeout=120) as holder:  # holds the one slot throughout
            assert holder.status_code == 200
            assert chat(srv, key, max_tokens=2).status_code == 429  # shed after 3 s
            waiting = pool.submit(chat, srv, key, max_tokens=2)
            time.sleep(1.0)
            assert chat(srv, key, max_tokens=2).status_code == 429  # the line is full
            assert waiting.result().status_code == 429  # shed after 3 s
    finally:
        srv.stop()
    with sqlite3.connect(srv.db) as conn:
        rows = conn.execute("SELECT api_key_id, status, prompt_tokens, completion_tokens "
                            "FROM usage ORDER BY started_at").fetchall()
    assert [r[1] for r in rows if r[0] == limited["id"]] == ["length"]  # 2 tokens
    mine = [r[1:] for r in rows if r[0] == t["key"]["id"]]
    assert [r for r in mine if r[0] == "throttled"] == [("throttled", 0, 0)] * 2, rows
    held = [r for r in mine if r[0] != "throttled"]  # the door's refusal left nothing
    assert len(held) == 1 and held[0][0] in ("cancelled", "length") and held[0][2] > 0, rows
