"""The admin API against a live server: tenants, keys, limits, budgets, prices, usage,
invoices; and everything a hostile or careless caller might try."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Server

MODEL = "smollm2-135m-instruct"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Count to ten."}],
        "max_tokens": 8}


@pytest.fixture
def root(server: Server) -> Iterator[httpx.Client]:
    with server.admin() as client:
        yield client


def ok(resp: httpx.Response, status: int = 200) -> Any:
    assert resp.status_code == status, resp.text
    return resp.json()


def tenant(root: httpx.Client, name: str, **project: Any) -> dict[str, Any]:
    """An organization with one project and one API key."""
    org = ok(root.post("/organizations", json={"name": name}), 201)
    proj = ok(root.post("/projects", json={"organization_id": org["id"], "name": "main",
                                            **project}), 201)
    key = ok(root.post("/keys", json={"project_id": proj["id"], "name": "k"}), 201)
    return {"org": org, "project": proj, "key": key}


def chat(server: Server, secret: str, **extra: Any) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/chat/completions", json={**CHAT, **extra},
                      headers={"Authorization": f"Bearer {secret}"}, timeout=120)


def test_tenant_lifecycle_usage_and_invoice(server: Server, root: httpx.Client) -> None:
    t = tenant(root, "lifecycle")
    assert t["key"]["secret"].startswith("sk-aic-") and t["key"]["status"] == "active"
    assert "secret" not in ok(root.get(f"/keys/{t['key']['id']}"))
    ok(root.put(f"/prices/{MODEL}", json={"input_per_million": "0.5",
                                          "cached_input_per_million": "0.25",
                                          "output_per_million": "2"}))
    time.sleep(2.1)  # the server re-reads prices every 2 s
    ids, costs = [], 0
    for _ in range(3):
        body = ok(chat(server, t["key"]["secret"]))
        u = body["usage"]
        ids.append(body["id"])
        fresh = u["prompt_tokens"] - u["prompt_tokens_details"]["cached_tokens"]
        costs += fresh * 500_000 + u["prompt_tokens_details"]["cached_tokens"] * 250_000 + \
            u["completion_tokens"] * 2_000_000
    summary = ok(root.get("/usage", params={"project_id": t["project"]["id"],
                                            "group_by": "model"}))["data"]
    assert [(r["model"], r["requests"]) for r in summary] == [(MODEL, 3)]
    expected = format(costs / 10**12, ".12f").rstrip("0")
    assert summary[0]["cost_usd"] == expected
    export = root.get("/usage/export", params={"organization_id": t["org"]["id"]})
    assert export.headers["content-type"].startswith("text/csv")
    assert sorted(line.split(",")[0] for line in export.text.splitlines()[1:]) == sorted(ids)
    month = datetime.now(UTC).strftime("%Y-%m")
    bill = ok(root.get(f"/organizations/{t['org']['id']}/invoices/{month}"))
    assert bill["subtotal_usd"] == expected and bill["status"] == "open"
    csv_bill = root.get(f"/organizations/{t['org']['id']}/invoices/{month}",
                        params={"format": "csv"})
    assert csv_bill.text.splitlines()[-1].endswith("," + expected)
    ok(root.put(f"/prices/{MODEL}", json={"input_per_million": 0, "output_per_million": 0}))


def test_cross_tenant_ids_are_404_on_every_route(server: Server, root: httpx.Client) -> None:
    mine, theirs = tenant(root, "mine"), tenant(root, "theirs")
    ok(chat(server, theirs["key"]["secret"]))
    owner = server.admin_key("owner", mine["org"]["id"])
    foreign = {"org": theirs["org"]["id"], "proj": theirs["project"]["id"],
               "key": theirs["key"]["id"]}
    routes = [
        ("GET", f"/organizations/{foreign['org']}", None),
        ("PATCH", f"/organizations/{foreign['org']}", {"name": "pwned"}),
        ("GET", f"/projects/{foreign['proj']}", None),
        ("PATCH", f"/projects/{foreign['proj']}", {"rpm_limit": 1}),
        ("GET", "/projects", {"organization_id": foreign["org"]}),
        ("POST", "/projects", {"organization_id": foreign["org"], "name": "x"}),
        ("GET", f"/keys/{foreign['key']}", None),
        ("PATCH", f"/keys/{foreign['key']}", {"name": "x"}),
        ("POST", f"/keys/{foreign['key']}/revoke", None),
        ("POST", f"/keys/{foreign['key']}/rotate", None),
        ("GET", "/keys", {"project_id": foreign["proj"]}),
        ("POST", "/keys", {"project_id": foreign["proj"]}),
        ("GET", "/usage", {"organization_id": foreign["org"]}),
        ("GET", "/usage", {"project_id": foreign["proj"]}),
        ("GET", "/usage", {"api_key_id": foreign["key"]}),
        ("GET", "/usage/export", {"project_id": foreign["proj"]}),
        ("GET", f"/organizations/{foreign['org']}/invoices/2026-11", None),
        ("POST", "/admin-keys", {"role": "viewer", "organization_id": foreign["org"]}),
    ]
    with server.admin(owner) as client:
        for method, path, data in routes:
            if method == "GET":
                resp = client.get(path, params=data)
            else:
                resp = client.request(method, path, json=data)
            assert resp.status_code == 404, (method, path, resp.text)
            assert resp.json()["error"]["code"] == "not_found"
            assert theirs["org"]["name"] not in resp.text
            assert theirs["key"]["prefix"] not in resp.text
        listed = json.dumps([client.get(p).json() for p in
                             ("/organizations", "/projects", "/keys", "/usage")])
        assert foreign["org"] not in listed and foreign["proj"] not in listed
        assert mine["org"]["id"] in listed
    # the other tenant is untouched
    assert ok(root.get(f"/keys/{foreign['key']}"))["status"] == "active"
    assert ok(root.get(f"/organizations/{foreign['org']}"))["name"] == "theirs"


def test_roles_and_who_may_call_admin(server: Server, root: httpx.Client) -> None:
    t = tenant(root, "roles")
    viewer = server.admin_key("viewer", t["org"]["id"])
    admin = server.admin_key("admin", t["org"]["id"])
    with server.admin(viewer) as client:
        assert ok(client.get(f"/projects/{t['project']['id']}"))["name"] == "main"
        resp = client.post("/keys", json={"project_id": t["project"]["id"]})
        assert resp.status_code == 403 and resp.json()["error"]["type"] == "permission_error"
    with server.admin(admin) as client:
        assert client.post("/organizations", json={"name": "x"}).status_code == 403
        assert client.put(f"/prices/{MODEL}", json={"input_per_million": 1,
                                                     "output_per_million": 1}).status_code == 403
        assert client.post("/admin-keys", json={"role": "owner"}).status_code == 403
        ok(client.post("/projects", json={"name": "second"}), 201)
    api_key = {"Authorization": f"Bearer {t['key']['secret']}"}
    spoofed = {"X-Forwarded-For": "127.0.0.1", "X-Real-IP": "127.0.0.1"}
    for path in ("/admin/v1/organizations", "//admin/v1/organizations",
                 "/admin/v1/../admin/v1/organizations", "/admin%2Fv1/organizations",
                 "/v1/../admin/v1/organizations"):
        for headers in (api_key, spoofed, {**api_key, **spoofed}):
            resp = httpx.get(server.base_url + path, headers=headers)
            assert resp.status_code in (401, 404), (path, resp.status_code)
            assert "roles" not in resp.text
    assert chat(server, server.keys["admin"]).status_code == 401


def test_admin_api_is_in_the_openapi_document(server: Server) -> None:
    spec = httpx.get(server.base_url + "/openapi.json").json()
    admin = {path for path in spec["paths"] if path.startswith("/admin/v1/")}
    assert {"/admin/v1/organizations", "/admin/v1/projects/{project_id}", "/admin/v1/keys",
            "/admin/v1/usage/export", "/admin/v1/prices/{model}",
            "/admin/v1/organizations/{org_id}/invoices/{month}"} <= admin
    create_key = spec["paths"]["/admin/v1/keys"]["post"]["requestBody"]
    schema = create_key["content"]["application/json"]["schema"]
    assert {"project_id", "allowed_models", "expires_at", "rpm_limit"} <= set(schema["properties"])


@pytest.mark.parametrize("body", [
    {"name": "a'; DROP TABLE organizations; --"},
    {"name": "nul\x00byte"},
    {"name": ""},
    {"name": "x" * 300},
    {"name": "ok", "budget_usd": "lots"},
    {"name": "ok", "budget_usd": "-5"},
    {"name": "ok", "budget_usd": "0.0000000000001"},
    {"name": "ok", "surprise": 1},
    {"name": ["list"]},
])
def test_bad_admin_input_is_a_clean_400(root: httpx.Client, body: dict[str, Any]) -> None:
    resp = root.post("/organizations", json=body)
    assert resp.status_code == 400, resp.text
    assert set(resp.json()["error"]) == {"message", "type", "param", "code"}


def test_bad_key_settings_are_refused(root: httpx.Client) -> None:
    t = tenant(root, "settings")
    path = f"/keys/{t['key']['id']}"
    past = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    for patch in ({"rpm_limit": 0}, {"rpm_limit": -1}, {"tpm_limit": 10**20},
                  {"expires_at": past}, {"allowed_models": ["bad model id!"]},
                  {"allowed_models": "smollm"}):
        assert root.patch(path, json=patch).status_code == 400, patch
    assert root.post("/keys", content=b"{not json").status_code == 400
    assert root.get("/usage", params={"group_by": "country"}).status_code == 400
    assert root.get("/usage", params={"start": "yesterday"}).status_code == 400


@pytest.mark.parametrize("secret", [
    "sk-aic-admin-' OR 1=1 --", "sk-aic-admin-\x00" + "a" * 42, "' UNION SELECT * FROM api_keys",
    "sk-aic-admin-" + "A" * 43, "",
])
def test_bad_admin_keys_are_401(server: Server, secret: str) -> None:
    try:
        resp = httpx.get(server.base_url + "/admin/v1/organizations",
                         headers={"Authorization": f"Bearer {secret}"})
    except httpx.LocalProtocolError:
        return  # the client refused to send it; nothing reached the server
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "invalid_api_key"


def test_key_settings_take_effect(server: Server, root: httpx.Client) -> None:
    t = tenant(root, "effects", rpm_limit=2)
    secret = t["key"]["secret"]
    first = chat(server, secret)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert chat(server, secret).status_code == 200
    refused = chat(server, secret)
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key=secret, max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(**CHAT)
    # allow-list: other models vanish; rotation: the old secret dies at once
    key2 = ok(root.post("/keys", json={"project_id": t["project"]["id"],
                                       "allowed_models": ["some-other-model"]}), 201)
    listed = httpx.get(server.base_url + "/v1/models",
                       headers={"Authorization": f"Bearer {key2['secret']}"}).json()
    assert listed["data"] == []
    assert chat(server, key2["secret"]).status_code == 404
    rotated = ok(root.post(f"/keys/{key2['id']}/rotate"))
    assert rotated["secret"] != key2["secret"] and rotated["id"] == key2["id"]
    assert chat(server, key2["secret"]).status_code == 401
    assert chat(server, rotated["secret"]).status_code == 404  # still its allow-list


def test_budget_refuses_with_insufficient_quota(server: Server, root: httpx.Client) -> None:
    model = "budget-test-model"
    t = tenant(root, "budgeted", budget_usd="10")
    ok(root.put(f"/prices/{model}", json={"input_per_million": 0,
                                          "output_per_million": 1_000_000}))
    ok(root.put(f"/prices/{MODEL}", json={"input_per_million": 0,
                                          "output_per_million": 1_000_000}))
    time.sleep(2.1)
    try:
        big = chat(server, t["key"]["secret"], max_tokens=11)
        assert big.status_code == 429
        assert big.json()["error"]["type"] == "insufficient_quota"
        assert big.json()["error"]["code"] == "insufficient_quota"
        assert ok(chat(server, t["key"]["secret"], max_tokens=4))["usage"]
        spent = ok(root.get("/usage", params={"project_id": t["project"]["id"],
                                              "group_by": ""}))["data"][0]["cost_usd"]
        assert 0 < float(spent) <= 4
        mtd = ok(root.get(f"/projects/{t['project']['id']}"))["month_to_date"]
        assert mtd["spent_usd"] == spent and mtd["held_usd"] == "0"
        assert float(mtd["remaining_usd"]) == 10 - float(spent)
        assert ok(root.get(f"/organizations/{t['org']['id']}"))["month_to_date"][
            "spent_usd"] == spent
    finally:
        ok(root.put(f"/prices/{MODEL}", json={"input_per_million": 0, "output_per_million": 0}))


def test_revoked_while_in_flight(server: Server, root: httpx.Client) -> None:
    """Requests already running finish and are billed; the next one is refused."""
    t = tenant(root, "inflight")
    secret = t["key"]["secret"]
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key=secret, max_retries=0)

    def stream() -> tuple[str, int]:
        chunks = list(client.chat.completions.create(
            **{**CHAT, "max_tokens": 48}, stream=True, stream_options={"include_usage": True}))
        return chunks[0].id, chunks[-1].usage.completion_tokens

    with ThreadPoolExecutor(3) as pool:
        running = [pool.submit(stream) for _ in range(3)]
        time.sleep(0.5)
        ok(root.post(f"/keys/{t['key']['id']}/revoke"))
        assert chat(server, secret).status_code == 401
        done = [f.result(timeout=120) for f in running]
    assert all(tokens > 0 for _, tokens in done)
    billed = ok(root.get("/usage", params={"api_key_id": t["key"]["id"],
                                           "group_by": "key"}))["data"]
    assert billed[0]["requests"] == 3
    assert billed[0]["completion_tokens"] == sum(tokens for _, tokens in done)


def test_secrets_never_reach_logs_or_error_bodies(server: Server, root: httpx.Client) -> None:
    canary = "sk-aic-" + "CANARY" * 7 + "x"
    admin_canary = "sk-aic-admin-" + "CANARY" * 7 + "x"
    t = tenant(root, "canaries")
    bodies = [
        httpx.get(server.base_url + "/v1/models",
                  headers={"Authorization": f"Bearer {canary}"}).text,
        httpx.get(server.base_url + "/admin/v1/organizations",
                  headers={"Authorization": f"Bearer {admin_canary}"}).text,
        chat(server, canary).text,
        root.get(f"/keys/{canary}").text,
        root.get("/usage", params={"api_key_id": canary}).text,
    ]
    assert not any("CANARY" in body for body in bodies)
    log = server.log.read_text(errors="replace")
    for secret in (canary, admin_canary, t["key"]["secret"], server.keys["admin"]):
        assert secret not in log
        assert secret[-20:] not in log
