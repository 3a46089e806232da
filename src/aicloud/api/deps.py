"""Route dependencies as named aliases, so a route's signature says what it needs."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel, ValidationError

from aicloud.accounts.base import AdminScope
from aicloud.accounts.keys import Principal
from aicloud.api.errors import APIError, invalid, validation_message
from aicloud.models.pool import ModelPool
from aicloud.services import Cloud

Body = TypeVar("Body", bound=BaseModel)


def _bearer(request: Request) -> str:
    """The key from `Authorization: Bearer <key>`, or from Azure OpenAI's `api-key: <key>`
    header (what Azure-style clients send) when there is no Authorization header."""
    header = request.headers.get("authorization")
    if header is None and (azure := request.headers.get("api-key", "").strip()):
        return azure
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(401, "Missing API key: send it as 'Authorization: Bearer <key>' "
                       "or 'api-key: <key>'.", code="invalid_api_key")
    return token.strip()


def _cloud(request: Request) -> Cloud:
    cloud: Cloud = request.app.state.cloud  # set by create_app; Starlette's state is untyped
    return cloud


# dependencies are `async def` even when they do not await: FastAPI runs a plain `def`
# dependency in its thread pool, a thread hop per request for reading an attribute
async def cloud(request: Request) -> Cloud:
    return _cloud(request)


async def current_principal(request: Request) -> Principal:
    principal = await _cloud(request).keys.authenticate(_bearer(request))
    if principal is None:
        raise APIError(401, "Incorrect, expired or revoked API key.", code="invalid_api_key")
    return principal


async def current_admin(request: Request) -> AdminScope:
    """Admin keys only; network origin (X-Forwarded-For and the like) never grants anything."""
    scope = await _cloud(request).admin_keys.authenticate(_bearer(request))
    if scope is None:
        raise APIError(401, "Incorrect or revoked admin key.", code="invalid_api_key")
    return scope


async def model_pool(request: Request) -> ModelPool:
    pool: ModelPool = request.app.state.pool
    return pool


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]
CurrentAdmin = Annotated[AdminScope, Depends(current_admin)]
CloudDep = Annotated[Cloud, Depends(cloud)]
PoolDep = Annotated[ModelPool, Depends(model_pool)]


# JSON may carry "\u0000" and lone surrogates ("\ud800"), valid in a Python str: neither
# can be stored (PostgreSQL text refuses NUL; UTF-8 has no lone surrogates), nor encoded
# for a tokenizer, so both used to surface as 500s from deep inside
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _flaw(text: str, pattern: re.Pattern[str]) -> str | None:
    found = pattern.search(text)
    if found is None:
        return None
    return "a NUL character" if found[0] == "\x00" else "a lone surrogate (invalid Unicode)"


def check_text(data: Any, text_fields: tuple[str, ...] = ()) -> None:
    """Refuse, by its path (`messages.0.content`), the first string in a parsed body that
    no database or tokenizer can take. Strings under `text_fields` are text for the model
    and never stored, so NUL is allowed there; lone surrogates nowhere."""
    stack: list[tuple[str, Any, bool]] = [("", data, False)]
    while stack:
        path, value, free = stack.pop()
        if isinstance(value, str):
            flaw = _flaw(value, LONE_SURROGATE if free else UNSTORABLE)
            if flaw:
                raise invalid(f"{path}: the string contains {flaw}", path)
        elif isinstance(value, dict):
            for key, item in value.items():
                if flaw := _flaw(key, UNSTORABLE):
                    raise invalid(f"{path or 'request'}: a field name contains {flaw}",
                                  path or None)
                stack.append((f"{path}.{key}" if path else key, item,
                              free or (not path and key in text_fields)))
        elif isinstance(value, list):
            stack.extend((f"{path}.{i}", item, free) for i, item in enumerate(value))


async def clean_params(request: Request) -> None:
    """Path and query parameters reach the database too (ids, filters): a NUL in one
    (`%00`) is a 400 naming it, on every route."""
    for name, value in (*request.path_params.items(), *request.query_params.multi_items()):
        if not isinstance(value, str):
            continue
        if _flaw(name, UNSTORABLE):
            raise invalid("a query parameter name contains a NUL character")
        if flaw := _flaw(value, UNSTORABLE):
            raise invalid(f"{name}: the value contains {flaw}", name)


async def parse_body(request: Request, schema: type[Body],
                     text_fields: tuple[str, ...] = ()) -> Body:
    """Parse JSON ourselves: deep nesting, bad UTF-8, NUL characters and lone surrogates
    become a 400 naming the field, not a 500. See `check_text` for `text_fields`."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise invalid("the request body is not valid JSON") from None
    return validate_body(data, schema, text_fields)


def validate_body(data: Any, schema: type[Body], text_fields: tuple[str, ...] = ()) -> Body:
    """A parsed body (an HTTP request's, a batch line's) checked as `parse_body` does."""
    if not isinstance(data, dict):
        raise invalid("the request body must be a JSON object")
    check_text(data, text_fields)
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        message, param = validation_message(exc.errors(include_url=False))
        raise invalid(message, param) from None
    except RecursionError:
        raise invalid("the request body is nested too deeply") from None
