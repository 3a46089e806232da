"""Input that used to reach the database or the tokenizer unchecked, against a live server
on SQLite and on PostgreSQL: offset expiries, far dates, NUL bytes, lone surrogates,
32-bit limits, impossible months, and prompts far over the context."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Server, start_server

MODEL = "smollm2-135m-instruct"
CONTEXT = 1024


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db_server(request: pytest.FixtureRequest,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server on each database, with the default 8 MiB body limit."""
    env: dict[str, str] = {}
    database: str | None = None
    if request.param == "postgresql":
        import psycopg

        base = request.getfixturevalue("pg_url")
        database = f"v_{secrets.token_hex(6)}"
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{database}"')
        env["AICLOUD_DATABASE_URL"] = f"{base.rsplit('/', 1)[0]}/{database}"
    srv = start_server(tmp_path_factory.mktemp(f"validate-{request.param}"), "--context",
                       str(CONTEXT), "--sequences", "4", extra_env=env)
    yield srv
    srv.stop()
    if database is not None:
        import psycopg

        with psycopg.connect(request.getfixturevalue("pg_url"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@pytest.fixture(scope="module")
def root(db_server: Server) -> Iterator[httpx.Client]:
    with db_server.admin() as client:
        yield client


@pytest.fixture(scope="module")
def project(root: httpx.Client) -> dict[str, Any]:
    org = ok(root.post("/organizations", json={"name": f"v{secrets.token_hex(4)}"}), 201)
    return ok(root.post("/projects", json={"organization_id": org["id"], "name": "p"}), 201)


def ok(resp: httpx.Response, status: int = 200) -> Any:
    assert resp.status_code == status, resp.text
    return resp.json()


def refused(resp: httpx.Response, param: str, status: int = 400) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["param"] == param, error
    return error


def models(server: Server, secret: str) -> int:
    return httpx.get(server.base_url + "/v1/models", timeout=30,
                     headers={"Authorization": f"Bearer {secret}"}).status_code


def post(server: Server, path: str, secret: str, raw: str) -> httpx.Response:
    """A hand-written JSON body, so escapes such as \\ud800 reach the server as written."""
    return httpx.post(server.base_url + path, content=raw.encode(), timeout=120,
                      headers={"Authorization": f"Bearer {secret}",
                               "Content-Type": "application/json"})


def test_expiry_with_a_utc_offset_ends_on_time(db_server: Server, root: httpx.Client,
                                              project: dict[str, Any]) -> None:
    """SQLite stored the wall clock of `+10:00` and read it as UTC: a key set to expire in
    seconds worked 10 more hours, and one given at -08:00 was dead from the start."""
    deadline = datetime.now(UTC) + timedelta(seconds=8)
    keys = []
    for hours in (10, -8):
        local = deadline.astimezone(timezone(timedelta(hours=hours)))
        key = ok(root.post("/keys", json={"project_id": project["id"],
                                          "expires_at": local.isoformat()}), 201)
        shown = datetime.fromisoformat(key["expires_at"].replace("Z", "+00:00"))
        assert abs(shown - deadline) < timedelta(milliseconds=1), key["expires_at"]
        assert models(db_server, key["secret"]) == 200
        keys.append(key)
    listed = {k["id"]: k for k in ok(root.get("/keys"))["data"]}
    assert all(listed[k["id"]]["status"] == "active" for k in keys)
    time.sleep(max((deadline - datetime.now(UTC)).total_seconds(), 0) + 0.5)
    for key in keys:
        assert models(db_server, key["secret"]) == 401
        assert ok(root.get(f"/keys/{key['id']}"))["status"] == "expired"


def test_dates_no_database_can_read_back_are_refused(db_server: Server, root: httpx.Client,
                                                      project: dict[str, Any]) -> None:
    """9999-12-31T23:59:59-12:00 is year 10000 in UTC: PostgreSQL stored it and then no
    listing could read it back (500 for the whole installation)."""
    for moment in ("9999-12-31T23:59:59-12:00", "0001-01-01T00:00:00+14:00",
                   "1900-01-01T00:00:00Z"):
        refused(root.post("/keys", json={"project_id": project["id"], "expires_at": moment}),
                "expires_at")
        for bound in ("start", "end"):
            refused(root.get("/usage", params={bound: moment}), bound)
            refused(root.get("/usage/export", params={bound: moment}), bound)
    key = ok(root.post("/keys", json={"project_id": project["id"]}), 201)
    refused(root.patch(f"/keys/{key['id']}", json={"expires_at": "9999-12-31T23:59:59-12:00"}),
            "expires_at")
    ok(root.get("/keys"))
    assert models(db_server, key["secret"]) == 200
    org = project["organization_id"]
    for month in ("0000-01", "9999-12", "1969-12"):
        refused(root.get(f"/organizations/{org}/invoices/{month}"), "month")
    assert ok(root.get(f"/organizations/{org}/invoices/2026-01"))["month"] == "2026-01"


def test_limits_beyond_32_bits_are_refused(root: httpx.Client,
                                           project: dict[str, Any]) -> None:
    """The columns are 32-bit; PostgreSQL answered 500 for anything above 2^31 - 1."""
    for field in ("rpm_limit", "tpm_limit"):
        refused(root.patch(f"/projects/{project['id']}", json={field: 2**31}), field)
        refused(root.post("/keys", json={"project_id": project["id"], field: 10**12}), field)
        top = ok(root.patch(f"/projects/{project['id']}", json={field: 2**31 - 1}))
        assert top[field] == 2**31 - 1
        ok(root.patch(f"/projects/{project['id']}", json={field: None}))


NUL = "\\u0000"
SURROGATE = "\\ud800"


def test_nul_and_lone_surrogates_are_400s_naming_the_field(
        db_server: Server, root: httpx.Client, project: dict[str, Any]) -> None:
    """Each of these reached PostgreSQL (which refuses NUL in text) or a UTF-8 encoder
    (which refuses lone surrogates) and answered 500."""
    admin = root.headers["authorization"].split()[1]
    org = project["organization_id"]
    for flaw in (NUL, SURROGATE):
        cases = [
            ("/admin/v1/organizations", f'{{"name": "o{flaw}"}}', "name"),
            ("/admin/v1/projects", f'{{"organization_id": "{org}", "name": "p{flaw}"}}',
             "name"),
            ("/admin/v1/projects", f'{{"organization_id": "{org}{flaw}", "name": "p"}}',
             "organization_id"),
            ("/admin/v1/keys", f'{{"project_id": "{project["id"]}{flaw}"}}', "project_id"),
            ("/admin/v1/keys", f'{{"project_id": "{project["id"]}", '
                               f'"allowed_models": ["m{flaw}"]}}', "allowed_models.0"),
            ("/admin/v1/admin-keys", f'{{"role": "viewer", "name": "n{flaw}"}}', "name"),
            ("/admin/v1/credits", f'{{"organization_id": "{org}", "amount_usd": "1", '
                                  f'"reference": "r{flaw}"}}', "reference"),
        ]
        for path, raw, param in cases:
            refused(post(db_server, path, admin, raw), param)
        resp = httpx.put(f"{db_server.base_url}/admin/v1/prices/m%00x", timeout=30,
                         json={"input_per_million": 1, "output_per_million": 1},
                         headers={"Authorization": f"Bearer {admin}"})
        refused(resp, "model")
    for path, param in (("/keys/key%00x", "key_id"), ("/projects/proj%00", "project_id"),
                        ("/organizations/org%00", "org_id")):
        refused(root.get(path), param)
    refused(root.get("/usage", params={"model": "m\x00"}), "model")
    refused(root.get("/keys", params={"project_id": "p\x00"}), "project_id")
    ok(root.get("/keys"))


def test_prompts_may_hold_nul_but_no_lone_surrogate(db_server: Server, root: httpx.Client,
                                                    project: dict[str, Any]) -> None:
    """A NUL is text a model can read (prompts are never stored), so it is accepted in
    message contents and prompts; a lone surrogate is not text and cannot be encoded."""
    secret = ok(root.post("/keys", json={"project_id": project["id"]}), 201)["secret"]
    chat = '{{"model": "{m}", "max_tokens": 2, "messages": [{{"role": "user", ' \
           '"content": "a{flaw}b"}}]{extra}}}'
    done = post(db_server, "/v1/chat/completions", secret,
                chat.format(m=MODEL, flaw=NUL, extra=""))
    assert ok(done)["usage"]["completion_tokens"] >= 1
    refused(post(db_server, "/v1/chat/completions", secret,
                 chat.format(m=MODEL, flaw=SURROGATE, extra="")), "messages.0.content")
    refused(post(db_server, "/v1/chat/completions", secret,
                 chat.format(m=MODEL, flaw="", extra=f', "user": "u{NUL}"')), "user")
    text = '{{"model": "{m}", "max_tokens": 2, "prompt": "a{flaw}b"}}'
    assert ok(post(db_server, "/v1/completions", secret, text.format(m=MODEL, flaw=NUL)))
    refused(post(db_server, "/v1/completions", secret, text.format(m=MODEL, flaw=SURROGATE)),
            "prompt")
    refused(post(db_server, "/v1/completions", secret,
                 f'{{"model": "{MODEL}", "prompt": ["a{SURROGATE}"]}}'), "prompt.0")


# -- big prompts ----------------------------------------------------------------------------

def peak_rss_mb(server: Server) -> float:
    """The server's peak resident memory so far (VmHWM), in MiB."""
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


BIG = 7 << 20  # characters: a body just under the 8 MiB limit


@pytest.mark.parametrize("db_server", ["sqlite"], indirect=True)
def test_a_prompt_far_over_the_context_is_refused_without_tokenizing(
        db_server: Server, root: httpx.Client, project: dict[str, Any]) -> None:
    """Tokenizing 7 MiB of text raised the peak by ~318 MiB and took 12-17 s (a token
    array, then a list of Python ints) before the context check refused it; the character
    bound refuses it first (measured: +22 MiB, 0.6 s)."""
    secret = ok(root.post("/keys", json={"project_id": project["id"]}), 201)["secret"]
    before = peak_rss_mb(db_server)
    started = time.monotonic()
    for kind in ("chat", "text"):
        body: dict[str, Any] = {"model": MODEL, "max_tokens": 1}
        if kind == "chat":
            body["messages"] = [{"role": "user", "content": "hello " * (BIG // 6)}]
            param, path = "messages", "/v1/chat/completions"
        else:
            body["prompt"], param, path = "hello " * (BIG // 6), "prompt", "/v1/completions"
        resp = httpx.post(db_server.base_url + path, json=body, timeout=120,
                          headers={"Authorization": f"Bearer {secret}"})
        assert refused(resp, param)["code"] == "context_length_exceeded"
    elapsed = time.monotonic() - started
    grown = peak_rss_mb(db_server) - before
    assert grown < 120, f"peak memory grew {grown:.0f} MiB"
    assert elapsed < 20
    # a prompt just over the context but within the bound is still counted exactly
    resp = httpx.post(db_server.base_url + "/v1/completions", timeout=120,
                      json={"model": MODEL, "prompt": "hello " * CONTEXT, "max_tokens": 1},
                      headers={"Authorization": f"Bearer {secret}"})
    assert "prompt has" in refused(resp, "messages")["message"]
