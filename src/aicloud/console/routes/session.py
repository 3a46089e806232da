"""Signing in with an admin key, and out.

Failed sign-ins are rate limited per client address through the cloud's limiter (Redis
when configured, so every server counts together): each attempt takes a unit before the
key is checked and a success gives it back, so only failures drain the bucket and a
blocked address cannot test keys at all. The address is the socket's peer (or what a
trusted proxy says through uvicorn's --forwarded-allow-ips), never a client header.
"""

from __future__ import annotations

import secrets
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from aicloud.accounts.console_sessions import same_secret
from aicloud.console.forms import text
from aicloud.console.web import (
    COOKIE,
    CSRF_FIELD,
    PRE_COOKIE,
    ActingDep,
    ConsoleRoute,
    CsrfRefused,
    Form,
    cloud_of,
    config_of,
    console_sessions,
    render,
    see_other,
)
from aicloud.limits.buckets import Take

router = APIRouter(prefix="/console", route_class=ConsoleRoute)


def _landing(target: str) -> str:
    """Only a console path: `next` must not send anyone to another site."""
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/console") or "\\" in target:
        return "/console/"
    return target


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


async def _form(request: Request, form: Form, status: int = 200,
                headers: dict[str, str] | None = None) -> HTMLResponse:
    token = request.cookies.get(PRE_COOKIE) or secrets.token_urlsafe(32)
    page = await render(request, "sign_in.html", status, headers, form=form, pre_token=token,
                        next=_landing(request.query_params.get("next", "/console/")))
    page.set_cookie(PRE_COOKIE, token, httponly=True, samesite="strict",
                    secure=_secure(request), path="/console")
    return page


@router.get("/sign-in", response_class=HTMLResponse)
async def sign_in_page(request: Request) -> HTMLResponse:
    return await _form(request, Form())


@router.post("/sign-in", response_class=HTMLResponse)
async def sign_in(request: Request) -> Response:
    form = await request.form()
    given = form.get(CSRF_FIELD)
    if not same_secret(given if isinstance(given, str) else None,
                       request.cookies.get(PRE_COOKIE) or "\x00"):
        raise CsrfRefused
    config = config_of(request)
    limiter = cloud_of(request).limits.limiter
    peer = request.client.host if request.client else "unknown"
    attempt = [Take(f"console-sign-in:{peer}", config.sign_in_attempts, 1)]
    outcome = await limiter.take(attempt)
    if not outcome.allowed:
        wait = max(1, round(outcome.retry_after))
        return await _form(request, Form(errors={"key": f"Too many failed sign-ins from "
                                                 f"this address; try again in {wait} s."}),
                           429, {"retry-after": str(wait)})
    opened = await console_sessions(request).open(text(form, "key"))
    if opened is None:
        return await _form(request, Form(errors={"key": "That is not a valid admin key "
                                                 "(it may have been revoked)."}), 401)
    await limiter.give_back(attempt)
    token, _ = opened
    response = see_other(_landing(text(form, "next") or "/console/"))
    response.set_cookie(COOKIE, token, max_age=int(config.lifetime.total_seconds()),
                        httponly=True, samesite="strict", secure=_secure(request),
                        path="/console")
    response.delete_cookie(PRE_COOKIE, path="/console", httponly=True, samesite="strict",
                           secure=_secure(request))
    return response


@router.post("/sign-out", response_class=HTMLResponse)
async def sign_out(request: Request, _: ActingDep) -> Response:
    await console_sessions(request).close(request.cookies.get(COOKIE, ""))
    response = see_other("/console/sign-in")
    response.delete_cookie(COOKIE, path="/console", httponly=True, samesite="strict",
                           secure=_secure(request))
    return response
