"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Every failure leaves through these handlers, so no stack trace or secret reaches a client.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from aicloud.accounts.base import AccountError, Forbidden, NotFound
from aicloud.billing.money import MoneyError
from aicloud.engines.base import EngineUnavailable
from aicloud.store.direct import DatabaseUnavailable

log = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
    503: "server_error",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None,
                 kind: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers, self.kind = headers, kind


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None, kind: str | None = None) -> dict[str, Any]:
    kind = kind or ERROR_TYPES.get(
        status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None,
                   kind: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code, kind), status_code=status,
                        headers=headers)


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def validation_message(errors: Sequence[Any]) -> tuple[str, str | None]:
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = loc[0] if loc else None
    return f"{param or 'request'}: {first.get('msg', 'invalid value')}", param


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers,
                              exc.kind)

    @app.exception_handler(AccountError)
    async def _account(_: Request, exc: AccountError) -> JSONResponse:
        return error_response(400, str(exc), exc.param)

    @app.exception_handler(MoneyError)
    async def _money(_: Request, exc: MoneyError) -> JSONResponse:
        return error_response(400, str(exc))

    @app.exception_handler(NotFound)
    async def _not_found(_: Request, exc: NotFound) -> JSONResponse:
        return error_response(404, str(exc), code="not_found")

    @app.exception_handler(Forbidden)
    async def _forbidden(_: Request, exc: Forbidden) -> JSONResponse:
        return error_response(403, str(exc), code="insufficient_permissions")

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc.errors())
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = "not found" if exc.status_code == 404 else str(exc.detail)
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(EngineUnavailable)
    async def _unavailable(_: Request, exc: EngineUnavailable) -> JSONResponse:
        return error_response(503, exc.message, code="model_unavailable",
                              headers={"retry-after": str(max(1, round(exc.retry_after)))})

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    @app.exception_handler(DatabaseUnavailable)
    async def _database_away(request: Request, exc: Exception) -> JSONResponse:
        cause = exc.__cause__ if isinstance(exc, DatabaseUnavailable) else exc
        log.warning("database unavailable on %s: %s", request.url.path, type(cause).__name__)
        return error_response(503, "The service's database is unavailable; please retry "
                              "shortly.", code="database_unavailable",
                              headers={"retry-after": "2"})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled %s on %s", type(exc).__name__, request.url.path, exc_info=exc)
        return error_response(500, "internal server error")
