"""Details real clients rely on: the role delta of an empty stream, refusals OpenAI makes,
`x-request-id`, `GET /v1/models/{id}`, Azure's `api-key` header and CORS."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import Server, start_server
from tests.e2e.test_errors import assert_error

MODEL = "smollm2-135m-instruct"
HELLO = [{"role": "user", "content": "Say hello to the world in one short sentence."}]
CHAT = {"model": MODEL, "messages": HELLO, "max_tokens": 2}


@pytest.fixture
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=server.keys["alpha"],
                         max_retries=0, timeout=120)


@pytest.fixture
def http(server: Server) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {server.keys['alpha']}"}
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=60) as c:
        yield c


def test_an_empty_streamed_answer_still_says_it_is_the_assistants(
        client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8,
                                            temperature=0).choices[0].message.content
    stop = answer[:2]  # the answer stops before its first character
    chunks = [c for c in client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=8, temperature=0, stop=[stop], stream=True)
        if c.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""
    assert chunks[-1].choices[0].finish_reason == "stop"
    with client.chat.completions.stream(model=MODEL, messages=HELLO, max_tokens=8,
                                        temperature=0, stop=[stop]) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.role == "assistant"
    assert not final.choices[0].message.content


def test_stream_options_need_stream(http: httpx.Client) -> None:
    resp = http.post("/v1/chat/completions",
                     json={**CHAT, "stream_options": {"include_usage": True}})
    assert_error(resp, 400, param="stream_options")
    resp = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2,
                                              "stream_options": {"include_usage": True}})
    assert_error(resp, 400, param="stream_options")


def test_five_stop_strings_say_at_most_four(http: httpx.Client) -> None:
    resp = http.post("/v1/chat/completions", json={**CHAT, "stop": list("abcde")})
    err = assert_error(resp, 400, param="stop")
    assert "at most 4" in err["message"]
    assert http.post("/v1/chat/completions", json={**CHAT, "stop": list("abcd")}
                     ).status_code == 200


@pytest.mark.parametrize(("field", "value"), [
    ("modalities", ["text", "audio"]),
    ("modalities", ["audio"]),
    ("prediction", {"type": "content", "content": "Hello"}),
    ("reasoning_effort", "low"),
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("web_search_options", {"search_context_size": "low"}),
    ("verbosity", "low"),
    ("metadata", {"purpose": "test"}),
    ("store", True),
    ("moderation", {"model": "omni-moderation-latest"}),
    ("prompt_cache_options", {"mode": "explicit"}),
    ("prompt_cache_retention", "24h"),
])
def test_fields_not_honoured_are_refused_by_name(http: httpx.Client, field: str,
                                                 value: object) -> None:
    resp = http.post("/v1/chat/completions", json={**CHAT, field: value})
    err = assert_error(resp, 400, param=field)
    assert field in err["message"]


def test_fields_asking_for_nothing_are_accepted(http: httpx.Client) -> None:
    resp = http.post("/v1/chat/completions", json={
        **CHAT, "modalities": ["text"], "store": False, "metadata": None,
        "prediction": None, "reasoning_effort": None, "safety_identifier": "user-1",
        "prompt_cache_key": "thread-9", "prompt_cache_retention": "in_memory"})
    assert resp.status_code == 200, resp.text


def test_every_response_has_a_request_id(client: openai.OpenAI, server: Server) -> None:
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO,
                                                           max_tokens=2)
    assert raw.headers["x-request-id"] == raw.parse().id
    assert raw.parse()._request_id == raw.parse().id
    with client.chat.completions.with_streaming_response.create(
            model=MODEL, messages=HELLO, max_tokens=2, stream=True) as streamed:
        chunk = next(iter(streamed.parse()))
        assert streamed.headers["x-request-id"] == chunk.id
    listed = client.models.with_raw_response.list()
    assert listed.headers["x-request-id"].startswith("req_")
    other = client.models.with_raw_response.list()
    assert other.headers["x-request-id"] != listed.headers["x-request-id"]
    refused = httpx.get(server.base_url + "/v1/models")
    assert refused.status_code == 401 and refused.headers["x-request-id"].startswith("req_")


def test_retrieve_a_model(client: openai.OpenAI, server: Server) -> None:
    model = client.models.retrieve(MODEL)
    assert (model.id, model.object, model.owned_by) == (MODEL, "model", "aicloud")
    with pytest.raises(openai.NotFoundError) as exc:
        client.models.retrieve("no-such-model")
    assert exc.value.code == "model_not_found"
    key = server.cli("keys", "create", "--project", "wire-allow", "--models", "other-model"
                     ).strip().splitlines()[-1]
    narrow = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0)
    assert narrow.models.list().data == []
    with pytest.raises(openai.NotFoundError):  # outside the allow-list: as if absent
        narrow.models.retrieve(MODEL)


def test_azure_api_key_header_is_accepted(server: Server) -> None:
    ok = httpx.get(server.base_url + "/v1/models", headers={"api-key": server.keys["alpha"]})
    assert ok.status_code == 200 and ok.json()["data"][0]["id"] == MODEL
    resp = httpx.post(server.base_url + "/v1/chat/completions", json=CHAT,
                      headers={"api-key": server.keys["alpha"]}, timeout=60)
    assert resp.status_code == 200
    bad = httpx.get(server.base_url + "/v1/models", headers={"api-key": "sk-aic-" + "x" * 43})
    assert_error(bad, 401, "invalid_api_key")


ORIGIN = "https://app.example.com"
PREFLIGHT = {"Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization,content-type"}


@pytest.fixture(scope="module")
def cors_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home: Path = tmp_path_factory.mktemp("aicloud-cors")
    srv = start_server(home, "--context", "256", "--sequences", "2", extra_env={
        "AICLOUD_CORS_ORIGINS": f"{ORIGIN}, http://localhost:3000"})
    srv.keys["alpha"] = srv.new_key("alpha")
    yield srv
    srv.stop()


def test_cors_preflight_and_response_headers(cors_server: Server) -> None:
    url = cors_server.base_url + "/v1/chat/completions"
    pre = httpx.options(url, headers={"Origin": ORIGIN, **PREFLIGHT})
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in pre.headers["access-control-allow-methods"]
    assert "authorization" in pre.headers["access-control-allow-headers"].lower()
    assert pre.headers["x-request-id"].startswith("req_")
    denied = httpx.options(url, headers={"Origin": "https://evil.example", **PREFLIGHT})
    assert denied.status_code == 400
    assert "access-control-allow-origin" not in denied.headers
    resp = httpx.post(url, json=CHAT, timeout=60, headers={
        "Origin": ORIGIN, "Authorization": f"Bearer {cors_server.keys['alpha']}"})
    assert resp.status_code == 200
    assert resp.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in resp.headers["access-control-expose-headers"]


def test_cors_is_off_by_default(server: Server) -> None:
    pre = httpx.options(server.base_url + "/v1/chat/completions",
                        headers={"Origin": ORIGIN, **PREFLIGHT})
    assert "access-control-allow-origin" not in pre.headers
    got = httpx.get(server.base_url + "/healthz", headers={"Origin": ORIGIN})
    assert "access-control-allow-origin" not in got.headers
