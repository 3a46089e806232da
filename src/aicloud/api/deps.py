"""Route dependencies as named aliases, so a route's signature says what it needs."""

from __future__ import annotations

import json
from typing import Annotated, TypeVar

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
    return request.app.state.cloud


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
    return request.app.state.pool


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]
CurrentAdmin = Annotated[AdminScope, Depends(current_admin)]
CloudDep = Annotated[Cloud, Depends(cloud)]
PoolDep = Annotated[ModelPool, Depends(model_pool)]


async def parse_body(request: Request, schema: type[Body]) -> Body:
    """Parse JSON ourselves: deep nesting or bad UTF-8 become a 400, not a 500."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise invalid("the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise invalid("the request body must be a JSON object")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        message, param = validation_message(exc.errors(include_url=False))
        raise invalid(message, param) from None
    except RecursionError:
        raise invalid("the request body is nested too deeply") from None
