"""The console's Models and Providers pages in a real browser (Debian's chromium driven by
Playwright) against a live server with the bundled model: a second catalog entry for the
same GGUF added, loaded, unloaded, pinned and removed through the page; a pull from a hub
on 127.0.0.1 (tests/models/fake_hub.py) followed to the end without a reload; a provider
whose key is never rendered; and the roles: a read-only admin acts on nothing, an
organization's admin reaches no installation-only action.

Saves docs/console/models.png and docs/console/providers.png (shown in the README)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from playwright.sync_api import BrowserContext, Page, expect

from aicloud.models.catalog import bundled_model
from tests.conftest import Server, start_server
from tests.console.test_browser import csrf_of, ok, shot, sign_in
from tests.models.fake_hub import FakeHub, running

PINNED = "smollm2-135m-instruct"  # the bundled model, registered pinned
BUNDLED = str(bundled_model().path)
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CANARY = "sk-partner-canary-" + "9" * 24


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    with running(FakeHub({FILE: bundled_model().path.read_bytes()})) as server:
        yield server


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("console-models-home")
    # as the pool's e2e tests: the GGUF served as it is, small contexts, no minimum residency
    srv = start_server(home, "--context", "256", "--sequences", "2", "--weights", "native",
                       extra_env={"AICLOUD_MIN_RESIDENCY": "0"})
    srv.keys["owner"] = srv.admin_key()
    yield srv
    srv.stop()


def api(site: Server) -> httpx.Client:
    return site.admin(site.keys["owner"])


def model_row(page: Page, model_id: str) -> Any:
    return page.locator(f"#models tr[id='model-{model_id}']")


def fits_a_phone(page: Page) -> None:
    """At a phone's width the page needs no sideways scrolling (wide tables scroll in
    their own box)."""
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.set_viewport_size({"width": 1280, "height": 900})


def state_of(site: Server, model_id: str) -> dict[str, Any]:
    with api(site) as client:
        shown: dict[str, Any] = ok(client.get(f"/models/{model_id}"))
    return shown


def test_a_model_is_added_loaded_unloaded_pinned_and_removed(context: BrowserContext,
                                                              site: Server) -> None:
    page = context.new_page()
    sign_in(page, site.keys["owner"], "/console/models")
    expect(model_row(page, PINNED).locator(".badge").first).to_have_text("ready")
    expect(model_row(page, PINNED)).to_contain_text("pinned")

    # a source that is not there: refused next to the field, nothing added
    page.get_by_label("Model id", exact=True).fill("second")
    page.get_by_label("Source path").fill("/nowhere/model.gguf")
    page.get_by_role("button", name="Add model").click()
    expect(page.locator("#f-source-error")).to_be_visible()
    expect(page.get_by_label("Model id", exact=True)).to_have_value("second")  # the form kept
    expect(model_row(page, "second")).to_have_count(0)

    page.get_by_label("Source path").fill(BUNDLED)
    page.get_by_label("Aliases", exact=True).fill("second-alias")
    page.get_by_label("Keep alive (s)", exact=True).fill("600")
    page.get_by_label("Weights", exact=True).select_option("native")
    page.get_by_label("Context (tokens)").fill("256")
    page.get_by_role("button", name="Add model").click()
    expect(page).to_have_url(re.compile("/console/models$"))
    row = model_row(page, "second")
    expect(row.locator(".badge").first).to_have_text("unloaded")
    expect(row).to_contain_text("second-alias")
    expect(row).to_contain_text("600 s")
    assert state_of(site, "second")["options"] == {"weights": "native", "context": 256}

    page.get_by_role("button", name="Load second", exact=True).click()  # answers once it is loaded
    expect(row.locator(".badge").first).to_have_text("ready")
    expect(row).to_contain_text("MiB")
    assert state_of(site, "second")["state"] == "ready"

    page.get_by_role("button", name="Unload second", exact=True).click()
    expect(row.locator(".badge").first).to_have_text("unloaded")
    assert state_of(site, "second")["state"] == "unloaded"

    page.get_by_role("button", name="Pin second", exact=True).click()  # pinned: loaded at once
    expect(row.locator(".badge").first).to_have_text("ready")
    expect(row.locator(".badge.pinned")).to_have_count(1)
    shown = state_of(site, "second")
    assert shown["pinned"] and shown["state"] == "ready"

    page.get_by_role("button", name="Unpin second", exact=True).click()
    expect(row.locator(".badge.pinned")).to_have_count(0)
    assert not state_of(site, "second")["pinned"]

    # a keyboard user on a button of the live part keeps their place across refreshes
    page.locator("#pin-second").focus()
    page.evaluate("document.getElementById('models').dataset.old = '1'")
    expect(page.locator("#models[data-old]")).to_have_count(0, timeout=10_000)  # swapped
    assert page.evaluate("document.activeElement.id") == "pin-second"

    # the state changes while the page stays open: unloaded by the API, loaded by a chat
    page.evaluate("window.notReloaded = true")
    with api(site) as client:
        ok(client.post("/models/second/unload"))
    expect(row.locator(".badge").first).to_have_text("unloaded", timeout=10_000)
    secret = site.new_key("models-page")
    chat = openai.OpenAI(base_url=site.base_url + "/v1", api_key=secret, max_retries=0)
    assert chat.chat.completions.create(model="second-alias", max_tokens=2, messages=[
        {"role": "user", "content": "Hi"}]).choices[0].message.content is not None
    expect(model_row(page, "second").locator(".badge").first).to_have_text("ready",
                                                                           timeout=10_000)
    assert page.evaluate("window.notReloaded") is True

    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Remove second", exact=True).click()
    expect(model_row(page, "second")).to_have_count(0)
    with api(site) as client:
        assert client.get("/models/second").status_code == 404


def test_a_pull_shows_its_progress_until_done(context: BrowserContext, site: Server,
                                              hub: FakeHub) -> None:
    size = len(hub.files[FILE])
    hub.delay = 0.004  # 1,500 chunks: 6 s or more for the whole file
    page = context.new_page()
    sign_in(page, site.keys["owner"], "/console/models")
    page.get_by_label("Pull source").fill("ftp://127.0.0.1/x.gguf")
    page.get_by_role("button", name="Start pull").click()
    expect(page.locator("#f-pull_source-error")).to_contain_text("only http(s) and hf://")

    page.get_by_label("Pull source").fill(hub.url(FILE))
    page.get_by_label("Pulled model id").fill("pulled")
    page.get_by_label("Pulled model weights").select_option("native")
    page.get_by_role("button", name="Start pull").click()
    page.evaluate("window.notReloaded = true")
    pull = page.locator("#pulls tbody tr", has_text="pulled")
    expect(pull).to_have_count(1)
    # bytes on their way, then the whole file, refreshed by the page's poll
    expect(pull.locator(".badge")).to_have_text("downloading", timeout=10_000)
    expect(pull.locator("progress")).to_be_visible()
    shot(page, "models")
    expect(pull.locator(".badge")).to_have_text("done", timeout=120_000)
    total = f"{size / (1 << 20):,.1f} MiB"
    expect(pull.locator(".bytes")).to_have_text(f"{total} / {total}")
    expect(model_row(page, "pulled").locator(".badge").first).to_have_text("unloaded")
    assert page.evaluate("window.notReloaded") is True
    fits_a_phone(page)
    seen = [s for s in hub.gets("/files/") if s.body_bytes]
    assert sum(s.body_bytes for s in seen) == size

    # the same name again: refused next to the id field, as the API's 409
    page.get_by_label("Pull source").fill(hub.url(FILE))
    page.get_by_label("Pulled model id").fill("pulled")
    with page.expect_response(re.compile("/console/models/pulls$")) as answer:
        page.get_by_role("button", name="Start pull").click()
    assert answer.value.status == 409
    expect(page.locator("#f-pull_id-error")).to_contain_text("already used")


def test_a_providers_key_is_never_rendered(context: BrowserContext, site: Server) -> None:
    page = context.new_page()
    sign_in(page, site.keys["owner"], "/console/providers")
    page.get_by_label("Name").fill("partner")
    page.get_by_label("Base URL").fill("http://127.0.0.1:9/v1")
    page.get_by_label("API key").fill(CANARY)
    page.get_by_label("Extra headers").fill("X-Tenant: canary-header-value")
    page.get_by_label("Retries").fill("11")  # over the API's limit
    page.get_by_role("button", name="Add provider").click()
    expect(page.locator("#f-retries-error")).to_be_visible()
    assert CANARY not in page.content() and "canary-header-value" not in page.content()
    expect(page.get_by_label("API key")).to_have_value("")  # typed again, not sent back
    expect(page.get_by_label("Base URL")).to_have_value("http://127.0.0.1:9/v1")

    page.get_by_label("API key").fill(CANARY)
    page.get_by_label("Extra headers").fill("X-Tenant: canary-header-value")
    page.get_by_label("Retries").fill("3")
    page.get_by_role("button", name="Add provider").click()
    row = page.get_by_role("row", name=re.compile("^partner"))
    expect(row).to_contain_text("set")
    expect(row).to_contain_text("X-Tenant")
    expect(row).to_contain_text("no request yet")
    assert CANARY not in page.content() and "canary-header-value" not in page.content()
    shot(page, "providers")
    fits_a_phone(page)

    page.get_by_role("link", name="partner").click()
    expect(page.get_by_role("heading", name="partner")).to_be_visible()
    assert CANARY not in page.content()
    expect(page.get_by_label("API key")).to_have_value("")
    page.get_by_label("Timeout (s)", exact=True).fill("0")
    page.get_by_label("API key").fill(CANARY + "-new")
    page.get_by_role("button", name="Save").click()
    expect(page.locator("#f-timeout-error")).to_be_visible()
    assert CANARY not in page.content()
    page.get_by_label("Timeout (s)", exact=True).fill("9")
    page.get_by_role("button", name="Save").click()  # the key field is empty: kept
    expect(page.get_by_label("Timeout (s)", exact=True)).to_have_value("9")
    with api(site) as client:
        shown = ok(client.get("/providers/partner"))
        assert (shown["has_api_key"], shown["timeout"], shown["retries"]) == (True, 9.0, 3)
        assert CANARY not in client.get("/providers").text
    for url in ("/console/providers", "/console/providers/partner"):
        assert CANARY not in page.request.get(url).text()

    # a partner model of it, added on the Models page
    page.goto("/console/models")
    page.get_by_label("Model id", exact=True).fill("partner-model")
    page.get_by_label("Engine").select_option("upstream")
    page.get_by_label("Provider").fill("partner")
    page.get_by_role("button", name="Add model").click()
    expect(page.locator("#f-provider-error")).to_contain_text("upstream model id")
    page.get_by_label("Upstream model").fill("gpt-partner")
    page.get_by_role("button", name="Add model").click()
    row = model_row(page, "partner-model")
    expect(row).to_contain_text("partner · gpt-partner")
    expect(row).to_contain_text("upstream")
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Remove partner-model", exact=True).click()
    expect(model_row(page, "partner-model")).to_have_count(0)
    page.goto("/console/providers/partner")

    # without the session's CSRF token nothing changes, on either page
    for action, form in (("/console/providers/partner/remove", {}),
                         ("/console/providers", {"name": "no-token", "base_url": "http://x"}),
                         (f"/console/models/{PINNED}/unpin", {}),
                         ("/console/models/pulls", {"pull_source": "http://127.0.0.1:9/a.gguf"})):
        resp = page.request.post(action, form=form)
        assert resp.status == 403 and "CSRF" in resp.text(), action
    assert state_of(site, PINNED)["pinned"]

    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Remove provider").click()
    expect(page).to_have_url(re.compile("/console/providers$"))
    expect(page.get_by_role("row", name=re.compile("^partner"))).to_have_count(0)


def test_a_read_only_admin_sees_but_cannot_act(context: BrowserContext, site: Server) -> None:
    with api(site) as client:
        ok(client.post("/providers", json={"name": "kept", "base_url": "http://127.0.0.1:9"}),
           201)
    page = context.new_page()
    sign_in(page, site.admin_key("viewer"), "/console/models")
    expect(model_row(page, PINNED).locator(".badge").first).to_have_text("ready")
    for absent in ("Add model", "Start pull", f"Unload {PINNED}", f"Unpin {PINNED}",
                   f"Remove {PINNED}"):
        expect(page.get_by_role("button", name=absent)).to_have_count(0)
    page.goto("/console/providers")
    expect(page.get_by_role("row", name=re.compile("^kept"))).to_be_visible()
    expect(page.get_by_role("button", name="Add provider")).to_have_count(0)
    token = csrf_of(page)
    for action, form in ((f"/console/models/{PINNED}/unload", {}),
                         (f"/console/models/{PINNED}/unpin", {}),
                         (f"/console/models/{PINNED}/remove", {}),
                         ("/console/models", {"id": "sneaky", "source": BUNDLED}),
                         ("/console/models/pulls", {"pull_source": "http://127.0.0.1:9/a.gguf"}),
                         ("/console/providers", {"name": "sneaky", "base_url": "http://x"}),
                         ("/console/providers/kept", {"retries": "7"}),
                         ("/console/providers/kept/remove", {})):
        resp = page.request.post(action, form={"csrf_token": token, **form})
        assert resp.status == 403, action
    shown = state_of(site, PINNED)
    assert (shown["state"], shown["pinned"]) == ("ready", True)
    with api(site) as client:
        assert ok(client.get("/providers/kept"))["retries"] == 2
        assert client.get("/models/sneaky").status_code == 404
        assert client.get("/providers/sneaky").status_code == 404


def test_an_organization_admin_reaches_no_installation_action(context: BrowserContext,
                                                              site: Server) -> None:
    with api(site) as client:
        mine = ok(client.post("/organizations", json={"name": "model-org"}), 201)
        other = ok(client.post("/organizations", json={"name": "other-model-org"}), 201)
        ok(client.post("/models", json={"id": "theirs-only", "source": BUNDLED,
                                        "organizations": [other["id"]]}), 201)
    org_admin = site.admin_key("admin", mine["id"])
    # the API's answers, which the console's must match
    with site.admin(org_admin) as client:
        assert client.get("/providers").status_code == 403
        assert client.get("/models/pulls").status_code == 403
        assert client.post(f"/models/{PINNED}/unload").status_code == 403
        assert client.get("/models/theirs-only").status_code == 404
    page = context.new_page()
    sign_in(page, org_admin, "/console/models")
    expect(model_row(page, PINNED)).to_be_visible()
    expect(model_row(page, "theirs-only")).to_have_count(0)
    assert "theirs-only" not in page.content() and BUNDLED not in page.content()
    expect(page.locator("#pulls")).to_have_count(0)
    expect(page.get_by_role("button", name="Add model")).to_have_count(0)
    expect(page.get_by_role("link", name="Providers")).to_have_count(0)
    response = page.goto("/console/providers")
    assert response is not None and response.status == 403
    response = page.goto("/console/providers/kept")
    assert response is not None and response.status == 403
    page.goto("/console/models")
    token = csrf_of(page)
    for action, form in ((f"/console/models/{PINNED}/unload", {}),
                         ("/console/models/theirs-only/load", {}),
                         ("/console/models", {"id": "org-added", "source": BUNDLED}),
                         ("/console/models/pulls", {"pull_source": "http://127.0.0.1:9/a.gguf"}),
                         ("/console/providers", {"name": "org-made", "base_url": "http://x"})):
        resp = page.request.post(action, form={"csrf_token": token, **form})
        assert resp.status == 403, action
    assert state_of(site, PINNED)["state"] == "ready"
    assert state_of(site, "theirs-only")["state"] == "unloaded"
