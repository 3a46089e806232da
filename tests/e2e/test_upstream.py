"""Partner models through a live server, with the official openai client: a fake provider
on 127.0.0.1 (tests/providers/fake.py) as the upstream, the provider added with the CLI
(its key from stdin, a canary), upstream models put into the catalog before the start.

Checked: streamed and whole answers, tools and JSON schema passed through, usage equal
to the provider's and cost = usage x price in the ledger (with the provider's name),
estimated counts marked, fallbacks (to another provider model and to a local model), a
cut stream, a client that leaves, no overspend under 50 concurrent requests, per-provider
metrics, the admin API, and the canary key in no log line or body.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from aicloud.models.catalog import Catalog, CatalogEntry, EngineKind, bundled_model
from aicloud.store import db, migrate
from tests.conftest import Server, start_server
from tests.providers.fake import RunningFake, running_fake

LOCAL = "smollm2-135m-instruct"
CANARY = "sk-partner-CANARY-e2e-90af31"
HEADER_CANARY = "hdr-CANARY-4411"
HELLO = [{"role": "user", "content": "say hello to me"}]  # 4 words: 7 prompt tokens upstream
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
MODELS = {  # catalog id: (the fake's model, fallbacks)
    "partner": ("fake", []),
    "partner-nousage": ("fake-nousage", []),
    "partner-cut": ("fake-cut", []),
    "partner-slow": ("fake-slow", []),
    "partner-echo": ("fake-echo", []),
    "partner-down": ("fake-500", ["partner"]),
    "partner-down-local": ("fake-500", ["not-there", LOCAL]),
    "partner-counted": ("fake-nousage", []),
}
# counts with the bundled model's tokenizer when the provider sends no usage
TOKENIZED = {"partner-counted": {"tokenizer": str(bundled_model().path)}}
EMBED_INPUTS = ["the quick brown fox", "jumps"]  # 5 words: the fake's prompt_tokens


def add_catalog(home: Path, entries: list[CatalogEntry]) -> None:
    url = f"sqlite:///{home / 'aicloud.db'}"
    migrate.upgrade(url)

    async def go() -> None:
        engine = db.create_engine_async(url)
        try:
            catalog = Catalog(db.session_factory(engine))
            for entry in entries:
                await catalog.add(entry)
        finally:
            await engine.dispose()

    asyncio.run(go())


def cli(env: dict[str, str], *args: str, stdin: str = "") -> str:
    return subprocess.run([sys.executable, "-m", "aicloud", *args], env=env, input=stdin,
                          capture_output=True, text=True, timeout=60, check=True).stdout


@pytest.fixture(scope="module")
def fake() -> Iterator[RunningFake]:
    with running_fake() as running:
        yield running


@pytest.fixture(scope="module")
def server(fake: RunningFake, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("upstream-home")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AICLOUD_")},
           "AICLOUD_HOME": str(home)}
    out = cli(env, "providers", "add", "fake", "--base-url", fake.base_url, "--api-key-stdin",
              "--header", f"X-Tenant={HEADER_CANARY}", "--timeout", "2", "--retries", "1",
              stdin=CANARY + "\n")
    assert CANARY not in out and json.loads(out)["has_api_key"] is True
    add_catalog(home, [CatalogEntry(mid, EngineKind.UPSTREAM, provider="fake",
                                    upstream_model=upstream, options={
                                        "fallbacks": fallbacks, "context": 4096,
                                        **TOKENIZED.get(mid, {})})
                       for mid, (upstream, fallbacks) in MODELS.items()])
    srv = start_server(home, "--context", "512", "--sequences", "4",
                       extra_env={"AICLOUD_LOG_LEVEL": "debug"})
    srv.keys["up"] = srv.new_key("upstream")
    with srv.admin() as admin:
        for model in MODELS:
            assert admin.put(f"/prices/{model}", json={"input_per_million": 1,
                                                       "output_per_million": 2}
                             ).status_code == 200
    yield srv
    srv.stop()


@pytest.fixture
def client(server: Server, fake: RunningFake) -> openai.OpenAI:
    fake.reset()
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=server.keys["up"],
                         max_retries=0, timeout=60)


def usage_row(server: Server, request_id: str, wait: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + wait
    while True:
        with sqlite3.connect(server.db) as conn:
            conn.row_factory = sqlite3.Row
            row = conn.execute("SELECT * FROM usage WHERE request_id = ?",
                               (request_id,)).fetchone()
        if row is not None:
            return dict(row)
        if time.monotonic() > deadline:
            raise AssertionError(f"no usage row for {request_id}")
        time.sleep(0.1)


def cost(prompt: int, completion: int) -> int:
    """$1 / $2 per million tokens, in picodollars."""
    return prompt * 1_000_000 + completion * 2_000_000


def test_a_whole_answer_bills_the_providers_usage_at_our_price(
        client: openai.OpenAI, server: Server, fake: RunningFake) -> None:
    resp = client.chat.completions.create(model="partner", messages=HELLO, max_tokens=20)
    assert resp.model == "partner"
    assert resp.choices[0].message.content == "Hello from the fake provider."
    assert resp.choices[0].finish_reason == "stop"
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (7, 6)
    row = usage_row(server, resp.id)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (7, 6)
    assert row["provider"] == "fake" and row["estimated"] == 0
    assert row["cost_pico"] == cost(7, 6)
    sent = fake.received()[-1]
    assert sent["model"] == "fake" and sent["stream_options"] == {"include_usage": True}
    assert sent["body"]["max_tokens"] == 20 and sent["body"]["messages"] == HELLO


def test_a_stream_is_relayed_chunk_by_chunk_with_usage(client: openai.OpenAI,
                                                       server: Server) -> None:
    chunks = list(client.chat.completions.create(
        model="partner", messages=HELLO, max_tokens=20, stream=True,
        stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices]
    assert pieces == ["Hello", " from", " the", " fake", " provider", "."]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    assert {c.id for c in chunks} == {chunks[0].id}
    row = usage_row(server, chunks[0].id)
    assert row["completion_tokens"] == 6 and row["cost_pico"] == cost(7, 6)


def test_tools_and_json_schema_pass_through(client: openai.OpenAI, fake: RunningFake) -> None:
    resp = client.chat.completions.create(model="partner", messages=HELLO, tools=[WEATHER_TOOL],
                                          tool_choice="auto", max_tokens=20)
    call = resp.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert resp.choices[0].finish_reason == "tool_calls"
    assert fake.received()[-1]["body"]["tools"] == [WEATHER_TOOL]
    assert fake.received()[-1]["body"]["tool_choice"] == "auto"

    stream = client.chat.completions.create(model="partner", messages=HELLO, stream=True,
                                            tools=[WEATHER_TOOL], max_tokens=20)
    arguments = "".join(c.choices[0].delta.tool_calls[0].function.arguments or ""
                        for c in stream if c.choices and c.choices[0].delta.tool_calls)
    assert json.loads(arguments) == {"city": "Paris"}

    schema = {"type": "json_schema", "json_schema": {"name": "answer", "strict": True, "schema": {
        "type": "object", "properties": {"a": {"type": "integer"}}}}}
    resp = client.chat.completions.create(model="partner", messages=HELLO, max_tokens=20,
                                          response_format=schema)  # type: ignore[arg-type]
    assert json.loads(resp.choices[0].message.content or "") == {"schema": "answer"}
    assert fake.received()[-1]["body"]["response_format"] == schema


def test_text_completions_are_relayed_too(client: openai.OpenAI, server: Server) -> None:
    resp = client.completions.create(model="partner", prompt="say hello", max_tokens=10)
    assert resp.choices[0].text == "Hello from the fake provider."
    assert usage_row(server, resp.id)["completion_tokens"] == 6


def test_responses_and_embeddings_on_a_provider_model(client: openai.OpenAI,
                                                      server: Server) -> None:
    resp = client.responses.create(model="partner", input="say hello to me",
                                   max_output_tokens=20)
    assert resp.output_text == "Hello from the fake provider."
    assert usage_row(server, resp.id)["provider"] == "fake"


def test_embeddings_are_relayed_and_bill_the_providers_usage(
        client: openai.OpenAI, server: Server, fake: RunningFake) -> None:
    raw = client.embeddings.with_raw_response.create(model="partner", input=EMBED_INPUTS,
                                                     dimensions=4)
    resp = raw.parse()  # the openai client asks for base64 and decodes it
    assert resp.model == "partner"
    assert [d.embedding for d in resp.data] == [[19.0, 0.0, 0.5, -0.25],
                                                [5.0, 1.0, 0.5, -0.25]]
    assert (resp.usage.prompt_tokens, resp.usage.total_tokens) == (5, 5)
    row = usage_row(server, raw.headers["x-request-id"])
    assert (row["prompt_tokens"], row["completion_tokens"], row["provider"],
            row["estimated"]) == (5, 0, "fake", 0)
    assert row["cost_pico"] == cost(5, 0) and row["model"] == "partner"
    sent = fake.received()[-1]["body"]
    assert sent["model"] == "fake" and sent["input"] == EMBED_INPUTS
    assert sent["dimensions"] == 4 and "stream" not in sent

    floats = client.embeddings.create(model="partner", input=[1, 2, 3],
                                      encoding_format="float")
    assert floats.data[0].embedding == [3.0, 0.0, 0.5, -0.25]


def test_embeddings_fall_back_and_refusals_are_openai_shaped(
        client: openai.OpenAI, server: Server) -> None:
    raw = client.embeddings.with_raw_response.create(model="partner-down", input="hi there")
    assert raw.parse().model == "partner"
    assert usage_row(server, raw.headers["x-request-id"])["provider"] == "fake"
    local = client.embeddings.create(model="partner-down-local", input="hi there")
    assert local.model == LOCAL and len(local.data[0].embedding) > 4  # the model's own
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="partner-echo", input="hi")
    body = json.dumps(caught.value.body)
    assert caught.value.code == "upstream_invalid_request" and "bad request" in body
    assert CANARY not in body and HEADER_CANARY not in body and "127.0.0.1" not in body


def test_embeddings_hold_the_budget_before_anything_is_sent(
        server: Server, fake: RunningFake) -> None:
    fake.reset()
    with server.admin() as admin:
        org = admin.post("/organizations", json={"name": "embed-poor"}).json()
        project = admin.post("/projects", json={"organization_id": org["id"], "name": "p",
                                                "budget_usd": "0.000001"}).json()
        secret = admin.post("/keys", json={"project_id": project["id"]}).json()["secret"]
    poor = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=secret, max_retries=0)
    with pytest.raises(openai.RateLimitError) as caught:  # 2 bytes fit; 2,000 do not
        poor.embeddings.create(model="partner", input="x" * 2000)
    assert caught.value.code == "insufficient_quota"
    assert fake.received() == []


def test_without_usage_the_models_tokenizer_counts_as_the_local_model_does(
        client: openai.OpenAI, server: Server) -> None:
    """partner-counted names the bundled GGUF as its tokenizer: its counts are exact (not
    marked), equal to what the bundled model itself counts for the same request."""
    resp = client.chat.completions.create(model="partner-counted", messages=HELLO,
                                          max_tokens=20)
    local = client.chat.completions.create(model=LOCAL, messages=HELLO, max_tokens=1)
    row = usage_row(server, resp.id)
    assert row["estimated"] == 0 and row["provider"] == "fake"
    assert row["prompt_tokens"] == local.usage.prompt_tokens == resp.usage.prompt_tokens
    answer = resp.choices[0].message.content or ""
    # the bundled model adds no BOS: a completion's prompt is the text's own tokens
    alone = client.completions.create(model=LOCAL, prompt=answer, max_tokens=1)
    assert row["completion_tokens"] == alone.usage.prompt_tokens == 6

    raw = client.embeddings.with_raw_response.create(model="partner-counted",
                                                     input=EMBED_INPUTS)
    own = client.embeddings.create(model=LOCAL, input=EMBED_INPUTS)
    row = usage_row(server, raw.headers["x-request-id"])
    assert row["estimated"] == 0 and row["prompt_tokens"] == own.usage.prompt_tokens


def test_a_bad_tokenizer_is_refused_by_models_add(server: Server, tmp_path: Path) -> None:
    """Refused when the model is added (CLI and admin API), not at its first request."""
    bad = tmp_path / "vocab.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 32)  # a header and nothing llama.cpp can read
    failed = subprocess.run(
        [sys.executable, "-m", "aicloud", "models", "add", "tok-cli", "--provider", "fake",
         "--upstream-model", "fake", "--tokenizer", str(bad)], env=server.env,
        capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1
    assert "options.tokenizer" in failed.stderr and "cannot read" in failed.stderr
    added = json.loads(server.cli("models", "add", "tok-cli", "--provider", "fake",
                                  "--upstream-model", "fake", "--fallback", "partner",
                                  "--tokenizer", str(bundled_model().path)))
    assert added["options"] == {"tokenizer": str(bundled_model().path),
                                "fallbacks": ["partner"]}
    with server.admin() as admin:
        refused = admin.post("/models", json={
            "id": "tok-api", "engine": "upstream", "provider": "fake",
            "upstream_model": "fake", "options": {"tokenizer": str(tmp_path / "none.gguf")}})
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "options.tokenizer"
        assert "not found" in refused.json()["error"]["message"]
        assert admin.delete("/models/tok-cli").status_code == 200


def test_without_usage_the_row_is_marked_estimated(client: openai.OpenAI,
                                                   server: Server) -> None:
    resp = client.chat.completions.create(model="partner-nousage", messages=HELLO,
                                          max_tokens=20)
    row = usage_row(server, resp.id)
    assert row["estimated"] == 1 and row["provider"] == "fake"
    assert row["completion_tokens"] >= 6 and row["prompt_tokens"] > 0
    assert row["cost_pico"] == cost(row["prompt_tokens"], row["completion_tokens"])


def test_a_provider_that_is_down_falls_back(client: openai.OpenAI, server: Server) -> None:
    resp = client.chat.completions.create(model="partner-down", messages=HELLO, max_tokens=20)
    assert resp.model == "partner"
    assert resp.choices[0].message.content == "Hello from the fake provider."
    assert usage_row(server, resp.id)["provider"] == "fake"

    resp = client.chat.completions.create(model="partner-down-local", messages=HELLO,
                                          max_tokens=4, temperature=0)
    assert resp.model == LOCAL and resp.choices[0].message.content
    row = usage_row(server, resp.id)
    assert row["provider"] is None and row["model"] == LOCAL


def test_a_stream_cut_midway_ends_with_an_error_and_bills_what_came(
        client: openai.OpenAI, server: Server) -> None:
    with pytest.raises(openai.APIError) as caught:
        for _ in client.chat.completions.create(model="partner-cut", messages=HELLO,
                                                max_tokens=20, stream=True):
            pass
    assert "broke off" in str(caught.value)
    with sqlite3.connect(server.db) as conn:
        status, completion, estimated, provider = conn.execute(
            "SELECT status, completion_tokens, estimated, provider FROM usage "
            "WHERE model = 'partner-cut' ORDER BY id DESC LIMIT 1").fetchone()
    assert (status, estimated, provider) == ("error", 1, "fake") and completion >= 2


def test_a_client_that_leaves_closes_the_upstream_request_and_is_billed(
        server: Server, fake: RunningFake) -> None:
    fake.reset()
    body = {"model": "partner-slow", "messages": HELLO, "stream": True}
    headers = {"Authorization": f"Bearer {server.keys['up']}"}
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body,
                      headers=headers, timeout=30) as resp:
        seen = 0
        for line in resp.iter_lines():
            seen += line.startswith("data: ")
            if seen == 3:
                break
    deadline = time.monotonic() + 10
    while fake.app.disconnects == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake.app.disconnects == 1
    time.sleep(0.5)
    with sqlite3.connect(server.db) as conn:
        status, completion = conn.execute(
            "SELECT status, completion_tokens FROM usage WHERE model = 'partner-slow' "
            "ORDER BY id DESC LIMIT 1").fetchone()
    assert status == "cancelled" and 3 <= completion < 200


def in_flight(server: Server, model: str) -> int:
    with server.admin() as admin:
        shown = admin.get(f"/models/{model}")
    assert shown.status_code == 200, shown.text
    return int(shown.json()["in_flight"])


def until_in_flight(server: Server, model: str, wanted: int, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    seen: list[int] = []
    while not seen or seen[-1] != wanted:
        assert time.monotonic() < deadline, f"in_flight was {sorted(set(seen))}, not {wanted}"
        seen.append(in_flight(server, model))
        time.sleep(0.05)


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"messages": HELLO}),
    ("/v1/completions", {"prompt": "say hello to me", "max_tokens": 500}),
    ("/v1/responses", {"input": "say hello to me"}),
])
def test_a_relayed_stream_counts_once_in_flight_until_it_ends(
        server: Server, fake: RunningFake, path: str, body: dict[str, Any]) -> None:
    """The request holds its model (a lease, and the provider's stream under it) until
    the last byte or the client leaving, and the admin API counts it as one."""
    fake.reset()
    until_in_flight(server, "partner-slow", 0)
    with httpx.stream("POST", server.base_url + path, timeout=30,
                      json={"model": "partner-slow", "stream": True, **body},
                      headers={"Authorization": f"Bearer {server.keys['up']}"}) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()  # one iterator: dropping it would close the connection
        seen = 0
        for line in lines:
            seen += line.startswith("data: ")
            if seen == 3:
                break
        until_in_flight(server, "partner-slow", 1)
        assert fake.app.disconnects == 0  # still streaming: 200 chunks, 50 ms apart
        assert next(line for line in lines if line.startswith("data: "))
    until_in_flight(server, "partner-slow", 0)  # the client left: released, exactly once


def test_no_overspend_under_50_concurrent_requests(server: Server) -> None:
    with server.admin() as admin:
        org = admin.post("/organizations", json={"name": "tight"}).json()
        project = admin.post("/projects", json={"organization_id": org["id"], "name": "t",
                                                "budget_usd": "0.0002"}).json()
        secret = admin.post("/keys", json={"project_id": project["id"]}).json()["secret"]

        def one(_: int) -> int:
            return httpx.post(server.base_url + "/v1/chat/completions", timeout=60,
                              headers={"Authorization": f"Bearer {secret}"},
                              json={"model": "partner", "messages": HELLO,
                                    "max_tokens": 10}).status_code

        with ThreadPoolExecutor(50) as pool:
            statuses = list(pool.map(one, range(50)))
        assert statuses.count(200) >= 1 and statuses.count(429) >= 1
        assert statuses.count(200) + statuses.count(429) == 50
        usage = admin.get("/usage", params={"project_id": project["id"],
                                            "group_by": "project"}).json()["data"]
        assert usage[0]["requests"] == statuses.count(200)
        assert 0 < float(usage[0]["cost_usd"]) <= 0.0002


def test_errors_from_the_provider_are_openai_shaped_and_hold_no_secret(
        client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="partner-echo", messages=HELLO, max_tokens=5)
    body = json.dumps(caught.value.body)
    assert "bad request" in body
    assert CANARY not in body and HEADER_CANARY not in body and "127.0.0.1" not in body


def test_admin_api_and_metrics_per_provider(server: Server, fake: RunningFake) -> None:
    with server.admin() as admin:
        made = admin.post("/providers", json={"name": "other", "base_url": fake.base_url,
                                              "api_key": CANARY, "retries": 0})
        assert made.status_code == 201, made.text
        assert made.json()["has_api_key"] is True and CANARY not in made.text
        listed = admin.get("/providers")
        assert {p["name"] for p in listed.json()["data"]} >= {"fake", "other"}
        assert CANARY not in listed.text and HEADER_CANARY not in listed.text
        assert admin.get("/providers/fake").json()["header_names"] == ["X-Tenant"]
        patched = admin.patch("/providers/other", json={"timeout": 9})
        assert patched.json()["timeout"] == 9
        assert admin.post("/providers", json={"name": "bad", "base_url": "https://u:p@x/v1"}
                          ).status_code == 400
        assert admin.delete("/providers/other").status_code == 200
        assert admin.get("/providers/other").status_code == 404
        metrics = httpx.get(server.base_url + "/metrics", headers=admin.headers).text
    assert 'aicloud_provider_requests_total{provider="fake",outcome="ok"}' in metrics
    assert 'aicloud_provider_breaker_state{provider="fake"}' in metrics
    assert 'aicloud_provider_first_byte_seconds_count{provider="fake"}' in metrics


def test_z_a_providers_long_retry_after_reaches_the_caller(client: openai.OpenAI,
                                                           fake: RunningFake) -> None:
    """Near the end: the 429 opens the provider's breaker for its Retry-After."""
    fake.fail_next(5, 429, "30")
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="partner", messages=HELLO, max_tokens=5)
    assert caught.value.status_code == 503
    assert caught.value.response.headers["retry-after"] == "30"
    assert len(fake.received()) == 1  # not retried: longer than we wait
    fake.reset()


def test_zz_the_canary_key_is_in_no_log_line(server: Server) -> None:
    """Last in the module: every request above has logged what it logs (at DEBUG)."""
    log = server.log.read_text()
    assert "HTTP Request" in log or "chat/completions" in log  # the log is not empty
    assert CANARY not in log and HEADER_CANARY not in log
