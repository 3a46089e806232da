"""Reading the ledger: usage summaries, CSV export, credits and monthly invoices.

Everything here is derived from the append-only `usage` and `credits` rows; nothing is
stored twice. Filters by id are checked against the caller's scope first, so a foreign id
is a 404, never an empty (or full) answer.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVarTuple

from sqlalchemy import Select, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from aicloud.accounts.base import (
    EARLIEST,
    LATEST,
    AccountError,
    AdminScope,
    NotFound,
    Role,
    aware,
    check_moment,
    iso,
    now,
)
from aicloud.accounts.orgs import OrgService
from aicloud.billing.budgets import month_start
from aicloud.billing.money import pico_to_usd
from aicloud.store.tables import ApiKey, Credit, Project, UsageRecord

_Columns = TypeVarTuple("_Columns")

GROUPS = ("day", "model", "project", "key")
MONTH_SHAPE = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])$")
REFERENCE_SHAPE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
EXPORT_COLUMNS = ("request_id", "organization_id", "project_id", "api_key_id", "model",
                  "prompt_tokens", "cached_tokens", "completion_tokens", "cost_usd", "status",
                  "started_at", "finished_at")
EXPORT_BATCH = 1000


@dataclass(slots=True, frozen=True)
class UsageFilter:
    organization_id: str | None = None
    project_id: str | None = None
    api_key_id: str | None = None
    model: str | None = None
    start: datetime | None = None
    end: datetime | None = None


@dataclass(slots=True, frozen=True)
class UsageRow:
    """One request as the ledger has it."""

    request_id: str
    organization_id: str
    project_id: str
    api_key_id: str
    model: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cost_pico: int
    status: str
    finished_at: datetime

    @classmethod
    def of(cls, r: UsageRecord) -> UsageRow:
        return cls(r.request_id, r.organization_id, r.project_id, r.api_key_id, r.model,
                   r.prompt_tokens, r.cached_tokens, r.completion_tokens, r.cost_pico,
                   r.status, aware(r.finished_at))


@dataclass(slots=True)
class InvoiceLine:
    project_id: str
    project: str
    model: str
    requests: int
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    cost_pico: int


@dataclass(slots=True)
class Invoice:
    organization_id: str
    organization: str
    month: str
    status: str
    lines: list[InvoiceLine] = field(default_factory=list)
    credits: list[tuple[str, str, int]] = field(default_factory=list)  # reference, note, pico

    @property
    def subtotal_pico(self) -> int:
        return sum(line.cost_pico for line in self.lines)

    @property
    def credits_pico(self) -> int:
        return sum(amount for _, _, amount in self.credits)

    @property
    def total_pico(self) -> int:
        return self.subtotal_pico - self.credits_pico


def parse_month(text: str) -> tuple[datetime, datetime]:
    """A UTC month's bounds; only years whose both ends every database can hold."""
    match = MONTH_SHAPE.match(text)
    if not match:
        raise AccountError("month must look like 2026-11", "month")
    year, month = int(match[1]), int(match[2])
    if not EARLIEST.year <= year < LATEST.year:
        raise AccountError(f"month must be in the years {EARLIEST.year} to {LATEST.year - 1}",
                           "month")
    start = datetime(year, month, 1, tzinfo=UTC)
    end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
    return start, end


class Reports:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], orgs: OrgService) -> None:
        self._sessions = sessions
        self._orgs = orgs

    async def summary(self, scope: AdminScope, filt: UsageFilter,
                      group_by: tuple[str, ...]) -> list[dict[str, Any]]:
        for group in group_by:
            if group not in GROUPS:
                raise AccountError(f"group_by takes {', '.join(GROUPS)}", "group_by")
        async with self._sessions() as session:
            await self._check(session, scope, filt)
            keys = [self._group_column(session, g).label(g) for g in group_by]
            query = select(*keys, func.count().label("requests"),
                           func.sum(UsageRecord.prompt_tokens).label("prompt_tokens"),
                           func.sum(UsageRecord.cached_tokens).label("cached_tokens"),
                           func.sum(UsageRecord.completion_tokens).label("completion_tokens"),
                           func.sum(UsageRecord.cost_pico).label("cost_pico"))
            query = self._where(query, scope, filt).group_by(*keys).order_by(*keys)
            rows = (await session.execute(query)).mappings().all()
        return [{**{g: str(r[g]) for g in group_by}, "requests": int(r["requests"]),
                 "prompt_tokens": int(r["prompt_tokens"] or 0),
                 "cached_tokens": int(r["cached_tokens"] or 0),
                 "completion_tokens": int(r["completion_tokens"] or 0),
                 "cost_usd": pico_to_usd(int(r["cost_pico"] or 0))} for r in rows]

    async def export_csv(self, scope: AdminScope, filt: UsageFilter) -> AsyncIterator[str]:
        """Streams in id order, a batch at a time, so a big export never sits in memory."""
        async with self._sessions() as session:
            await self._check(session, scope, filt)
        yield _csv_line(EXPORT_COLUMNS)
        after = 0
        while True:
            query = self._where(select(UsageRecord), scope, filt).where(
                UsageRecord.id > after).order_by(UsageRecord.id).limit(EXPORT_BATCH)
            async with self._sessions() as session:
                rows = list(await session.scalars(query))
            for r in rows:
                yield _csv_line((r.request_id, r.organization_id, r.project_id, r.api_key_id,
                                 r.model, r.prompt_tokens, r.cached_tokens, r.completion_tokens,
                                 pico_to_usd(r.cost_pico), r.status, iso(r.started_at),
                                 iso(r.finished_at)))
            if len(rows) < EXPORT_BATCH:
                return
            after = rows[-1].id

    async def add_credit(self, scope: AdminScope, organization_id: str, amount_pico: int,
                         reference: str, note: str = "") -> tuple[bool, int]:
        """(created, amount). Replaying a reference returns the first credit unchanged."""
        scope.require(Role.ADMIN, installation=True)
        if not REFERENCE_SHAPE.match(reference or ""):
            raise AccountError("reference: 1-64 letters, digits, '.', '_', ':' or '-'",
                               "reference")
        if amount_pico <= 0:
            raise AccountError("amount_usd must be positive", "amount_usd")
        async with self._sessions() as session:
            await self._orgs.org(session, scope, organization_id)
            existing = await session.scalar(select(Credit).where(Credit.reference == reference))
        if existing is not None:
            if existing.organization_id != organization_id:
                raise AccountError("that reference is already used", "reference")
            return False, existing.amount_pico
        try:
            async with self._sessions.begin() as session:
                session.add(Credit(reference=reference, organization_id=organization_id,
                                   amount_pico=amount_pico, note=note[:200], created_at=now()))
        except IntegrityError:
            return await self.add_credit(scope, organization_id, amount_pico, reference, note)
        return True, amount_pico

    async def invoice(self, scope: AdminScope, organization_id: str, month: str) -> Invoice:
        start, end = parse_month(month)
        async with self._sessions() as session:
            org = await self._orgs.org(session, scope, organization_id)
            lines = await session.execute(
                select(UsageRecord.project_id, Project.name, UsageRecord.model, func.count(),
                       func.sum(UsageRecord.prompt_tokens - UsageRecord.cached_tokens),
                       func.sum(UsageRecord.cached_tokens),
                       func.sum(UsageRecord.completion_tokens), func.sum(UsageRecord.cost_pico))
                .join(Project, Project.id == UsageRecord.project_id)
                .where(UsageRecord.organization_id == org.id, UsageRecord.finished_at >= start,
                       UsageRecord.finished_at < end)
                .group_by(UsageRecord.project_id, Project.name, UsageRecord.model)
                .order_by(Project.name, UsageRecord.model))
            credits = await session.execute(
                select(Credit.reference, Credit.note, Credit.amount_pico)
                .where(Credit.organization_id == org.id, Credit.created_at >= start,
                       Credit.created_at < end).order_by(Credit.created_at))
            invoice = Invoice(org.id, org.name, month,
                              "final" if month_start(now()) >= end else "open")
            invoice.lines = [InvoiceLine(p, n, m, int(c), int(i or 0), int(ca or 0), int(o or 0),
                                         int(cost or 0)) for p, n, m, c, i, ca, o, cost in lines]
            invoice.credits = [(r, n, int(a)) for r, n, a in credits]
        return invoice

    async def rows(self, scope: AdminScope, filt: UsageFilter, limit: int = 100,
                   statuses: tuple[str, ...] = ()) -> list[UsageRow]:
        """The newest usage rows that match (and, if given, have one of `statuses`):
        the console's table and its recent errors. Newest first, at most `limit`."""
        async with self._sessions() as session:
            await self._check(session, scope, filt)
            query = self._where(select(UsageRecord), scope, filt)
            if statuses:
                query = query.where(UsageRecord.status.in_(statuses))
            found = await session.scalars(query.order_by(UsageRecord.id.desc()).limit(limit))
            return [UsageRow.of(r) for r in found]

    async def request(self, scope: AdminScope, request_id: str) -> UsageRow:
        """One request's row, by its id (a chat completion's `id`), if the caller sees it."""
        async with self._sessions() as session:
            row = await session.scalar(select(UsageRecord).where(
                UsageRecord.request_id == request_id))
        if row is None or not scope.sees(row.organization_id):
            raise NotFound("usage row", request_id)
        return UsageRow.of(row)

    # -- helpers ----------------------------------------------------------------------------

    async def _check(self, session: AsyncSession, scope: AdminScope, filt: UsageFilter) -> None:
        # a year-0 or year-10000 bound can be neither converted to UTC nor stored
        check_moment(filt.start, "start")
        check_moment(filt.end, "end")
        if filt.organization_id is not None:
            await self._orgs.org(session, scope, filt.organization_id)
        if filt.project_id is not None:
            await self._orgs.project(session, scope, filt.project_id)
        if filt.api_key_id is not None:
            key = await session.get(ApiKey, filt.api_key_id)
            project = await session.get(Project, key.project_id) if key else None
            if project is None or not scope.sees(project.organization_id):
                raise NotFound("key", filt.api_key_id)

    @staticmethod
    def _where(query: Select[*_Columns], scope: AdminScope,
               filt: UsageFilter) -> Select[*_Columns]:
        conditions = [
            (UsageRecord.organization_id, scope.organization_id),
            (UsageRecord.organization_id, filt.organization_id),
            (UsageRecord.project_id, filt.project_id),
            (UsageRecord.api_key_id, filt.api_key_id),
            (UsageRecord.model, filt.model),
        ]
        for column, value in conditions:
            if value is not None:
                query = query.where(column == value)
        if filt.start is not None:
            query = query.where(UsageRecord.finished_at >= filt.start)
        if filt.end is not None:
            query = query.where(UsageRecord.finished_at < filt.end)
        return query

    @staticmethod
    def _group_column(session: AsyncSession, group: str) -> Any:
        if group == "day":
            if session.get_bind().dialect.name == "postgresql":
                return func.to_char(func.timezone("UTC", UsageRecord.finished_at), "YYYY-MM-DD")
            return func.date(UsageRecord.finished_at)
        return {"model": UsageRecord.model, "project": UsageRecord.project_id,
                "key": UsageRecord.api_key_id}[group]


def _csv_line(values: tuple[Any, ...]) -> str:
    out = io.StringIO()
    csv.writer(out).writerow(values)
    return out.getvalue()


def invoice_json(invoice: Invoice) -> dict[str, Any]:
    return {
        "object": "invoice", "organization_id": invoice.organization_id,
        "organization": invoice.organization, "month": invoice.month,
        "status": invoice.status, "currency": "usd",
        "lines": [{"project_id": x.project_id, "project": x.project, "model": x.model,
                   "requests": x.requests, "input_tokens": x.input_tokens,
                   "cached_input_tokens": x.cached_tokens, "output_tokens": x.output_tokens,
                   "amount_usd": pico_to_usd(x.cost_pico)} for x in invoice.lines],
        "credits": [{"reference": r, "note": n, "amount_usd": pico_to_usd(a)}
                    for r, n, a in invoice.credits],
        "subtotal_usd": pico_to_usd(invoice.subtotal_pico),
        "credits_usd": pico_to_usd(invoice.credits_pico),
        "total_usd": ("-" if invoice.total_pico < 0 else "") + pico_to_usd(abs(invoice.total_pico)),
    }


def invoice_csv(invoice: Invoice) -> str:
    header = ("kind", "project_id", "project", "model", "requests", "input_tokens",
              "cached_input_tokens", "output_tokens", "amount_usd")
    lines = [_csv_line(header)]
    for x in invoice.lines:
        lines.append(_csv_line(("usage", x.project_id, x.project, x.model, x.requests,
                                x.input_tokens, x.cached_tokens, x.output_tokens,
                                pico_to_usd(x.cost_pico))))
    for ref, note, amount in invoice.credits:
        lines.append(_csv_line(("credit", "", note, ref, "", "", "", "",
                                "-" + pico_to_usd(amount))))
    total = invoice_json(invoice)["total_usd"]
    lines.append(_csv_line(("total", "", invoice.organization, invoice.month, "", "", "", "",
                            total)))
    return "".join(lines)
