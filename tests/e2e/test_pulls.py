"""Pulls in a live server and from the CLI, against a hub on 127.0.0.1 (fake_hub.py) that
serves the bundled model's GGUF: progress readable through the admin API while a slow
pull runs, the pulled model answering a chat through the openai client, corrupt files
refused, and HF_TOKEN never in a log or a response."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from aicloud.models.catalog import bundled_model
from tests.conftest import Server, start_server
from tests.models.fake_hub import FakeHub, running, sha256

MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKEN = "hf_canary_" + "5" * 30
FINISHED = ("done", "failed", "cancelled")


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    files = {MODEL: bundled_model().path.read_bytes(), "noise.gguf": os.urandom(1 << 20)}
    with running(FakeHub(files, token=TOKEN)) as server:
        yield server


@pytest.fixture(scope="module")
def pull_server(tmp_path_factory: pytest.TempPathFactory, hub: FakeHub) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("pulls-home")
    srv = start_server(home, "--context", "512", "--sequences", "2", extra_env={
        "HF_ENDPOINT": hub.base_url, "HF_TOKEN": TOKEN, "AICLOUD_LOG_LEVEL": "debug"})
    yield srv
    srv.stop()


def ok(resp: httpx.Response, status: int = 200) -> Any:
    assert resp.status_code == status, resp.text
    assert TOKEN not in resp.text
    return resp.json()


def wait(admin: httpx.Client, pull_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Poll the pull until it ends; returns its last view and every view seen."""
    views = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        views.append(ok(admin.get(f"/models/pulls/{pull_id}")))
        if views[-1]["state"] in FINISHED:
            return views[-1], views
        time.sleep(0.05)
    raise AssertionError(f"pull {pull_id} did not finish: {views[-1]}")


def catalog_rows(server: Server) -> dict[str, tuple[str, list[str]]]:
    with sqlite3.connect(server.db) as db:
        rows = db.execute("SELECT id, source, aliases FROM catalog_models").fetchall()
    return {r[0]: (r[1], json.loads(r[2])) for r in rows}


def test_a_slow_hf_pull_shows_progress_and_its_model_answers(
        pull_server: Server, hub: FakeHub, tmp_path: Path) -> None:
    size = len(hub.files[MODEL])
    hub.delay = 0.003  # ~5 s for the whole file
    with pull_server.admin() as admin:
        started = ok(admin.post("/models/pulls", json={
            "source": f"hf://acme/tiny/{MODEL}", "id": "pulled", "aliases": ["pulled-too"],
            "options": {"context": 512}}), 202)
        assert (started["model"], started["source"]) == ("pulled", f"hf://acme/tiny/{MODEL}")
        final, views = wait(admin, started["id"])
        hub.delay = 0
        assert final["state"] == "done", final
        midway = [v for v in views if v["state"] == "downloading"
                  and 0 < v["bytes_done"] < size and v["bytes_total"] == size]
        assert midway, views
        assert (final["bytes_done"], final["sha256"]) == (size, sha256(hub.files[MODEL]))
        listed = ok(admin.get("/models/pulls"))["data"]
        assert [p["id"] for p in listed] == [started["id"]]
    path = Path(final["path"])
    assert path == pull_server.home / "models" / "pulled.gguf" and path.stat().st_size == size
    assert catalog_rows(pull_server)["pulled"] == (str(path), ["pulled-too"])
    assert [s.authorization for s in hub.gets("/cdn/")] == [None]

    # the pulled file serves (the pool of this branch loads models at start)
    second = start_server(tmp_path / "second", "--model", f"pulled={path}", "--context", "512",
                          "--sequences", "2")
    try:
        secret = second.new_key("p")
        client = openai.OpenAI(base_url=f"{second.base_url}/v1", api_key=secret, max_retries=0)
        answer = client.chat.completions.create(
            model="pulled", messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=8, temperature=0)
        assert answer.model == "pulled" and answer.choices[0].message.content
    finally:
        second.stop()
    assert TOKEN not in pull_server.log.read_text()


def test_a_corrupt_pull_fails_and_never_enters_the_catalog(pull_server: Server,
                                                           hub: FakeHub) -> None:
    with pull_server.admin() as admin:
        started = ok(admin.post("/models/pulls", json={"source": hub.url("noise.gguf")}), 202)
        final, _ = wait(admin, started["id"])
        assert final["state"] == "failed" and "not a GGUF model" in final["error"]
        bad_sum = ok(admin.post("/models/pulls", json={
            "source": hub.url(MODEL), "id": "summed", "sha256": "0" * 64}), 202)
        final, _ = wait(admin, bad_sum["id"])
        assert final["state"] == "failed" and "sha256 mismatch" in final["error"]
    assert not {"noise", "summed"} & set(catalog_rows(pull_server))
    assert not (pull_server.home / "models" / "noise.gguf").exists()
    assert not (pull_server.home / "models" / "summed.gguf").exists()


def test_pull_requests_are_checked_and_scoped(pull_server: Server, hub: FakeHub) -> None:
    with pull_server.admin() as admin:
        for body in ({"source": "file:///etc/passwd"}, {"source": hub.url("x.gguf"),
                                                          "id": "../x"},
                     {"source": hub.url("x.gguf"), "sha256": "nothex"},
                     {"source": hub.url("x.gguf"), "unknown": 1}):
            assert admin.post("/models/pulls", json=body).status_code == 400, body
        missing = admin.get("/models/pulls/pull_" + "0" * 24)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        org = ok(admin.post("/organizations", json={"name": "pull-org"}), 201)
    org_admin = pull_server.admin_key("admin", org=org["id"])
    with pull_server.admin(org_admin) as scoped:
        assert scoped.post("/models/pulls", json={"source": hub.url(MODEL)}).status_code == 403
        assert scoped.get("/models/pulls").status_code == 403


def test_the_cli_pulls_here_and_through_the_server(pull_server: Server, hub: FakeHub) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "aicloud", "models", "pull", *args],
                              env=pull_server.env, capture_output=True, text=True, timeout=120)

    here = cli(hub.url(MODEL), "--id", "cli-here", "--alias", "cli-alias", "--pin",
               "--keep-alive", "30")
    assert here.returncode == 0, here.stderr
    entry = json.loads(here.stdout)
    assert (entry["id"], entry["aliases"], entry["pinned"], entry["keep_alive"]) == (
        "cli-here", ["cli-alias"], True, 30.0)
    assert f"pulling {hub.url(MODEL)} as model cli-here" in here.stderr
    assert "cli-here done" in here.stderr and "98.4/98.4 MB" in here.stderr  # the bar
    taken = cli(hub.url(MODEL), "--id", "cli-alias")
    assert taken.returncode == 1 and "already used by model cli-here" in taken.stderr
    key = pull_server.admin_key()
    remote = cli(hub.url(MODEL), "--id", "cli-remote", "--url", pull_server.base_url,
                 "--admin-key", key)
    assert remote.returncode == 0, remote.stderr
    assert json.loads(remote.stdout)["state"] == "done"
    refused = cli(hub.url("noise.gguf"), "--url", pull_server.base_url, "--admin-key", key)
    assert refused.returncode == 1 and "not a GGUF model" in refused.stderr
    rows = catalog_rows(pull_server)
    assert rows["cli-here"][0] == str(pull_server.home / "models" / "cli-here.gguf")
    assert "cli-remote" in rows and "noise" not in rows
