"""The application factory: wires settings, store, accounts, billing and engines."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from starlette.middleware.cors import CORSMiddleware

from aicloud import console
from aicloud.api import errors, openapi
from aicloud.api.body_limit import BodyLimit
from aicloud.api.deps import clean_params
from aicloud.api.request_id import RequestId
from aicloud.api.routes import admin, embeddings, health, metrics, openai, responses
from aicloud.api.telemetry import Telemetry
from aicloud.config import Settings
from aicloud.models.pool import ModelPool
from aicloud.models.pulls import Pulls
from aicloud.services import open_cloud
from aicloud.store import migrate
from aicloud.tasks import supervised

log = logging.getLogger(__name__)

# what a browser client may read from a response (the openai SDK reads all of these)
EXPOSED_HEADERS = ["x-request-id", "retry-after", *(
    f"x-ratelimit-{what}-{unit}" for what in ("limit", "remaining", "reset")
    for unit in ("requests", "tokens"))]


def create_app(settings: Settings, pool: ModelPool) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.prepare_home()
        # the schema and the weights are independent: get both ready at once
        await asyncio.gather(asyncio.to_thread(migrate.upgrade, settings.db_url), pool.start())
        cloud = open_cloud(settings)
        app.state.cloud = cloud
        app.state.pool = pool
        app.state.pulls = Pulls(cloud.catalog, settings.home_dir)
        app.state.background = set()
        app.state.telemetry = Telemetry()
        app.state.fair_share_by = settings.fair_share_by
        app.state.prefix_cache_scope = settings.prefix_cache_scope
        app.state.metrics_public = settings.metrics_public
        # bill what crashed servers were running, then keep this one's progress journal
        await cloud.journal.start(settings.home_dir, settings.host, settings.port)
        journal = asyncio.create_task(supervised("progress journal", cloud.journal.run))
        housekeeping = asyncio.create_task(supervised("housekeeping", cloud.maintain))
        log.info("serving models: %s", ", ".join(c.id for c in pool.cards()))
        try:
            yield
        finally:
            pending = list(app.state.background)
            if pending:
                await asyncio.wait(pending, timeout=10)
            housekeeping.cancel()
            journal.cancel()
            await app.state.pulls.close()
            await pool.close()
            await cloud.journal.close()
            await cloud.close()

    app = FastAPI(title="aicloud", version="0.1.0", lifespan=lifespan,
                  dependencies=[Depends(clean_params)])
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    if origins := settings.cors_origin_list:
        # outside the body limit and the routes, so a preflight never reaches auth
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=EXPOSED_HEADERS,
                           max_age=600)
    app.add_middleware(RequestId)  # outermost: every response, a preflight's included
    errors.install(app)
    app.include_router(openai.router)
    app.include_router(responses.router)
    app.include_router(embeddings.router)
    app.include_router(admin.router)
    app.include_router(health.router)
    app.include_router(metrics.router)
    if settings.console:
        console.install(app, settings)
    app.openapi = lambda: openapi.describe(app)  # type: ignore[method-assign]
    return app
