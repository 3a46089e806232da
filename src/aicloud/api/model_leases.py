"""Releases the models a request leased from the pool once its response has been sent
(a stream included), so the pool never unloads a model between a request's steps."""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from aicloud.models.pool import Lease

LEASES = "pool_leases"


def hold(request: Request, lease: Lease) -> None:
    """Keep `lease` until the response to `request` is finished."""
    leases: list[Lease] = getattr(request.state, LEASES, [])
    leases.append(lease)
    setattr(request.state, LEASES, leases)


class ReleaseLeases:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})  # where Request.state keeps what `hold` adds
        try:
            await self.app(scope, receive, send)
        finally:
            for lease in scope.get("state", {}).get(LEASES, ()):
                lease.release()
