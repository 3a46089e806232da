"""The browser the console's tests drive: Debian's chromium (Playwright's own download is
not reachable), one per test module, and a fresh context per test on the module's `site`
(each module starts its own server as `site`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, BrowserContext, sync_playwright

from tests.conftest import Server

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def context(browser: Browser, site: Server) -> Iterator[BrowserContext]:
    ctx = browser.new_context(base_url=site.base_url, viewport={"width": 1280, "height": 900})
    ctx.set_default_timeout(30_000)
    yield ctx
    ctx.close()
