"""Batches and their lines in the database: the whole state of the Batch API, so a
server that dies mid-batch leaves everything the next one needs to go on.

Every client-facing read is filtered by project (another project's batch is a missing
one). A line's answer is written by `answer_job`, a statement that runs inside the
transaction of the line's usage row, and only while the line is still pending: a line is
answered once, and the answer and its bill commit together or not at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from aicloud.accounts.base import NotFound, aware, new_id, now
from aicloud.billing.usage import Alongside
from aicloud.files.jsonl import Request
from aicloud.store.direct import Conn
from aicloud.store.tables import Batch, BatchLine, StoredFile

WINDOWS = {"24h": timedelta(hours=24)}


class Status(StrEnum):
    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def live(self) -> bool:
        """Still to be run by a server (or finished off)."""
        return self in LIVE


LIVE = (Status.VALIDATING, Status.IN_PROGRESS, Status.FINALIZING, Status.CANCELLING)


class LineState(StrEnum):
    PENDING = "pending"
    COMPLETED = "completed"  # answered with a 2xx
    FAILED = "failed"  # answered otherwise, or never run


class BatchStateError(Exception):
    """An operation the batch's status does not allow (cancelling a finished batch)."""


@dataclass(slots=True, frozen=True)
class Counts:
    total: int = 0
    completed: int = 0
    failed: int = 0


@dataclass(slots=True, frozen=True)
class BatchView:
    id: str
    project_id: str
    api_key_id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: Status
    created_at: datetime
    expires_at: datetime | None
    metadata: dict[str, str] | None = None
    errors: list[dict[str, Any]] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    moments: dict[str, datetime | None] = field(default_factory=dict)  # in_progress_at...
    counts: Counts = Counts()


@dataclass(slots=True, frozen=True)
class Todo:
    """A pending line, as the runner needs it."""

    line: int
    custom_id: str
    request: dict[str, Any]


@dataclass(slots=True, frozen=True)
class Answered:
    line: int
    custom_id: str
    state: LineState
    request_id: str | None
    status_code: int | None
    answer: dict[str, Any] | None


MOMENTS = ("in_progress", "finalizing", "completed", "failed", "expired", "cancelling",
           "cancelled")


def _view(row: Batch, counts: Counts) -> BatchView:
    return BatchView(row.id, row.project_id, row.api_key_id, row.endpoint, row.input_file_id,
                     row.completion_window, Status(row.status), aware(row.created_at),
                     aware(row.expires_at), row.metadata_, row.errors, row.output_file_id,
                     row.error_file_id,
                     {m: aware(getattr(row, f"{m}_at")) for m in MOMENTS}, counts)


def _moment_of(status: Status) -> dict[str, datetime]:
    column = f"{status.value}_at"
    return {column: now()} if status.value in MOMENTS else {}


ANSWER = """
UPDATE batch_lines SET state = :state, request_id = :request_id, status_code = :status_code,
       answer = :answer, finished_at = :at
WHERE batch_id = :batch_id AND line = :line AND state = 'pending'
"""


def write_answer(conn: Conn, batch_id: str, line: int, request_id: str | None,
                 status_code: int | None, answer: dict[str, Any]) -> int:
    state = LineState.COMPLETED if status_code is not None and 200 <= status_code < 300 \
        else LineState.FAILED
    return conn.run(ANSWER, {"state": state.value, "request_id": request_id,
                             "status_code": status_code, "answer": json.dumps(answer),
                             "at": conn.time(now()), "batch_id": batch_id, "line": line})


class BatchStore:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    # -- the API's side ----------------------------------------------------------------

    async def create(self, project_id: str, api_key_id: str, endpoint: str,
                     input_file_id: str, window: str,
                     metadata: dict[str, str] | None) -> BatchView:
        at = now()
        row = Batch(id=new_id("batch"), project_id=project_id, api_key_id=api_key_id,
                    endpoint=endpoint, input_file_id=input_file_id, completion_window=window,
                    metadata_=metadata, status=Status.VALIDATING.value, created_at=at,
                    expires_at=at + WINDOWS[window])
        async with self._sessions.begin() as session:
            session.add(row)
        return _view(row, Counts())

    async def get(self, project_id: str | None, batch_id: str) -> BatchView:
        """NotFound for another project's batch (`project_id` None: any, for the CLI)."""
        async with self._sessions() as session:
            row = await self._row(session, project_id, batch_id)
            return _view(row, await self._counts(session, batch_id))

    async def find(self, project_id: str | None, after: str | None = None, limit: int = 20,
                   status: str | None = None) -> list[BatchView]:
        """Newest first, after the batch `after`."""
        query = select(Batch)
        if project_id is not None:
            query = query.where(Batch.project_id == project_id)
        if status is not None:
            query = query.where(Batch.status == status)
        async with self._sessions() as session:
            if after is not None:
                mark = await session.get(Batch, after)
                if mark is not None and (project_id is None or mark.project_id == project_id):
                    query = query.where((Batch.created_at < mark.created_at) | (
                        (Batch.created_at == mark.created_at) & (Batch.id < mark.id)))
            rows = list(await session.scalars(
                query.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit)))
            return [_view(r, await self._counts(session, r.id)) for r in rows]

    async def cancel(self, project_id: str | None, batch_id: str) -> BatchView:
        """A live batch becomes `cancelling`; its runner stops starting lines, lets those
        running finish, fails the rest and ends it `cancelled`."""
        async with self._sessions.begin() as session:
            row = await self._row(session, project_id, batch_id)
            status = Status(row.status)
            if status in (Status.VALIDATING, Status.IN_PROGRESS):
                row.status, row.cancelling_at = Status.CANCELLING.value, now()
            elif status not in (Status.CANCELLING, Status.CANCELLED):
                raise BatchStateError(f"a batch that is {status.value} cannot be cancelled")
        return await self.get(project_id, batch_id)

    async def _row(self, session: AsyncSession, project_id: str | None,
                   batch_id: str) -> Batch:
        row = await session.get(Batch, batch_id)
        if row is None or (project_id is not None and row.project_id != project_id):
            raise NotFound("batch", batch_id)
        return row

    async def _counts(self, session: AsyncSession, batch_id: str) -> Counts:
        rows = (await session.execute(
            select(BatchLine.state, func.count()).where(BatchLine.batch_id == batch_id)
            .group_by(BatchLine.state))).all()
        by = {state: int(n) for state, n in rows}
        return Counts(sum(by.values()), by.get(LineState.COMPLETED.value, 0),
                      by.get(LineState.FAILED.value, 0))

    # -- the runner's side -------------------------------------------------------------

    async def claim(self, instance: str) -> list[str]:
        """Take every live batch that no live server runs (unowned, or its owner's
        `server_instances` row is gone: it died and was settled); returns those now
        this instance's."""
        from aicloud.store.tables import ServerInstance

        alive = select(ServerInstance.id)
        async with self._sessions.begin() as session:
            await session.execute(update(Batch).where(
                Batch.status.in_([s.value for s in LIVE]),
                Batch.owner_instance.is_(None) | Batch.owner_instance.not_in(alive),
            ).values(owner_instance=instance))
            return list(await session.scalars(select(Batch.id).where(
                Batch.owner_instance == instance, Batch.status.in_([s.value for s in LIVE]))
                .order_by(Batch.created_at)))

    async def start(self, batch_id: str, requests: list[Request]) -> None:
        """The input is valid: its lines, and `in_progress`, in one transaction."""
        async with self._sessions.begin() as session:
            row = await session.get(Batch, batch_id)
            if row is None or row.status != Status.VALIDATING.value:
                return  # cancelled meanwhile: the runner sees it next
            session.add_all([BatchLine(batch_id=batch_id, line=r.line, custom_id=r.custom_id,
                                       request=r.body, state=LineState.PENDING.value,
                                       attempts=0) for r in requests])
            row.status, row.in_progress_at = Status.IN_PROGRESS.value, now()

    async def set_status(self, batch_id: str, status: Status,
                         errors: list[dict[str, Any]] | None = None) -> None:
        values: dict[str, Any] = {"status": status.value, **_moment_of(status)}
        if errors is not None:
            values["errors"] = errors
        async with self._sessions.begin() as session:
            await session.execute(update(Batch).where(Batch.id == batch_id).values(**values))

    async def pending(self, batch_id: str, skip: set[int], limit: int) -> list[Todo]:
        if limit <= 0:
            return []
        query = select(BatchLine.line, BatchLine.custom_id, BatchLine.request).where(
            BatchLine.batch_id == batch_id, BatchLine.state == LineState.PENDING.value)
        if skip:
            query = query.where(BatchLine.line.not_in(skip))
        async with self._sessions() as session:
            rows = (await session.execute(query.order_by(BatchLine.line).limit(limit))).all()
            return [Todo(line, custom_id, request) for line, custom_id, request in rows]

    async def next_attempt(self, batch_id: str, line: int) -> int:
        """Count an attempt before it starts: its number names its usage row, so no two
        attempts of a line (one cut by a crash, one refused and retried) share a row."""
        async with self._sessions.begin() as session:
            await session.execute(update(BatchLine).where(
                BatchLine.batch_id == batch_id, BatchLine.line == line)
                .values(attempts=BatchLine.attempts + 1))
            return int(await session.scalar(select(BatchLine.attempts).where(
                BatchLine.batch_id == batch_id, BatchLine.line == line)) or 0)

    def answer_job(self, batch_id: str, line: int, request_id: str | None,
                   status_code: int | None, answer: dict[str, Any]) -> Alongside:
        """The answer as a write for the usage row's transaction."""
        def job(conn: Conn) -> None:
            write_answer(conn, batch_id, line, request_id, status_code, answer)
        return job

    async def answer(self, batch_id: str, line: int, request_id: str | None,
                     status_code: int | None, answer: dict[str, Any]) -> None:
        """An answer that bills nothing (a refused line), written alone."""
        async with self._sessions.begin() as session:
            await session.execute(update(BatchLine).where(
                BatchLine.batch_id == batch_id, BatchLine.line == line,
                BatchLine.state == LineState.PENDING.value).values(
                state=(LineState.COMPLETED if status_code is not None
                       and 200 <= status_code < 300 else LineState.FAILED).value,
                request_id=request_id, status_code=status_code, answer=answer,
                finished_at=now()))

    async def fail_rest(self, batch_id: str, code: str, message: str) -> None:
        """Every line still pending fails with `code` (never run)."""
        async with self._sessions.begin() as session:
            await session.execute(update(BatchLine).where(
                BatchLine.batch_id == batch_id, BatchLine.state == LineState.PENDING.value
            ).values(state=LineState.FAILED.value, answer={"error": {
                "code": code, "message": message}}, finished_at=now()))

    async def answers(self, batch_id: str) -> list[Answered]:
        async with self._sessions() as session:
            rows = (await session.execute(select(
                BatchLine.line, BatchLine.custom_id, BatchLine.state, BatchLine.request_id,
                BatchLine.status_code, BatchLine.answer).where(BatchLine.batch_id == batch_id)
                .order_by(BatchLine.line))).all()
            return [Answered(line, custom_id, LineState(state), request_id, code, answer)
                    for line, custom_id, state, request_id, code, answer in rows]

    async def finish(self, batch_id: str, status: Status, files: list[StoredFile],
                     output_file_id: str | None, error_file_id: str | None,
                     errors: list[dict[str, Any]] | None = None) -> None:
        """The end: the output files' rows and the batch's final status, together."""
        async with self._sessions.begin() as session:
            for file in files:
                if await session.get(StoredFile, file.id) is None:
                    session.add(file)
            values: dict[str, Any] = {"status": status.value, "output_file_id": output_file_id,
                                      "error_file_id": error_file_id, **_moment_of(status)}
            if errors is not None:
                values["errors"] = errors
            await session.execute(update(Batch).where(Batch.id == batch_id).values(**values))
