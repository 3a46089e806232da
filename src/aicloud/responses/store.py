"""Stored responses. Every read and delete is filtered by the caller's project, so another
project's id looks exactly like a missing one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import CursorResult, delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from aicloud.accounts.base import now
from aicloud.store.tables import StoredResponse


@dataclass(slots=True, frozen=True)
class Stored:
    body: dict[str, Any]
    input_items: list[dict[str, Any]]
    context: list[dict[str, Any]]


class ResponseStore:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def save(self, project_id: str, body: dict[str, Any],
                   input_items: list[dict[str, Any]], context: list[dict[str, Any]]) -> None:
        async with self._sessions.begin() as session:
            session.add(StoredResponse(id=body["id"], project_id=project_id,
                                       created_at=now(), body=body,
                                       input_items=input_items, context=context))

    async def get(self, project_id: str, response_id: str) -> Stored | None:
        async with self._sessions() as session:
            row = await session.scalar(select(StoredResponse).where(
                StoredResponse.id == response_id, StoredResponse.project_id == project_id))
            return None if row is None else Stored(row.body, row.input_items, row.context)

    async def delete(self, project_id: str, response_id: str) -> bool:
        async with self._sessions.begin() as session:
            result = await session.execute(delete(StoredResponse).where(
                StoredResponse.id == response_id, StoredResponse.project_id == project_id))
            # a DELETE always yields a CursorResult; execute() is typed as the base Result
            return bool(cast(CursorResult[Any], result).rowcount)
