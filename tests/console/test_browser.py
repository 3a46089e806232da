"""The admin console in a real browser (Debian's chromium driven by Playwright) against a
live server with the bundled model: an operator's whole journey, organization scope on
every page and direct URL, CSRF, expiry, read-only roles and sign-in rate limits.

The journey saves screenshots of the main pages into docs/console/ (shown in the README).
"""

from __future__ import annotations

import csv
import io
import re
import sqlite3
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from playwright.sync_api import BrowserContext, Page, expect

from tests.conftest import Server, start_server

MODEL = "smollm2-135m-instruct"
SHOTS = Path(__file__).resolve().parents[2] / "docs" / "console"
ATTEMPTS = 4  # failed sign-ins a minute per address on this server
# USD per million tokens: big enough that one short answer costs a visible amount
INPUT_PRICE, OUTPUT_PRICE = Decimal("100"), Decimal("300")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("console-home")
    srv = start_server(home, "--context", "1024", "--sequences", "4", extra_env={
        "AICLOUD_CONSOLE_SIGN_IN_ATTEMPTS": str(ATTEMPTS)})
    srv.keys["owner"] = srv.admin_key()
    yield srv
    srv.stop()


def sign_in(page: Page, secret: str, then: str = "/console/") -> None:
    page.goto(then)
    expect(page).to_have_url(re.compile(r"/console/sign-in"))
    page.get_by_label("Admin key").fill(secret)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(re.compile(re.escape(then) + "$"))


def csrf_of(page: Page) -> str:
    value = page.locator("input[name=csrf_token]").first.get_attribute("value")
    assert value
    return value


def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def admin_api(site: Server) -> httpx.Client:
    return site.admin(site.keys["owner"])


def ok(resp: httpx.Response, status: int = 200) -> Any:
    assert resp.status_code == status, resp.text
    return resp.json()


def tenant(site: Server, name: str, project: str = "main") -> dict[str, Any]:
    """An organization with a project and a key, made through the admin API."""
    with admin_api(site) as api:
        org = ok(api.post("/organizations", json={"name": name}), 201)
        proj = ok(api.post("/projects", json={"organization_id": org["id"], "name": project}),
                  201)
        key = ok(api.post("/keys", json={"project_id": proj["id"]}), 201)
    return {"org": org, "project": proj, "key": key}


def test_operator_journey(context: BrowserContext, site: Server) -> None:
    """Sign in, set a price, create an organization, a project with a budget and a key,
    chat in the playground, find the answer on the usage page at its exact cost, revoke
    the key and see the API refuse it, sign out."""
    page = context.new_page()
    sign_in(page, site.keys["owner"])
    expect(page.get_by_role("heading", name="Models")).to_be_visible()
    expect(page.get_by_role("row", name=re.compile(MODEL))).to_contain_text("loaded")

    page.get_by_role("link", name="Prices").click()
    page.get_by_label("Model").fill(MODEL)
    page.get_by_label("Input", exact=True).fill(str(INPUT_PRICE))
    page.get_by_label("Output").fill(str(OUTPUT_PRICE))
    page.get_by_role("button", name="Set price").click()
    expect(page.get_by_role("row", name=re.compile(MODEL))).to_contain_text("$300")
    shot(page, "prices")

    page.get_by_role("link", name="Organizations").click()
    page.get_by_label("Name").fill("acme")
    page.get_by_label("Monthly budget (USD)").fill("100")
    page.get_by_role("button", name="Create organization").click()
    expect(page.get_by_role("heading", name="acme")).to_be_visible()

    # a bad value is refused next to its field, and nothing is created
    page.get_by_label("Name").first.fill("web")
    page.get_by_label("Fair-share weight").fill("1000")
    page.get_by_role("button", name="Create project").click()
    expect(page.locator("#f-weight-error")).to_contain_text("weight must be between")
    expect(page.get_by_role("row", name=re.compile("web"))).to_have_count(0)
    page.get_by_label("Fair-share weight").fill("2")
    page.get_by_label("Monthly budget (USD)").first.fill("5")
    page.get_by_label("Requests per minute").fill("600")
    page.get_by_role("button", name="Create project").click()
    row = page.get_by_role("row", name=re.compile(r"^web"))
    expect(row).to_contain_text("$5")
    expect(row).to_contain_text("600")
    shot(page, "organization")

    page.get_by_role("link", name="Keys").first.click()
    page.locator("#f-project_id").select_option(label="web")
    page.get_by_label("Name").fill("browser-test")
    page.get_by_role("button", name="Create key").click()
    secret = page.locator("#new-secret").input_value()
    assert secret.startswith("sk-aic-")
    page.get_by_role("button", name="Copy").click()
    page.goto("/console/keys")  # the secret was shown once: never again
    assert secret not in page.content()
    expect(page.get_by_role("row", name=re.compile(secret[:11]))).to_contain_text("active")
    client = openai.OpenAI(base_url=site.base_url + "/v1", api_key=secret, max_retries=0)
    assert client.chat.completions.create(model=MODEL, max_tokens=4, messages=[
        {"role": "user", "content": "Hi"}]).choices[0].message.content is not None

    # rotate: a new secret, shown once; the old one stops working at once
    page.get_by_role("button", name=f"Rotate {secret[:11]}").click()
    rotated = page.locator("#new-secret").input_value()
    assert rotated.startswith("sk-aic-") and rotated != secret
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=MODEL, max_tokens=4,
                                       messages=[{"role": "user", "content": "Hi"}])
    client = openai.OpenAI(base_url=site.base_url + "/v1", api_key=rotated, max_retries=0)
    secret = rotated

    # an allow-list and an expiry, set on the key's page; a bad expiry is refused in place
    page.goto("/console/keys")
    page.get_by_role("link", name=re.compile(re.escape(secret[:11]))).click()
    page.get_by_label("Expires (UTC)").fill("2020-01-01T00:00")
    page.get_by_role("button", name="Save").click()
    expect(page.locator("#f-expires_at-error")).to_contain_text("must be in the future")
    page.get_by_label("Allowed models").fill("some-other-model")
    page.get_by_label("Expires (UTC)").fill("2031-06-30T12:00")
    page.get_by_role("button", name="Save").click()
    expect(page.get_by_role("textbox", name="Allowed models")).to_have_value("some-other-model")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=MODEL, max_tokens=4,
                                       messages=[{"role": "user", "content": "Hi"}])
    page.get_by_label("Allowed models").fill(MODEL)
    page.get_by_role("button", name="Save").click()
    expect(page.get_by_label("Expires (UTC)")).to_have_value("2031-06-30T12:00")
    assert client.chat.completions.create(model=MODEL, max_tokens=4, messages=[
        {"role": "user", "content": "Hi"}]).choices[0].message.content is not None

    page.get_by_role("link", name="Playground").click()
    page.locator("#pg-project").select_option(label="web")
    page.get_by_label("Max tokens").fill("24")
    page.get_by_label("Message").fill("Name three colours.")
    page.get_by_role("button", name="Send").click()
    usage = page.locator(".transcript .assistant .usage")
    expect(usage).to_be_visible(timeout=120_000)
    assert page.locator(".transcript .assistant").inner_text().strip()
    tokens = re.search(r"(\d+) prompt \+ (\d+) completion", usage.inner_text())
    assert tokens
    prompt, completion = int(tokens[1]), int(tokens[2])
    expected = (prompt * INPUT_PRICE + completion * OUTPUT_PRICE) / 1_000_000
    cost = Decimal(usage.get_attribute("data-cost") or "")
    assert cost == expected
    shot(page, "playground")

    page.get_by_role("link", name="Usage").click()
    played = page.locator("#usage-rows tbody tr", has_text="console playground")
    expect(played).to_have_count(1)
    expect(played).to_contain_text("web")
    expect(played).to_contain_text(f"${cost.normalize():f}")
    expect(page.get_by_role("img", name="Spend per day by project")).to_be_visible()
    shot(page, "usage")
    export = page.request.get("/console/usage/export.csv")
    assert export.ok and export.headers["content-type"].startswith("text/csv")
    lines = list(csv.DictReader(io.StringIO(export.text())))
    played_row = next(r for r in lines if r["api_key_id"].startswith("akey_"))
    assert (int(played_row["prompt_tokens"]), int(played_row["completion_tokens"]),
            Decimal(played_row["cost_usd"])) == (prompt, completion, cost)
    # every request so far was the web project's: its invoice line is their sum
    total = sum(Decimal(r["cost_usd"]) for r in lines)
    page.locator("#inv-org").select_option(label="acme")
    page.get_by_role("button", name="Show invoice").click()
    expect(page.get_by_role("heading", name=re.compile("Invoice .* acme"))).to_be_visible()
    expect(page.get_by_role("row", name=re.compile("^web"))).to_contain_text(
        f"${total.normalize():f}")
    page.set_viewport_size({"width": 390, "height": 844})
    shot(page, "usage-phone")
    page.set_viewport_size({"width": 1280, "height": 900})

    page.goto("/console/keys")
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name=f"Revoke {secret[:11]}").click()
    expect(page.get_by_role("row", name=re.compile(secret[:11]))).to_contain_text("revoked")
    shot(page, "keys")
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=MODEL, max_tokens=4,
                                       messages=[{"role": "user", "content": "Hi"}])

    page.goto("/console/")
    shot(page, "overview")
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(re.compile("/console/sign-in"))
    page.goto("/console/usage")
    expect(page).to_have_url(re.compile(r"/console/sign-in\?next=/console/usage"))


def test_overview_refreshes_live(context: BrowserContext, site: Server) -> None:
    """The overview's tenant table changes while the page stays open (no reload)."""
    target = tenant(site, "live-org", "live-project")
    page = context.new_page()
    sign_in(page, site.keys["owner"])
    page.evaluate("window.notReloaded = true")
    expect(page.locator("#live")).not_to_contain_text("live-project")
    client = openai.OpenAI(base_url=site.base_url + "/v1", api_key=target["key"]["secret"],
                           max_retries=0)
    client.chat.completions.create(model=MODEL, max_tokens=4,
                                   messages=[{"role": "user", "content": "Hello"}])
    # the tenant is shown by its project's name, with the tokens it was served
    expect(page.locator("#live tr", has_text="live-project")).to_be_visible(timeout=15_000)
    assert page.evaluate("window.notReloaded") is True


def test_cookie_is_httponly_strict_and_secure_over_tls(context: BrowserContext,
                                                       site: Server) -> None:
    page = context.new_page()
    sign_in(page, site.keys["owner"])
    cookie = next(c for c in context.cookies() if c["name"] == "aicloud_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and not cookie["secure"]
    # behind a TLS proxy (uvicorn trusts X-Forwarded-Proto from 127.0.0.1) it is Secure
    with httpx.Client(base_url=site.base_url, headers={"x-forwarded-proto": "https"}) as web:
        form = web.get("/console/sign-in")
        token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
        assert token
        assert "; secure" in form.headers["set-cookie"].lower()
        # a Secure cookie is not sent back over plain http: hand it over as the proxy would
        resp = web.post("/console/sign-in", data={"csrf_token": token[1],
                                                  "key": site.keys["owner"],
                                                  "next": "//evil.example/console/"},
                        headers={"cookie": f"aicloud_console_pre={token[1]}"})
    assert resp.status_code == 303
    assert resp.headers["location"] == "/console/"  # `next` never leads off the console
    session = next(v for k, v in resp.headers.multi_items()
                   if k == "set-cookie" and v.startswith("aicloud_console="))
    assert "; secure" in session.lower() and "; httponly" in session.lower()


def test_organization_admin_sees_only_its_organization(context: BrowserContext,
                                                       site: Server) -> None:
    mine, theirs = tenant(site, "mine-org"), tenant(site, "their-org")
    org_admin = site.admin_key("admin", mine["org"]["id"])
    page = context.new_page()
    sign_in(page, org_admin)
    page.goto("/console/organizations")
    expect(page.get_by_role("link", name="mine-org")).to_be_visible()
    assert "their-org" not in page.content()
    page.goto("/console/keys")
    assert theirs["key"]["prefix"] not in page.content()
    foreign = [f"/console/organizations/{theirs['org']['id']}",
               f"/console/projects/{theirs['project']['id']}",
               f"/console/keys/{theirs['key']['id']}",
               f"/console/keys?project_id={theirs['project']['id']}",
               f"/console/usage?project_id={theirs['project']['id']}",
               f"/console/usage?organization_id={theirs['org']['id']}",
               f"/console/usage/export.csv?project_id={theirs['project']['id']}",
               f"/console/invoices?organization_id={theirs['org']['id']}&month=2026-11"]
    for url in foreign:
        response = page.goto(url)
        assert response is not None and response.status == 404, url
        assert "their-org" not in page.content()
    # actions on foreign objects, with this session's valid CSRF token: 404, nothing changes
    page.goto("/console/keys")
    token = csrf_of(page)
    for action in (f"/console/keys/{theirs['key']['id']}/revoke",
                   f"/console/keys/{theirs['key']['id']}/rotate",
                   f"/console/projects/{theirs['project']['id']}",
                   f"/console/organizations/{theirs['org']['id']}/projects"):
        resp = page.request.post(action, form={"csrf_token": token, "name": "taken"})
        assert resp.status == 404, action
    resp = page.request.post("/console/playground/chat", headers={"x-csrf-token": token},
                             data={"model": MODEL, "project_id": theirs["project"]["id"],
                                   "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status == 404
    with admin_api(site) as api:
        assert ok(api.get(f"/keys/{theirs['key']['id']}"))["status"] == "active"
        assert ok(api.get(f"/projects/{theirs['project']['id']}"))["name"] == "main"


def test_form_without_csrf_token_is_refused(context: BrowserContext, site: Server) -> None:
    page = context.new_page()
    sign_in(page, site.keys["owner"])
    page.goto("/console/organizations")
    for form in ({"name": "no-token-org"}, {"name": "no-token-org", "csrf_token": "0" * 64}):
        resp = page.request.post("/console/organizations", form=form)
        assert resp.status == 403
        assert "CSRF" in resp.text()
    resp = page.request.post("/console/playground/chat", data={
        "model": MODEL, "project_id": "proj_000000000000000000000000",
        "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status == 403
    # the sign-out form too: the session survives a forged sign-out
    assert page.request.post("/console/sign-out", form={}).status == 403
    page.goto("/console/organizations")
    assert "no-token-org" not in page.content()
    expect(page).to_have_url(re.compile("/console/organizations$"))


def test_bad_input_is_a_clear_refusal(context: BrowserContext, site: Server) -> None:
    """NUL characters, overlong values, malformed JSON and unknown fields: 4xx answers
    naming the field, never a 500, and the server keeps serving."""
    page = context.new_page()
    sign_in(page, site.keys["owner"])
    page.goto("/console/organizations")
    token = csrf_of(page)
    for name in ("bad\x00name", "x" * 5000, "<script>alert(1)</script>"):
        resp = page.request.post("/console/organizations",
                                 form={"csrf_token": token, "name": name})
        assert resp.status == 400, name
        assert "<script>alert" not in resp.text()
    resp = page.request.post("/console/organizations", form={
        "csrf_token": token, "name": "fine-name", "budget_usd": "lots"})
    assert resp.status == 400 and 'id="f-budget_usd-error"' in resp.text()
    for body in ("{", '{"model": "m"}', '{"model": "m", "project_id": "p", "messages": [], '
                 '"surprise": 1}'):
        resp = page.request.post("/console/playground/chat", data=body, headers={
            "x-csrf-token": token, "content-type": "application/json"})
        assert resp.status == 400, body
        assert resp.json()["error"]["type"] == "invalid_request_error"
    resp = page.request.get("/console/usage?start=yesterday")
    assert resp.status == 400 and 'id="f-start-error"' in resp.text()
    assert page.request.get("/console/keys/%00").status == 400
    assert httpx.get(site.base_url + "/healthz").status_code == 200


def test_expired_session_is_sent_to_sign_in(context: BrowserContext, site: Server) -> None:
    page = context.new_page()
    sign_in(page, site.keys["owner"])
    with sqlite3.connect(site.db) as db:  # the server's clock decides, not the cookie's
        db.execute("UPDATE console_sessions SET expires_at = '2020-01-01 00:00:00.000000'")
    page.goto("/console/keys")
    expect(page).to_have_url(re.compile(r"/console/sign-in\?next=/console/keys"))
    token = page.locator("input[name=csrf_token]").first.get_attribute("value")
    resp = page.request.post("/console/organizations",
                             form={"name": "after-expiry", "csrf_token": token or ""})
    assert resp.status == 401


def test_viewer_changes_nothing(context: BrowserContext, site: Server) -> None:
    target = tenant(site, "viewed-org")
    page = context.new_page()
    sign_in(page, site.admin_key("viewer", target["org"]["id"]))
    page.goto(f"/console/organizations/{target['org']['id']}")
    expect(page.get_by_role("button", name="Create project")).to_have_count(0)
    token = csrf_of(page)
    for action, form in ((f"/console/organizations/{target['org']['id']}/projects",
                          {"name": "sneaky"}),
                         (f"/console/keys/{target['key']['id']}/revoke", {}),
                         (f"/console/projects/{target['project']['id']}",
                          {"name": "renamed", "weight": "50"}),
                         ("/console/keys", {"project_id": target["project"]["id"]})):
        resp = page.request.post(action, form={"csrf_token": token, **form})
        assert resp.status == 403, action
    resp = page.request.post("/console/playground/chat", headers={"x-csrf-token": token},
                             data={"model": MODEL, "project_id": target["project"]["id"],
                                   "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status == 403
    with admin_api(site) as api:
        assert ok(api.get(f"/keys/{target['key']['id']}"))["status"] == "active"
        project = ok(api.get(f"/projects/{target['project']['id']}"))
        assert (project["name"], project["weight"]) == ("main", 1.0)
        names = [p["name"] for p in ok(api.get("/projects", params={
            "organization_id": target["org"]["id"]}))["data"]]
        assert names == ["main"]


def test_failed_sign_ins_are_rate_limited(context: BrowserContext, site: Server) -> None:
    """Last in this module: it leaves this address blocked for a while."""
    page = context.new_page()
    page.goto("/console/sign-in")
    for _ in range(ATTEMPTS):
        page.get_by_label("Admin key").fill("sk-aic-admin-" + "x" * 43)
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator("#f-key-error")).to_contain_text("not a valid admin key")
    page.get_by_label("Admin key").fill(site.keys["owner"])  # even the right key now
    with page.expect_response("**/console/sign-in") as answer:
        page.get_by_role("button", name="Sign in").click()
    assert answer.value.status == 429
    assert int(answer.value.headers["retry-after"]) >= 1
    expect(page.locator("#f-key-error")).to_contain_text("Too many failed sign-ins")
    expect(page).to_have_url(re.compile("/console/sign-in"))
