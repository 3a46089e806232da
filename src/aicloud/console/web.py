"""What every console page shares: the session behind the cookie, CSRF checks, rendering,
the navigation, and errors as pages.

Roles and organization scope are not checked here: every action calls the same service
method as its `/admin/v1` route, with the session's `AdminScope`, so the console can do
exactly what its admin key can, and a foreign id is a 404 as it is there.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from aicloud.accounts.base import AccountError, Forbidden, NotFound
from aicloud.accounts.console_sessions import ConsoleSessions, SignedIn, same_secret
from aicloud.api.errors import error_response
from aicloud.billing.money import MoneyError, pico_to_usd
from aicloud.models.pool import ModelPool
from aicloud.services import Cloud
from aicloud.store.db import session_factory

COOKIE = "aicloud_console"
PRE_COOKIE = "aicloud_console_pre"  # the sign-in form's CSRF token, before any session
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
SECURITY_HEADERS = {
    # no inline script, nothing from elsewhere: the pages work offline and an injected
    # <script> would not run
    "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; frame-ancestors 'none'; "
                               "form-action 'self'; base-uri 'none'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}


@dataclass(slots=True)
class ConsoleConfig:
    lifetime: timedelta
    sign_in_attempts: int  # failed sign-ins per minute per client address
    sessions: ConsoleSessions | None = None  # built on first use, over the cloud's database


class SignInRequired(Exception):
    """No live session: pages send the browser to sign in, JSON calls get a 401."""


class CsrfRefused(Exception):
    """A state-changing request without its session's CSRF token."""


# -- the session ------------------------------------------------------------------------------

def cloud_of(request: Request) -> Cloud:
    cloud: Cloud = request.app.state.cloud
    return cloud


def pool_of(request: Request) -> ModelPool:
    pool: ModelPool = request.app.state.pool
    return pool


async def model_ids(request: Request, organization_id: str | None) -> list[str]:
    """The catalog's models an organization may use (None: the installation's, all)."""
    return [c.id for c in await pool_of(request).cards(organization_id)]


def config_of(request: Request) -> ConsoleConfig:
    config: ConsoleConfig = request.app.state.console
    return config


def console_sessions(request: Request) -> ConsoleSessions:
    config = config_of(request)
    if config.sessions is None:
        cloud = cloud_of(request)
        config.sessions = ConsoleSessions(session_factory(cloud.database), cloud.admin_keys,
                                          config.lifetime)
    return config.sessions


async def signed_in(request: Request) -> SignedIn:
    found = await console_sessions(request).resolve(request.cookies.get(COOKIE))
    if found is None:
        raise SignInRequired
    request.state.signed = found  # for error pages, which show the navigation
    return found


async def acting(request: Request, signed: Annotated[SignedIn, Depends(signed_in)]) -> SignedIn:
    """A state-changing request: the session's CSRF token must come with it, in the form
    (`csrf_token`) or, from scripts, in the `X-CSRF-Token` header."""
    given = request.headers.get(CSRF_HEADER)
    if given is None and request.headers.get("content-type", "").startswith(
            ("application/x-www-form-urlencoded", "multipart/form-data")):
        value = (await request.form()).get(CSRF_FIELD)
        given = value if isinstance(value, str) else None
    if not same_secret(given, signed.csrf_token):
        raise CsrfRefused
    return signed


SignedInDep = Annotated[SignedIn, Depends(signed_in)]
ActingDep = Annotated[SignedIn, Depends(acting)]


# -- rendering --------------------------------------------------------------------------------

def usd(pico: int | None) -> str:
    return "—" if pico is None else "$" + pico_to_usd(pico)


def usd_text(amount: str | Decimal | None) -> str:
    return "—" if amount is None else f"${amount}"


def count(value: int | float | None) -> str:
    return "—" if value is None else f"{value:,}"


def when(moment: datetime | None) -> str:
    return "—" if moment is None else moment.strftime("%Y-%m-%d %H:%M UTC")


def size(n: int | None) -> str:
    """Bytes as MiB (GiB from 10 GiB on): model memory and pull progress."""
    if n is None:
        return "—"
    if n >= 10 << 30:
        return f"{n / (1 << 30):,.1f} GiB"
    return f"{n / (1 << 20):,.1f} MiB"


templates = Environment(loader=PackageLoader("aicloud.console", "templates"),
                        autoescape=select_autoescape(default=True), undefined=StrictUndefined,
                        trim_blocks=True, lstrip_blocks=True)
templates.filters.update(usd=usd, usd_text=usd_text, count=count, when=when, size=size)


@dataclass(slots=True, frozen=True)
class NavItem:
    position: int
    path: str
    label: str
    installation: bool = False  # only installation-wide admin keys may open the page

    def shown_to(self, signed: SignedIn) -> bool:
        return not self.installation or signed.scope.installation_wide


NAV: list[NavItem] = []


def nav_page(router: APIRouter, path: str, label: str, position: int,
             installation: bool = False) -> Callable[[Any], Any]:
    """A page with its own entry in the navigation, at `position` (left to right): a new
    page is this decorator on its route and one template. `installation`: the entry is
    left out for organization-scoped keys (the page refuses them all the same)."""
    NAV.append(NavItem(position, router.prefix + path, label, installation))
    NAV.sort(key=lambda item: item.position)
    return router.get(path, response_class=HTMLResponse)


@dataclass(slots=True)
class Form:
    """What a form shows again after a refusal: the values sent and an error per field."""

    values: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def value(self, name: str, default: object = "") -> str:
        got = self.values.get(name)
        return got if got is not None else ("" if default is None else str(default))


async def render(request: Request, template: str, status: int = 200,
                 headers: dict[str, str] | None = None, **context: Any) -> HTMLResponse:
    """Rendered on a worker thread: the event loop never waits on a template."""
    signed: SignedIn | None = getattr(request.state, "signed", None)
    page = templates.get_template(template)
    html = await asyncio.to_thread(page.render, nav=NAV, signed=signed,
                                   path=request.url.path, **context)
    return HTMLResponse(html, status_code=status, headers=headers)


def see_other(path: str) -> RedirectResponse:
    return RedirectResponse(path, status_code=303)


# -- errors as pages ----------------------------------------------------------------------------

def _wants_html(request: Request) -> bool:
    """Pages and forms get pages; the scripts' calls (JSON, or a POST carrying the CSRF
    header) get OpenAI-shaped JSON errors, as the rest of the server answers."""
    if "text/html" in request.headers.get("accept", ""):
        return True
    return request.method == "POST" and CSRF_HEADER not in request.headers


async def _error_page(request: Request, status: int, title: str, message: str) -> Response:
    if not _wants_html(request):
        return error_response(status, message)
    return await render(request, "error.html", status, title=title, message=message)


async def _refusal(request: Request, exc: Exception) -> Response:
    if isinstance(exc, SignInRequired):
        if request.method == "GET" and _wants_html(request):
            return see_other(f"/console/sign-in?next={quote(request.url.path)}")
        return await _error_page(request, 401, "Signed out",
                                 "Your console session has ended; sign in again.")
    if isinstance(exc, CsrfRefused):
        return await _error_page(request, 403, "Refused", "This form has expired or did not "
                                 "come from the console (missing CSRF token). Reload the page "
                                 "and try again.")
    if isinstance(exc, NotFound):
        return await _error_page(request, 404, "Not found", str(exc))
    if isinstance(exc, Forbidden):
        return await _error_page(request, 403, "Not allowed", str(exc))
    return await _error_page(request, 400, "Refused", str(exc))


class ConsoleRoute(APIRoute):
    """Console refusals become pages (a sign-in redirect, a 404 page), and every response
    carries the console's security headers. Other errors go to the app's handlers."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handler(request: Request) -> Response:
            started = time.perf_counter()
            try:
                response = await handle(request)
            except (SignInRequired, CsrfRefused, NotFound, Forbidden, AccountError,
                    MoneyError) as exc:
                response = await _refusal(request, exc)
            for name, value in SECURITY_HEADERS.items():
                response.headers.setdefault(name, value)
            # the page's server time (queries + render), shown by browsers' dev tools and
            # read by bench/console.py
            elapsed = (time.perf_counter() - started) * 1000
            response.headers["server-timing"] = f"app;dur={elapsed:.1f}"
            return response

        return handler
