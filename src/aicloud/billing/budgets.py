"""Budgets: a request holds its maximum possible cost before it runs.

Spend this month = settled usage + live reservations, derived from rows every time. The
check and the hold happen in one transaction that first takes a write lock on the
organization's row (a row lock on PostgreSQL, the database write lock on SQLite), and
settling takes the same lock, so concurrent requests in any number of processes see each
other's holds and spend can never pass the budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from aicloud.accounts.base import now
from aicloud.accounts.keys import Principal
from aicloud.billing.money import pico_to_usd
from aicloud.store.tables import Organization, Project, Reservation, UsageRecord


@dataclass(slots=True, frozen=True)
class Hold:
    request_id: str
    organization_id: str
    project_id: str
    amount_pico: int


class BudgetExceeded(Exception):
    def __init__(self, scope: str, budget_pico: int, committed_pico: int) -> None:
        left = max(budget_pico - committed_pico, 0)
        super().__init__(
            f"This request could cost more than the {scope}'s remaining monthly budget "
            f"(${pico_to_usd(left)} of ${pico_to_usd(budget_pico)} left). Lower max_tokens "
            "or ask an administrator to raise the budget.")
        self.scope = scope


def month_start(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


async def lock_organization(session: AsyncSession, organization_id: str) -> None:
    """Serialize budget changes per organization. A no-op write is the portable lock."""
    await session.execute(update(Organization).where(Organization.id == organization_id)
                          .values(budget_pico=Organization.budget_pico))


async def month_to_date(session: AsyncSession, column: str, ident: str,
                        at: datetime) -> tuple[int, int]:
    """(settled spend this month, live holds) for a project or an organization, read in
    one statement so both come from the same snapshot."""
    spent = (select(func.coalesce(func.sum(UsageRecord.cost_pico), 0))
             .where(getattr(UsageRecord, column) == ident,
                    UsageRecord.finished_at >= month_start(at)).scalar_subquery())
    held = (select(func.coalesce(func.sum(Reservation.amount_pico), 0))
            .where(getattr(Reservation, column) == ident, Reservation.expires_at > at)
            .scalar_subquery())
    row = (await session.execute(select(spent, held))).one()
    return int(row[0] or 0), int(row[1] or 0)


async def committed(session: AsyncSession, column: str, ident: str, at: datetime) -> int:
    return sum(await month_to_date(session, column, ident, at))


class Budgets:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], hold_seconds: float) -> None:
        self._sessions = sessions
        # a hold outlives a crashed process by this much at most
        self._hold_for = timedelta(seconds=hold_seconds)

    async def reserve(self, principal: Principal, request_id: str, amount_pico: int) -> Hold | None:
        """None when no budget applies: unbudgeted requests never touch this path."""
        if not principal.has_budget:
            return None
        hold = Hold(request_id, principal.organization_id, principal.project_id, amount_pico)
        at = now()
        async with self._sessions.begin() as session:
            await lock_organization(session, hold.organization_id)
            org_budget = await session.scalar(select(Organization.budget_pico).where(
                Organization.id == hold.organization_id))
            project_budget = await session.scalar(select(Project.budget_pico).where(
                Project.id == hold.project_id))
            for scope, budget, column, ident in (
                ("project", project_budget, "project_id", hold.project_id),
                ("organization", org_budget, "organization_id", hold.organization_id),
            ):
                if budget is None:
                    continue
                spent = await committed(session, column, ident, at)
                if spent + amount_pico > budget:
                    raise BudgetExceeded(scope, budget, spent)
            session.add(Reservation(request_id=request_id, organization_id=hold.organization_id,
                                    project_id=hold.project_id, amount_pico=amount_pico,
                                    expires_at=at + self._hold_for))
        return hold

    async def release(self, hold: Hold) -> None:
        """The request never ran (refused by the engine, say): give the hold back."""
        async with self._sessions.begin() as session:
            await session.execute(delete(Reservation).where(
                Reservation.request_id == hold.request_id))

    async def purge_expired(self) -> int:
        """Holds of requests whose server died; already ignored by the sums."""
        async with self._sessions.begin() as session:
            result = await session.execute(delete(Reservation).where(
                Reservation.expires_at <= now()))
            return result.rowcount or 0

    async def spend(self, column: str, ident: str) -> int:
        """Settled spend this month plus live holds."""
        return sum(await self.month_to_date(column, ident))

    async def month_to_date(self, column: str, ident: str) -> tuple[int, int]:
        async with self._sessions() as session:
            return await month_to_date(session, column, ident, now())
