"""Route dependencies as named aliases, so a route's signature says what it needs."""

from __future__ import annotations

import json
from typing import Annotated, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel, ValidationError

from aicloud.accounts.keys import KeyService, Principal
from aicloud.api.errors import APIError, invalid, validation_message
from aicloud.billing.usage import UsageLedger
from aicloud.models.pool import ModelPool

Body = TypeVar("Body", bound=BaseModel)


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(401, "Missing API key: send it as 'Authorization: Bearer <key>'.",
                       code="invalid_api_key")
    return token.strip()


async def current_principal(request: Request) -> Principal:
    keys: KeyService = request.app.state.keys
    principal = await keys.authenticate(_bearer(request))
    if principal is None:
        raise APIError(401, "Incorrect or revoked API key.", code="invalid_api_key")
    return principal


def model_pool(request: Request) -> ModelPool:
    return request.app.state.pool


def usage_ledger(request: Request) -> UsageLedger:
    return request.app.state.ledger


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]
PoolDep = Annotated[ModelPool, Depends(model_pool)]
LedgerDep = Annotated[UsageLedger, Depends(usage_ledger)]


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
