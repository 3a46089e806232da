"""What `aicloud serve` needs to run the catalog's upstream models: the pool builds each
with `make_upstream_engine` over these links (one per provider)."""

from __future__ import annotations

from aicloud.config import Settings
from aicloud.providers.link import ProviderLinks
from aicloud.providers.store import ProviderStore, secret_box
from aicloud.store import db


def provider_links(settings: Settings) -> ProviderLinks:
    """The links every upstream engine of this process shares (one per provider), reading
    providers from the database on first use: what the pool's upstream factory needs,
    `partial(make_upstream_engine, providers=provider_links(settings))`."""
    store = ProviderStore(db.session_factory(db.create_engine_async(settings.db_url)),
                          secret_box(settings))
    return ProviderLinks(store)
