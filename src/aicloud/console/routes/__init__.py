"""The console's pages; the order of the imports is the order of the navigation."""

from __future__ import annotations

from fastapi import APIRouter

from aicloud.console.routes import accounts, keys, overview, playground, prices, session, usage

router = APIRouter(include_in_schema=False)
for module in (session, overview, accounts, keys, usage, prices, playground):
    router.include_router(module.router)
