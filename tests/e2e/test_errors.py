"""Every refusal is a clean 4xx in OpenAI's error shape, and the server stays up."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import Server

MODEL = "smollm2-135m-instruct"
CHAT = "/v1/chat/completions"
GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture
def http(server: Server) -> httpx.Client:
    headers = {"Authorization": f"Bearer {server.keys['alpha']}"}
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=60) as client:
        yield client


def assert_error(resp: httpx.Response, status: int, code: str | None = None,
                 param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in err["message"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    return err


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer"},
    {"Authorization": "Basic abc"},
    {"Authorization": "Bearer sk-aic-" + "x" * 43},
    {"Authorization": "Bearer ' OR '1'='1"},
    {"Authorization": "Bearer sk-aic-'; DROP TABLE api_keys; --"},
])
def test_bad_or_missing_key_is_401(server: Server, headers: dict[str, str]) -> None:
    for path in ("/v1/models", CHAT):
        resp = httpx.request("GET" if path.endswith("models") else "POST",
                             server.base_url + path, headers=headers, json=GOOD)
        err = assert_error(resp, 401, "invalid_api_key")
        assert "sk-aic-" not in err["message"]


def test_revoked_key_is_refused(server: Server) -> None:
    key = server.new_key("revocable")
    auth = {"Authorization": f"Bearer {key}"}
    assert httpx.get(server.base_url + "/v1/models", headers=auth).status_code == 200
    listed = json.loads(server.cli("keys", "list"))["data"]
    key_id = next(k["id"] for k in listed if key.startswith(k["prefix"]))
    assert "revoked" in server.cli("keys", "revoke", key_id)
    assert_error(httpx.get(server.base_url + "/v1/models", headers=auth), 401, "invalid_api_key")
    after = json.loads(server.cli("keys", "list"))["data"]
    assert next(k["status"] for k in after if k["id"] == key_id) == "revoked"


def test_unknown_model_is_404(http: httpx.Client) -> None:
    assert_error(http.post(CHAT, json={**GOOD, "model": "gpt-17"}), 404, "model_not_found",
                 "model")
    assert_error(http.post("/v1/completions", json={"model": "nope", "prompt": "x"}), 404,
                 "model_not_found")


@pytest.mark.parametrize(("patch", "param"), [
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10**12}, "max_tokens"),
    ({"max_tokens": 5000}, "max_tokens"),  # larger than the 1024-token context
    ({"max_tokens": "many"}, "max_tokens"),
    ({"temperature": 7}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": -3}, "top_k"),
    ({"n": 17}, "n"),
    ({"presence_penalty": 9}, "presence_penalty"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, None),
    ({"messages": "hello"}, "messages"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": ""}, "model"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "string"}}}]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "retrieval"}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
])
def test_invalid_parameters_are_400(http: httpx.Client, patch: dict, param: str | None) -> None:
    assert_error(http.post(CHAT, json={**GOOD, **patch}), 400, param=param)


@pytest.mark.parametrize("raw", [
    '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}',
    '{"model": "%s", "messages": [',
    '[1, 2, 3]',
    '{"model": "%s", "messages": ' + "[" * 50_000 + "]" * 50_000 + "}",
    '\xff\xfe not json',
])
def test_malformed_bodies_are_400(http: httpx.Client, raw: str) -> None:
    body = (raw % MODEL if "%s" in raw else raw).encode("utf-8", "surrogateescape")
    assert_error(http.post(CHAT, content=body, headers={"content-type": "application/json"}),
                 400)


def test_prompt_longer_than_context_is_400(http: httpx.Client) -> None:
    long_text = "The quick brown fox jumps over the lazy dog. " * 400
    err = assert_error(http.post(CHAT, json={**GOOD, "messages": [
        {"role": "user", "content": long_text}]}), 400, "context_length_exceeded")
    assert "1024" in err["message"]
    assert_error(http.post("/v1/completions", json={"model": MODEL, "prompt": long_text}), 400,
                 "context_length_exceeded")


def test_empty_prompts_are_400(http: httpx.Client) -> None:
    for prompt in ("", [], [[]]):
        assert_error(http.post("/v1/completions", json={"model": MODEL, "prompt": prompt}), 400)
    assert_error(http.post("/v1/completions", json={"model": MODEL, "prompt": [10**9]}), 400)


def test_oversized_body_is_413(http: httpx.Client) -> None:
    big = {**GOOD, "messages": [{"role": "user", "content": "x" * 300_000}]}
    assert_error(http.post(CHAT, json=big), 413)

    def chunks():
        for _ in range(40):
            yield b"x" * 10_000

    resp = http.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
    assert_error(resp, 413)


def test_unknown_routes_and_path_tricks_never_leak(http: httpx.Client, server: Server) -> None:
    assert_error(http.get("/v1/nothing"), 404)
    for path in ("//v1/models", "/v1/../v1/models", "/v1%2Fmodels"):
        resp = httpx.get(server.base_url + path)  # no key
        assert resp.status_code in (401, 404)
        assert "data" not in resp.json()


def test_server_survives_all_of_the_above(http: httpx.Client) -> None:
    resp = http.post(CHAT, json=GOOD)
    assert resp.status_code == 200
    assert json.loads(resp.text)["choices"][0]["finish_reason"] in ("stop", "length")
