"""The admin API under /admin/v1, authenticated by admin keys (never by API keys)."""

from __future__ import annotations

from fastapi import APIRouter

from aicloud.api.routes.admin import accounts, billing, models, providers, pulls

router = APIRouter(prefix="/admin/v1", tags=["admin"])
router.include_router(accounts.router)
router.include_router(billing.router)
# before models: /models/pulls is not a model called "pulls"
router.include_router(pulls.router)
router.include_router(models.router)
router.include_router(providers.router)
