"""Budgets: a request holds its maximum possible cost before it runs.

Committed this month = settled spend + live holds, each read from a counter kept in the
same transactions as its rows (`monthly_spend` with the usage rows, `budget_held` with the
`reservations`). The check and the hold happen in one transaction that first locks the
organization (its row on PostgreSQL, the database write lock on SQLite), so concurrent
requests in any number of processes see each other's holds and spend can never pass the
budget. Settling needs no lock: it swaps a hold for a smaller cost in one commit. Every
statement that changes a counter row takes them project first, then organization, so
concurrent transactions never wait on each other in a circle.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from aicloud.accounts.base import now
from aicloud.accounts.keys import Principal
from aicloud.billing.money import pico_to_usd
from aicloud.store.direct import Conn, Direct
from aicloud.store.tables import Reservation, UsageRecord


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


def month_key(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m")


async def month_to_date(session: AsyncSession, column: str, ident: str,
                        at: datetime) -> tuple[int, int]:
    """(settled spend this month, live holds) for a project or an organization, read in
    one statement so both come from the same snapshot."""
    spent = (select(func.coalesce(func.sum(UsageRecord.cost_pico), 0))
             .where(getattr(UsageRecord, column) == ident,
                    UsageRecord.finished_at >= month_start(at)).scalar_subquery())
    held = (select(func.coalesce(func.sum(Reservation.amount_pico), 0))
            .where(getattr(Reservation, column) == ident).scalar_subquery())
    row = (await session.execute(select(spent, held))).one()
    return int(row[0] or 0), int(row[1] or 0)


COMMITTED = """
SELECT o.budget_pico AS org_budget, p.budget_pico AS project_budget,
  COALESCE((SELECT spent_pico FROM monthly_spend
            WHERE scope = :project_scope AND month = :month), 0)
  + COALESCE((SELECT held_pico FROM budget_held WHERE scope = :project_scope), 0)
    AS project_committed,
  COALESCE((SELECT spent_pico FROM monthly_spend
            WHERE scope = :org_scope AND month = :month), 0)
  + COALESCE((SELECT held_pico FROM budget_held WHERE scope = :org_scope), 0)
    AS org_committed
FROM projects p JOIN organizations o ON o.id = p.organization_id WHERE p.id = :project
"""
# the check and the insert are one statement, so the hold needs no round trip in between
HOLD_IF_IT_FITS = f"""
INSERT INTO reservations (request_id, organization_id, project_id, amount_pico, expires_at,
                          instance_id)
SELECT :request_id, :org, :project, :amount, :expires, :instance FROM ({COMMITTED}) c
WHERE (c.project_budget IS NULL OR c.project_committed + :amount <= c.project_budget)
  AND (c.org_budget IS NULL OR c.org_committed + :amount <= c.org_budget)
RETURNING amount_pico
"""
# both scopes of a request, in the one order every counter change uses
SCOPES = "(VALUES (1, :project_scope), (2, :org_scope)) AS s(ord, scope)"
ADD_HELD = ("INSERT INTO budget_held (scope, held_pico) VALUES (:scope, :amount) "
            "ON CONFLICT (scope) DO UPDATE SET held_pico = budget_held.held_pico + "
            "excluded.held_pico")
# PostgreSQL: hold and count it in one statement (SQLite has no writes inside WITH)
HOLD_POSTGRES = f"""
WITH new AS ({HOLD_IF_IT_FITS})
INSERT INTO budget_held (scope, held_pico)
SELECT s.scope, new.amount_pico FROM new CROSS JOIN {SCOPES} ORDER BY s.ord
ON CONFLICT (scope) DO UPDATE SET held_pico = budget_held.held_pico + excluded.held_pico
RETURNING held_pico
"""


def scopes(project_id: str, organization_id: str) -> dict[str, str]:
    return {"project_scope": f"project:{project_id}",
            "org_scope": f"organization:{organization_id}"}


def _params(hold: Hold, at: datetime, expires: datetime, instance: str | None,
            conn: Conn) -> dict[str, object]:
    return {**scopes(hold.project_id, hold.organization_id), "month": month_key(at),
            "instance": instance,
            "project": hold.project_id, "org": hold.organization_id,
            "request_id": hold.request_id, "amount": hold.amount_pico,
            "expires": conn.time(expires)}


def _unhold(conn: Conn, released: list[tuple[str, str, int]]) -> None:
    """Take deleted holds (project, organization, amount) off the counters; inside the
    transaction that deleted them, with their amounts as the DELETE returned them, so a
    hold settled and purged at once is subtracted once."""
    totals: dict[tuple[int, str], int] = {}
    for project, org, amount in released:
        for key in ((1, f"project:{project}"), (2, f"organization:{org}")):
            totals[key] = totals.get(key, 0) + int(amount)
    for (_, scope), amount in sorted(totals.items()):
        conn.run(ADD_HELD, {"scope": scope, "amount": -amount})


def _hold(conn: Conn, hold: Hold, at: datetime, expires: datetime,
          instance: str | None) -> None:
    """One transaction under the organization's lock (so every other hold of that
    organization is either committed and counted, or waits): insert the hold if it fits.
    A refusal reads the numbers for its message; if a hold was freed in between, it is
    tried again. A hold is committed without waiting for the disk: it only has to be
    visible to the next hold, and it is gone once its request settles anyway."""
    params = _params(hold, at, expires, instance, conn)
    for _ in range(3):
        if _try_hold(conn, hold, params):
            return
        row = conn.one(COMMITTED, params)
        if row is None:
            raise BudgetExceeded("project", 0, 0)  # its project is gone
        org_budget, project_budget, project_committed, org_committed = row
        for scope, budget, committed in (("project", project_budget, project_committed),
                                         ("organization", org_budget, org_committed)):
            if budget is not None and int(committed) + hold.amount_pico > budget:
                raise BudgetExceeded(scope, budget, int(committed))
    raise BudgetExceeded("organization", org_budget or 0, int(org_committed))


def _try_hold(conn: Conn, hold: Hold, params: dict[str, object]) -> bool:
    if conn.dialect == "postgresql":
        return bool(conn.round_trip(HOLD_POSTGRES, params,
                                    lock_organization=hold.organization_id, durable=False))
    with conn.transaction(lock_organization=hold.organization_id):
        if not conn.all(HOLD_IF_IT_FITS, params):
            return False
        for scope in (params["project_scope"], params["org_scope"]):
            conn.run(ADD_HELD, {"scope": scope, "amount": hold.amount_pico})
        return True


def release_where(conn: Conn, where: str, params: dict[str, object]) -> int:
    """Delete the holds `where` matches and take them off the counters; the caller's
    transaction makes both one change."""
    released = conn.all(f"DELETE FROM reservations WHERE {where} "
                        "RETURNING project_id, organization_id, amount_pico", params)
    _unhold(conn, released)
    return len(released)


def _release(conn: Conn, where: str, params: dict[str, object]) -> int:
    with conn.transaction():
        return release_where(conn, where, params)


class Budgets:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], direct: Direct,
                 hold_seconds: float, instance_id: str | None = None) -> None:
        self._sessions = sessions
        self._direct = direct
        # holds name the server that took them, so its restart can release them at once
        self.instance_id = instance_id
        # a hold outlives a crashed process by this much at most
        self._hold_for = timedelta(seconds=hold_seconds)

    async def reserve(self, principal: Principal, request_id: str, amount_pico: int) -> Hold | None:
        """None when no budget applies: unbudgeted requests never touch this path."""
        if not principal.has_budget:
            return None
        hold = Hold(request_id, principal.organization_id, principal.project_id, amount_pico)
        at = now()
        await self._direct.run(lambda conn: _hold(conn, hold, at, at + self._hold_for,
                                                  self.instance_id))
        return hold

    async def release(self, hold: Hold) -> None:
        """The request never ran (refused by the engine, say): give the hold back."""
        await self._direct.run(lambda conn: _release(
            conn, "request_id = :r", {"r": hold.request_id}))

    async def purge_expired(self) -> int:
        """Holds of requests whose server died and was never recognised as dead (see
        `billing/journal.py`): every server runs this every few seconds, and until then an
        expired hold still counts against its budget."""
        at = now()
        return await self._direct.run(lambda conn: _release(
            conn, "expires_at <= :at", {"at": conn.time(at)}))

    async def spend(self, column: str, ident: str) -> int:
        """Settled spend this month plus live holds."""
        return sum(await self.month_to_date(column, ident))

    async def month_to_date(self, column: str, ident: str) -> tuple[int, int]:
        async with self._sessions() as session:
            return await month_to_date(session, column, ident, now())

    async def month_to_date_of(self, column: str,
                               idents: list[str]) -> dict[str, tuple[int, int]]:
        """`month_to_date` of many projects (or organizations) in two grouped reads: a page
        listing a hundred projects must not run two hundred queries."""
        if not idents:
            return {}
        key = getattr(UsageRecord, column)
        held_key = getattr(Reservation, column)
        async with self._sessions() as session:
            spent: dict[str, int | None] = {ident: total for ident, total in (
                await session.execute(
                    select(key, func.sum(UsageRecord.cost_pico))
                    .where(key.in_(idents), UsageRecord.finished_at >= month_start(now()))
                    .group_by(key)))}
            held: dict[str, int | None] = {ident: total for ident, total in (
                await session.execute(
                    select(held_key, func.sum(Reservation.amount_pico))
                    .where(held_key.in_(idents)).group_by(held_key)))}
        return {i: (int(spent.get(i) or 0), int(held.get(i) or 0)) for i in idents}
