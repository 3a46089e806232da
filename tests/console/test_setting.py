"""`AICLOUD_CONSOLE=false` leaves no console route behind; on, the sign-in page is served
with the console's headers (no lifespan needed: the sign-in form reads no database)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from aicloud.api.app import create_app
from aicloud.config import Settings
from aicloud.models.pool import ModelPool


@pytest.mark.parametrize("on", [True, False])
def test_the_console_setting(on: bool) -> None:
    client = TestClient(create_app(Settings(console=on), ModelPool({})))
    page = client.get("/console/sign-in")
    style = client.get("/console/static/console.css")
    if not on:
        assert (page.status_code, style.status_code) == (404, 404)
        return
    assert page.status_code == 200 and 'name="key" type="password"' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["cache-control"] == "no-store"
    assert "httponly" in page.headers["set-cookie"].lower()
    assert style.status_code == 200 and "text/css" in style.headers["content-type"]
