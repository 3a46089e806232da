"""The catalog's upstream models as engines, for `aicloud serve`. Read once at start:
a model or provider added later is served after a restart (the pool, which loads
catalog models on demand, will replace this)."""

from __future__ import annotations

import asyncio

from aicloud.config import Settings
from aicloud.engines.base import Engine
from aicloud.engines.upstream import make_upstream_engine
from aicloud.models.catalog import Catalog, CatalogEntry, EngineKind
from aicloud.providers.link import ProviderLinks
from aicloud.providers.store import ProviderStore, secret_box
from aicloud.store import db, migrate


async def _upstream_entries(url: str) -> list[CatalogEntry]:
    engine = db.create_engine_async(url)
    try:
        entries = await Catalog(db.session_factory(engine)).entries()
    finally:
        await engine.dispose()
    return [e for e in entries if e.engine is EngineKind.UPSTREAM]


def upstream_engines(settings: Settings) -> dict[str, Engine]:
    """Engines for the catalog's upstream models, sharing one link per provider. Their
    provider is read on each model's first request, so a missing or broken provider
    makes that model answer 503, not the server fail to start."""
    settings.prepare_home()
    migrate.upgrade(settings.db_url)
    entries = asyncio.run(_upstream_entries(settings.db_url))
    if not entries:
        return {}
    links = provider_links(settings)
    return {e.id: make_upstream_engine(e, links) for e in entries}


def provider_links(settings: Settings) -> ProviderLinks:
    """The links every upstream engine of this process shares (one per provider), reading
    providers from the database on first use: what the pool's upstream factory needs,
    `partial(make_upstream_engine, providers=provider_links(settings))`."""
    store = ProviderStore(db.session_factory(db.create_engine_async(settings.db_url)),
                          secret_box(settings))
    return ProviderLinks(store)
