"""The console's pages (the navigation follows each page's `nav_page` position)."""

from __future__ import annotations

from fastapi import APIRouter

from aicloud.console.routes import (
    accounts,
    keys,
    models,
    overview,
    playground,
    prices,
    providers,
    session,
    usage,
)

router = APIRouter(include_in_schema=False)
for module in (session, overview, accounts, keys, usage, models, providers, prices, playground):
    router.include_router(module.router)
