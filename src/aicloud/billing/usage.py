"""The usage ledger: one row per finished request, with the engine's own token counts."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict, dataclass
from datetime import datetime

from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from aicloud.store.tables import UsageRecord

log = logging.getLogger(__name__)

RETRY_DELAYS = (0.05, 0.2, 1.0)


@dataclass(slots=True, frozen=True)
class UsageEntry:
    request_id: str
    api_key_id: str
    project_id: str
    model: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    status: str
    started_at: datetime
    finished_at: datetime


class UsageLedger:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def record(self, entry: UsageEntry) -> None:
        """Idempotent by request id; retried briefly when the database is busy."""
        for delay in (*RETRY_DELAYS, None):
            try:
                await self._insert(entry)
                return
            except OperationalError:
                if delay is None:
                    log.error("usage for request %s could not be written", entry.request_id)
                    raise
                await asyncio.sleep(delay)

    async def _insert(self, entry: UsageEntry) -> None:
        async with self._sessions.begin() as session:
            insert = pg_insert if session.bind.dialect.name == "postgresql" else sqlite_insert
            await session.execute(
                insert(UsageRecord).values(**asdict(entry)).on_conflict_do_nothing(
                    index_elements=["request_id"]
                )
            )
