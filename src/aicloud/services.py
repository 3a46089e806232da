"""The cloud layer's services over one database (and Redis when configured): built once
by the server's lifespan or by a CLI command, so both run the very same code."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from aicloud.accounts.admin_keys import AdminKeyService
from aicloud.accounts.keys import KeyService
from aicloud.accounts.orgs import OrgService
from aicloud.billing.budgets import Budgets
from aicloud.billing.journal import Journal, new_instance_id
from aicloud.billing.prices import PriceBook
from aicloud.billing.reports import Reports
from aicloud.billing.usage import UsageLedger
from aicloud.config import Settings
from aicloud.limits.buckets import Limiter, MemoryLimiter
from aicloud.limits.policy import RateLimits
from aicloud.models.catalog import Catalog
from aicloud.providers.store import ProviderStore, secret_box
from aicloud.responses.store import ResponseStore
from aicloud.store import db
from aicloud.store.direct import DatabaseUnavailable, Direct, vacuum_churn_tables

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Cloud:
    database: AsyncEngine
    direct: Direct
    orgs: OrgService
    keys: KeyService
    admin_keys: AdminKeyService
    prices: PriceBook
    budgets: Budgets
    ledger: UsageLedger
    reports: Reports
    limits: RateLimits
    journal: Journal
    responses: ResponseStore
    catalog: Catalog
    providers: ProviderStore

    async def maintain(self, every: float = 5.0, vacuum_every: int = 2) -> None:
        """The server's housekeeping task: write spooled usage once the database is back,
        drop budget holds that outlived their (crashed) request, and (every
        `vacuum_every` rounds) vacuum the request path's tables if nothing else does.
        Each chore fails alone: an error is logged and the next round runs all the same
        (an unreachable database is expected during an outage and only noted at debug)."""
        for round_ in itertools.count(1):
            chores: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
                ("spool replay", self.ledger.replay), ("hold purge", self.budgets.purge_expired)]
            if round_ % vacuum_every == 0:
                chores.append(("vacuum", partial(self.direct.run, vacuum_churn_tables)))
            for name, chore in chores:
                try:
                    await chore()
                except (DBAPIError, DatabaseUnavailable) as exc:
                    log.debug("housekeeping waits for the database: %s", type(exc).__name__)
                    break
                except Exception:
                    log.exception("housekeeping: %s failed; the next round retries", name)
            await asyncio.sleep(every)

    async def close(self) -> None:
        await self.limits.limiter.close()
        await asyncio.to_thread(self.direct.close)
        await self.database.dispose()


def open_cloud(settings: Settings) -> Cloud:
    """The database must already be migrated (`store.migrate.upgrade`)."""
    database = db.create_engine_async(settings.db_url)
    sessions = db.session_factory(database)
    direct = Direct(settings.db_url)
    orgs = OrgService(sessions)
    limiter: Limiter
    if settings.redis_url:
        from aicloud.limits.redis import RedisLimiter

        limiter = RedisLimiter(settings.redis_url)
    else:
        limiter = MemoryLimiter()
    instance = new_instance_id()  # this process, as the holds and the journal name it
    ledger = UsageLedger(direct, settings.home_dir)
    return Cloud(database, direct, orgs, KeyService(sessions, direct, orgs),
                 AdminKeyService(sessions), PriceBook(sessions),
                 Budgets(sessions, direct, settings.hold_seconds, instance),
                 ledger, Reports(sessions, orgs), RateLimits(limiter),
                 Journal(direct, ledger, instance, settings.instance_timeout),
                 ResponseStore(sessions), Catalog(sessions),
                 ProviderStore(sessions, secret_box(settings)))
