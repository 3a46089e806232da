"""The usage ledger: one append-only row per request, with the engine's own token counts
and the exact cost; writing it settles the request's budget hold in the same transaction."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict, dataclass
from datetime import datetime

from sqlalchemy import delete
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from aicloud.billing.budgets import Hold, lock_organization
from aicloud.store.tables import Reservation, UsageRecord

log = logging.getLogger(__name__)

RETRY_DELAYS = (0.05, 0.2, 1.0, 2.0, 5.0)


@dataclass(slots=True, frozen=True)
class UsageEntry:
    request_id: str
    organization_id: str
    api_key_id: str
    project_id: str
    model: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cost_pico: int
    status: str
    started_at: datetime
    finished_at: datetime


class UsageLedger:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def record(self, entry: UsageEntry, hold: Hold | None = None) -> None:
        """Idempotent by request id; retried while the database is busy or briefly away."""
        for delay in (*RETRY_DELAYS, None):
            try:
                await self._insert(entry, hold)
                return
            except OperationalError:
                if delay is None:
                    log.error("usage for request %s could not be written", entry.request_id)
                    raise
                await asyncio.sleep(delay)

    async def _insert(self, entry: UsageEntry, hold: Hold | None) -> None:
        async with self._sessions.begin() as session:
            if hold is not None:
                await lock_organization(session, hold.organization_id)
            insert = pg_insert if session.bind.dialect.name == "postgresql" else sqlite_insert
            await session.execute(
                insert(UsageRecord).values(**asdict(entry)).on_conflict_do_nothing(
                    index_elements=["request_id"]
                )
            )
            if hold is not None:
                await session.execute(delete(Reservation).where(
                    Reservation.request_id == hold.request_id))
