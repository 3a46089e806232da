"""The model pool with the real engine, through a live server: catalog models made from the
bundled SmolLM2 (the same GGUF under other ids, one re-typed with `weights`) and tiny GGUFs
written with the `gguf` package, within a memory budget that holds three SmolLM2s."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import httpx
import openai
import pytest

from aicloud.models.catalog import bundled_model
from tests.conftest import Server, start_server

PINNED = "smollm2-135m-instruct"  # the bundled model, registered pinned when nothing else is
BUNDLED = str(bundled_model().path)
# at a 256-token context and 2 sequences a SmolLM2 takes ~150 MiB as shipped: the pinned one
# and two others fit, a third evicts one (the files are served as they are: re-typed to q4_0,
# llama.cpp repacks the weights into memory of the process, and fewer would fit)
BUDGET_MB = 560


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("pool")
    srv = start_server(home, "--context", "256", "--sequences", "2", "--weights", "native",
                       "--memory-budget", f"{BUDGET_MB}M",
                       extra_env={"AICLOUD_MIN_RESIDENCY": "0", "AICLOUD_LOAD_WAIT": "2"})
    srv.keys["alpha"] = srv.new_key("alpha")
    yield srv
    srv.stop()


def admin(server: Server) -> httpx.Client:
    """Server.admin() makes a new admin key (a CLI run) at every call: one is enough."""
    if "admin" not in server.keys:
        server.keys["admin"] = server.admin_key()
    return server.admin(server.keys["admin"])


def add(server: Server, model_id: str, source: str = BUNDLED, **fields: Any) -> dict[str, Any]:
    with admin(server) as client:
        resp = client.post("/models", json={"id": model_id, "source": source, **fields})
    assert resp.status_code == 201, resp.text
    added: dict[str, Any] = resp.json()
    return added


def model(server: Server, model_id: str) -> dict[str, Any]:
    with admin(server) as client:
        resp = client.get(f"/models/{model_id}")
    assert resp.status_code == 200, resp.text
    shown: dict[str, Any] = resp.json()
    return shown


def chat(server: Server, model_id: str, max_tokens: int = 4,
         headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/chat/completions", timeout=120, json={
        "model": model_id, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "Say hello."}]},
        headers={"Authorization": f"Bearer {server.keys['alpha']}", **(headers or {})})


def metric(server: Server, name: str, default: float = 0.0, **labels: str) -> float:
    """The value of one sample of /metrics (`default` when it is not there)."""
    with admin(server) as client:
        text = httpx.get(server.base_url + "/metrics",
                         headers={"Authorization": client.headers["authorization"]}).text
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if head == (f"{name}{{{wanted}}}" if labels else name):
            return float(value)
    return default


def wait_for(condition: Any, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.1)


def unload_unpinned(server: Server) -> None:
    """Start from a pool holding only the pinned model."""
    with admin(server) as client:
        for m in client.get("/models").json()["data"]:
            if not m["pinned"] and m["state"] == "ready":
                assert client.post(f"/models/{m['id']}/unload").status_code == 200


def states(server: Server, *ids: str) -> dict[str, str]:
    return {i: model(server, i)["state"] for i in ids}


def test_a_catalog_model_is_listed_before_it_loads_and_loads_on_its_first_request(
        server: Server) -> None:
    add(server, "cold-1", options={"weights": "q8_0"})  # re-typed once into q8_0
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key=server.keys["alpha"],
                           max_retries=0)
    assert "cold-1" in [m.id for m in client.models.list()]
    assert model(server, "cold-1")["state"] == "unloaded"
    answer = client.chat.completions.create(
        model="cold-1", max_tokens=4, messages=[{"role": "user", "content": "Say hello."}])
    assert answer.choices[0].message.content
    shown = model(server, "cold-1")
    assert shown["state"] == "ready" and shown["memory_measured"]
    assert shown["memory_bytes"] > 50 << 20  # weights, KV and buffers: measured, not zero
    assert metric(server, "aicloud_model_loads_total", model="cold-1", outcome="ok") == 1
    assert metric(server, "aicloud_cold_start_time_to_first_token_seconds_count",
                  model="cold-1") == 1
    assert metric(server, "aicloud_model_load_seconds_count", model="cold-1") == 1
    health = httpx.get(server.base_url + "/healthz").json()
    assert health["models"]["cold-1"]["state"] == "ready"
    assert health["models"][PINNED]["state"] == "ready"


def test_concurrent_first_requests_load_the_model_once(server: Server) -> None:
    add(server, "cold-2")
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(chat(server, "cold-2")
                                                              .status_code))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == [200] * 4
    assert metric(server, "aicloud_model_loads_total", model="cold-2", outcome="ok") == 1


def test_the_least_recently_used_model_is_evicted_and_the_pinned_one_never(
        server: Server) -> None:
    unload_unpinned(server)
    for m in ("lru-a", "lru-b", "lru-c"):
        add(server, m)
    for m in ("lru-a", "lru-b", "lru-a"):  # lru-b is now the least recently used
        assert chat(server, m).status_code == 200
    assert chat(server, "lru-c").status_code == 200  # a fourth SmolLM2 does not fit
    assert states(server, "lru-a", "lru-b", "lru-c", PINNED) == {
        "lru-a": "ready", "lru-b": "unloaded", "lru-c": "ready", PINNED: "ready"}
    assert metric(server, "aicloud_model_evictions_total", model="lru-b",
                  reason="evicted") == 1
    assert metric(server, "aicloud_model_evictions_total", model=PINNED,
                  reason="evicted") == 0
    assert metric(server, "aicloud_pool_memory_used_bytes") <= BUDGET_MB << 20
    # what the process holds beyond the models' counts (counted against the budget too)
    assert metric(server, "aicloud_pool_memory_unaccounted_bytes", default=-1) >= 0


def test_keep_alive_per_request_unloads_an_idle_model(server: Server) -> None:
    add(server, "brief")
    bad = chat(server, "brief", headers={"X-Keep-Alive": "soon"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-Keep-Alive"
    assert chat(server, "brief", headers={"X-Keep-Alive": "-1"}).status_code == 400
    assert chat(server, "brief", headers={"X-Keep-Alive": "0"}).status_code == 200
    wait_for(lambda: model(server, "brief")["state"] == "unloaded", 10)
    assert metric(server, "aicloud_model_evictions_total", model="brief",
                  reason="keep_alive") == 1
    # per model: the catalog's keep_alive
    add(server, "brief-2", keep_alive=0.5)
    assert chat(server, "brief-2").status_code == 200
    wait_for(lambda: model(server, "brief-2")["state"] == "unloaded", 10)


def stream_all(server: Server, name: str, tokens: int, first_chunk: threading.Event,
               outcome: dict[str, Any]) -> None:
    """A streamed chat of exactly `tokens` tokens (no end-of-text token can be sampled);
    sets `first_chunk` at its first chunk and fills `outcome` once it has ended."""
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", timeout=120,
                      headers={"Authorization": f"Bearer {server.keys['alpha']}"},
                      json={"model": name, "max_tokens": tokens, "stream": True,
                            "stream_options": {"include_usage": True},
                            "logit_bias": {"0": -100, "1": -100, "2": -100},
                            "messages": [{"role": "user",
                                          "content": "Count from one to one hundred."}]},
                      ) as resp:
        text, finish, usage, done = "", None, None, False
        for line in resp.iter_lines():
            done = done or line == "data: [DONE]"
            if not line.startswith("data: {"):
                continue
            first_chunk.set()
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk["choices"]:
                text += choice["delta"].get("content") or ""
                finish = choice["finish_reason"] or finish
        outcome.update(status=resp.status_code, text=text, finish=finish, usage=usage,
                       done=done)


def test_eviction_never_cuts_a_running_request(server: Server) -> None:
    unload_unpinned(server)
    for m in ("run-a", "run-b", "run-c"):
        add(server, m)
    first_chunk = threading.Event()
    outcome: dict[str, Any] = {}

    def long_stream() -> None:
        stream_all(server, "run-a", 100, first_chunk, outcome)

    assert chat(server, "run-b").status_code == 200
    streaming = threading.Thread(target=long_stream)
    streaming.start()
    assert first_chunk.wait(60)
    # run-a is now the least recently used, but busy: loading run-c evicts run-b instead
    assert chat(server, "run-b").status_code == 200
    assert chat(server, "run-c").status_code == 200
    assert not outcome, "the stream ended before the load it was to survive"
    streaming.join(120)
    assert outcome["status"] == 200 and outcome["finish"] == "length"
    assert outcome["text"]
    assert metric(server, "aicloud_model_evictions_total", model="run-a",
                  reason="evicted") == 0
    assert states(server, "run-a", "run-b", "run-c") == {
        "run-a": "ready", "run-b": "unloaded", "run-c": "ready"}


def test_an_admin_unload_waits_for_a_stream_to_end(server: Server) -> None:
    """The stream's request holds its model until its last byte: the unload drains it
    (counted once in flight) and the stream completes whole."""
    unload_unpinned(server)
    add(server, "drain-a")
    assert chat(server, "drain-a").status_code == 200
    first_chunk = threading.Event()
    outcome: dict[str, Any] = {}

    def long_stream() -> None:
        stream_all(server, "drain-a", 160, first_chunk, outcome)

    unloaded: dict[str, Any] = {}

    def unload() -> None:
        with admin(server) as client:
            unloaded["status"] = client.post("/models/drain-a/unload").status_code

    streaming = threading.Thread(target=long_stream)
    streaming.start()
    assert first_chunk.wait(60)
    unloading = threading.Thread(target=unload)
    unloading.start()
    seen: list[tuple[str, int]] = []
    while streaming.is_alive() and not unloaded:  # bounded by the stream's own end
        shown = model(server, "drain-a")
        seen.append((shown["state"], shown["in_flight"]))
    streaming.join(120)
    unloading.join(120)
    assert outcome["status"] == 200 and outcome["done"] and outcome["finish"] == "length"
    assert outcome["text"] and outcome["usage"]["completion_tokens"] == 160
    assert unloaded["status"] == 200
    assert model(server, "drain-a")["state"] == "unloaded"
    assert ("draining", 1) in seen, seen  # the unload waited for the running stream
    assert all(n <= 1 for _, n in seen), seen  # one request: counted once


def write_gguf(path: Path, **numbers: int) -> str:
    """A GGUF with a llama header and no tensors: it parses, but no model loads from it."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(numbers.get("layers", 1))
    writer.add_embedding_length(numbers.get("embedding", 64))
    writer.add_head_count(numbers.get("heads", 4))
    writer.add_head_count_kv(numbers.get("heads", 4))
    writer.add_context_length(numbers.get("context", 128))
    writer.add_vocab_size(numbers.get("vocab", 256))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def test_a_model_that_fails_to_load_is_marked_failed_and_the_others_serve(
        server: Server, tmp_path: Path) -> None:
    add(server, "broken", write_gguf(tmp_path / "broken.gguf"))
    refused = chat(server, "broken")
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
    assert "could not be loaded" in refused.json()["error"]["message"]
    assert str(tmp_path) not in refused.text  # the reason names files: admins only
    shown = model(server, "broken")
    assert shown["state"] == "failed" and "could not load broken.gguf" in shown["error"]
    assert chat(server, PINNED).status_code == 200  # the others keep serving
    # a GGUF that claims more than the budget holds fails before a byte is loaded
    add(server, "huge", write_gguf(tmp_path / "huge.gguf", layers=4096, embedding=65536,
                                   heads=64, context=4096))
    assert chat(server, "huge").status_code == 503
    assert "more than the whole memory budget" in model(server, "huge")["error"]
    health = httpx.get(server.base_url + "/healthz").json()
    assert health["status"] == "degraded" and health["models"]["broken"]["state"] == "failed"
    assert "error" not in health["models"]["broken"]
    admin(server).close()
    listing = server.cli("models", "list", "--url", server.base_url,
                         "--admin-key", server.keys["admin"])
    assert "failed: llama.cpp could not load broken.gguf" in listing
    with admin(server) as client:
        assert client.delete("/models/broken").status_code == 200
        assert client.delete("/models/huge").status_code == 200
    wait_for(lambda: httpx.get(server.base_url + "/healthz").json()["status"] == "ok", 10)


def test_models_are_added_and_removed_through_the_admin_api_while_serving(
        server: Server) -> None:
    add(server, "live", aliases=["live-alias"],
        prices={"input": "1", "output": "2"})
    time.sleep(2.1)  # the server re-reads prices every 2 s
    answer = chat(server, "live-alias")
    assert answer.status_code == 200
    # billed as the model it is, at its price, whichever of its names the caller used
    assert answer.json()["model"] == "live"
    usage = answer.json()["usage"]
    cost = usage["prompt_tokens"] * 1_000_000 + usage["completion_tokens"] * 2_000_000
    vectors = httpx.post(server.base_url + "/v1/embeddings", timeout=120,
                         json={"model": "live-alias", "input": "hello"},
                         headers={"Authorization": f"Bearer {server.keys['alpha']}"})
    assert vectors.status_code == 200 and vectors.json()["model"] == "live"
    cost += vectors.json()["usage"]["prompt_tokens"] * 1_000_000
    with admin(server) as client:
        assert client.get("/prices").json()["data"][-1]["model"] == "live"
        rows = client.get("/usage", params={"model": "live", "group_by": "model"}).json()
        assert [(r["model"], r["requests"]) for r in rows["data"]] == [("live", 2)]
        assert rows["data"][0]["cost_usd"] == format(cost / 10**12, ".12f").rstrip("0")
        removed = client.delete("/models/live")
        assert removed.status_code == 200 and removed.json()["id"] == "live"
        assert client.get("/models/live").status_code == 404
    gone = chat(server, "live")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    listed = httpx.get(server.base_url + "/v1/models",
                       headers={"Authorization": f"Bearer {server.keys['alpha']}"}).json()
    assert "live" not in [m["id"] for m in listed["data"]]
    with admin(server) as client:
        dup = client.post("/models", json={"id": PINNED, "source": BUNDLED})
        assert dup.status_code == 400 and dup.json()["error"]["param"] == "id"
        dev = client.post("/models", json={"id": "dev", "source": "/dev/zero"})
        assert dev.status_code == 400 and dev.json()["error"]["param"] == "source"


def test_models_of_other_organizations_are_hidden(server: Server) -> None:
    add(server, "private", organizations=["org_someone_else"])
    listed = httpx.get(server.base_url + "/v1/models",
                       headers={"Authorization": f"Bearer {server.keys['alpha']}"}).json()
    assert "private" not in [m["id"] for m in listed["data"]]
    assert chat(server, "private").status_code == 404


def test_the_cli_adds_pins_and_removes_models(server: Server) -> None:
    added = json.loads(server.cli("models", "add", "cli-m", "--path", BUNDLED, "--pin",
                                  "--alias", "cli-alias", "--keep-alive", "60"))
    assert added["id"] == "cli-m" and added["aliases"] == ["cli-alias"] and added["pinned"]
    wait_for(lambda: model(server, "cli-m")["state"] == "ready", 30)  # pinned: loaded
    shown = json.loads(server.cli("models", "show", "cli-alias", "--url", server.base_url))
    assert shown["pinned"] and shown["state"] == "ready"
    server.cli("models", "remove", "cli-m")
    wait_for(lambda: "cli-m" not in httpx.get(server.base_url + "/healthz").json()["models"])


def test_a_models_fields_and_prices_change_through_the_admin_api_and_the_cli(
        server: Server) -> None:
    add(server, "editable", aliases=["ed-old"], options={"context": 256})
    with admin(server) as client:
        changed = client.patch("/models/ed-old", json={
            "aliases": ["ed-new"], "keep_alive": 42, "options": {"sequences": 1},
            "organizations": ["org_nobody"], "prices": {"input": "3", "output": "4"}})
        assert changed.status_code == 200, changed.text
        shown = changed.json()
        assert (shown["id"], shown["aliases"], shown["keep_alive"], shown["organizations"]) \
            == ("editable", ["ed-new"], 42.0, ["org_nobody"])
        assert shown["options"] == {"context": 256, "sequences": 1}  # merged
        prices = {p["model"]: p for p in client.get("/prices").json()["data"]}
        assert prices["editable"]["output_per_million"] == "4"
        assert chat(server, "editable").status_code == 404  # not for alpha's organization
        back = client.patch("/models/editable", json={"organizations": None,
                                                      "keep_alive": None})
        assert (back.json()["organizations"], back.json()["keep_alive"]) == (None, None)
        assert chat(server, "ed-new").status_code == 200
        assert chat(server, "ed-old").status_code == 404
        for body, field in (({"source": None}, "source"), ({"source": "/dev/zero"}, "source"),
                            ({"aliases": [PINNED]}, "aliases"), ({"colour": 1}, "colour"),
                            ({"keep_alive": -1}, "keep_alive")):
            refused = client.patch("/models/editable", json=body)
            assert refused.status_code == 400, (body, refused.text)
            assert refused.json()["error"]["param"] == field, (body, refused.text)
        assert client.patch("/models/nothing", json={"keep_alive": 1}).status_code == 404
    updated = json.loads(server.cli("models", "update", "editable", "--alias", "ed-cli",
                                    "--weights", "native", "--keep-alive", "7",
                                    "--input-price", "5", "--output-price", "6"))
    assert updated["aliases"] == ["ed-cli"] and updated["keep_alive"] == 7.0
    assert updated["options"] == {"context": 256, "sequences": 1, "weights": "native"}
    with admin(server) as client:
        prices = {p["model"]: p for p in client.get("/prices").json()["data"]}
        assert prices["editable"]["output_per_million"] == "6"
    half = subprocess.run([sys.executable, "-m", "aicloud", "models", "update", "editable",
                           "--input-price", "1"], env=server.env, capture_output=True, text=True)
    assert half.returncode != 0 and "--output-price" in half.stderr
    wait_for(lambda: chat(server, "ed-cli").status_code == 200, 10)
    with admin(server) as client:
        assert client.delete("/models/editable").status_code == 200
