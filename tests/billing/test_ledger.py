"""Budgets, prices, the ledger and invoices against real SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import pytest
from alembic import command
from sqlalchemy import create_engine, text

from aicloud.accounts.base import AccountError, AdminScope, NotFound, Role
from aicloud.accounts.keys import Principal
from aicloud.billing.budgets import BudgetExceeded, Budgets
from aicloud.billing.money import Rates, pico_to_usd, usd_to_pico
from aicloud.billing.reports import UsageFilter, invoice_csv, invoice_json
from aicloud.billing.usage import UsageEntry
from aicloud.config import Settings
from aicloud.services import Cloud, open_cloud
from aicloud.store import db, migrate

T = TypeVar("T")
ROOT = AdminScope.installation()
USD = 10**12


def with_clouds(url: str, action: Callable[..., Awaitable[T]], processes: int = 1) -> T:
    """Each Cloud has its own connection pool, as separate server processes would."""
    migrate.upgrade(url)

    async def go() -> T:
        clouds = [open_cloud(Settings(database_url=url)) for _ in range(processes)]
        try:
            return await action(*clouds)
        finally:
            for cloud in clouds:
                await cloud.close()

    return asyncio.run(go())


async def tenant(cloud: Cloud, org_budget: int | None = None,
                 project_budget: int | None = None) -> Principal:
    org = await cloud.orgs.create_org(ROOT, "acme", org_budget)
    project = await cloud.orgs.create_project(ROOT, org.id, "web",
                                              {"budget_pico": project_budget})
    _, secret = await cloud.keys.create_key(ROOT, project.id)
    principal = await cloud.keys.authenticate(secret)
    assert principal is not None
    return principal


def assert_counters_match_rows(url: str) -> None:
    """The counters the holds read must equal the sums of their rows: monthly spend of the
    usage rows, held amounts of the live reservations."""
    engine = create_engine(db.sync_url(url))
    with engine.connect() as conn:
        held = dict(conn.execute(text("SELECT scope, held_pico FROM budget_held "
                                      "WHERE held_pico <> 0")).all())
        holds: dict[str, int] = {}
        for project, org, amount in conn.execute(text(
                "SELECT project_id, organization_id, amount_pico FROM reservations")):
            for scope in (f"project:{project}", f"organization:{org}"):
                holds[scope] = holds.get(scope, 0) + amount
        assert held == holds
        counters = dict(conn.execute(text("SELECT scope || ' ' || month, spent_pico "
                                          "FROM monthly_spend WHERE spent_pico <> 0")).all())
        rows: dict[str, int] = {}
        for project, org, cost, finished in conn.execute(text(
                "SELECT project_id, organization_id, cost_pico, finished_at FROM usage")):
            moment = (finished if isinstance(finished, datetime)
                      else datetime.fromisoformat(finished).replace(tzinfo=UTC))
            month = moment.astimezone(UTC).strftime("%Y-%m")
            for scope in (f"project:{project} {month}", f"organization:{org} {month}"):
                rows[scope] = rows.get(scope, 0) + cost
    engine.dispose()
    assert counters == {scope: cost for scope, cost in rows.items() if cost}


def entry(p: Principal, request_id: str, cost: int, prompt: int = 10,
          completion: int = 5, model: str = "m") -> UsageEntry:
    now = datetime.now(UTC)
    return UsageEntry(request_id, p.organization_id, p.api_key_id, p.project_id, model, prompt,
                      0, completion, cost, "completed", now, now)


@pytest.mark.parametrize("budget_on", ["project", "organization"])
def test_fifty_concurrent_holds_never_overspend(db_url: str, budget_on: str) -> None:
    """A budget that covers one request; 50 at once from two 'processes' (pools)."""
    async def scenario(a: Cloud, b: Cloud) -> tuple[int, int, int]:
        budgets = {"org_budget": 10 * USD} if budget_on == "organization" else {
            "project_budget": 10 * USD}
        p = await tenant(a, **budgets)

        async def one(i: int) -> bool:
            cloud = (a, b)[i % 2]
            try:
                hold = await cloud.budgets.reserve(p, f"req-{i}", 8 * USD)
            except BudgetExceeded:
                return False
            await asyncio.sleep(0.01)
            await cloud.ledger.record(entry(p, f"req-{i}", 7 * USD), hold)
            return True

        results = await asyncio.gather(*(one(i) for i in range(50)))
        column = "project_id" if budget_on == "project" else "organization_id"
        ident = p.project_id if budget_on == "project" else p.organization_id
        return sum(results), await a.budgets.spend(column, ident), 10 * USD

    admitted, spent, budget = with_clouds(db_url, scenario, processes=2)
    assert admitted == 1
    assert spent == 7 * USD <= budget
    assert_counters_match_rows(db_url)


def test_settled_spend_frees_the_rest_of_the_budget(db_url: str) -> None:
    async def scenario(cloud: Cloud) -> None:
        p = await tenant(cloud, project_budget=10 * USD)
        hold = await cloud.budgets.reserve(p, "r1", 8 * USD)
        with pytest.raises(BudgetExceeded, match="project"):
            await cloud.budgets.reserve(p, "r2", 3 * USD)
        await cloud.ledger.record(entry(p, "r1", 1 * USD), hold)
        second = await cloud.budgets.reserve(p, "r2", 9 * USD)
        await cloud.budgets.release(second)
        assert await cloud.budgets.purge_expired() == 0
        assert await cloud.budgets.spend("project_id", p.project_id) == 1 * USD
        # replaying the settle of r1 changes nothing
        await cloud.ledger.record(entry(p, "r1", 1 * USD), hold)
        assert await cloud.budgets.spend("project_id", p.project_id) == 1 * USD

    with_clouds(db_url, scenario)
    assert_counters_match_rows(db_url)


def test_unbudgeted_requests_take_no_hold(db_url: str) -> None:
    async def scenario(cloud: Cloud) -> None:
        p = await tenant(cloud)
        assert not p.has_budget
        assert await cloud.budgets.reserve(p, "r1", 10**30) is None

    with_clouds(db_url, scenario)


def test_prices_are_exact_and_versioned(db_url: str) -> None:
    async def scenario(cloud: Cloud) -> None:
        rates = Rates(input_micro=150_000, cached_input_micro=75_000, output_micro=600_000)
        await cloud.prices.set_price(ROOT, "m", rates)
        assert await cloud.prices.rates("m") == rates
        assert await cloud.prices.rates("other") == Rates()
        # 1000 fresh input, 200 cached, 500 output tokens
        cost = rates.cost(1200, 200, 500)
        assert pico_to_usd(cost) == "0.000465"
        newer = Rates(1, 1, 1)
        await cloud.prices.set_price(ROOT, "m", newer)
        assert [p.rates for p in await cloud.prices.current()] == [newer]
        with pytest.raises(Exception, match="installation"):
            await cloud.prices.set_price(AdminScope("k", Role.OWNER, "org_x"), "m", rates)

    with_clouds(db_url, scenario)


def test_reports_group_export_and_invoice(db_url: str) -> None:
    async def scenario(cloud: Cloud) -> tuple[list[Any], str, dict[str, Any], str]:
        p = await tenant(cloud)
        for i in range(3):
            await cloud.ledger.record(entry(p, f"a{i}", 2 * USD // 1000, model="m1"))
        await cloud.ledger.record(entry(p, "b", 5, model="m2"))
        assert (await cloud.reports.add_credit(ROOT, p.organization_id, USD // 1000, "c-1"))[0]
        assert not (await cloud.reports.add_credit(ROOT, p.organization_id, USD // 1000,
                                                   "c-1"))[0]
        rows = await cloud.reports.summary(ROOT, UsageFilter(), ("model",))
        lines = [x async for x in cloud.reports.export_csv(ROOT, UsageFilter(model="m1"))]
        month = datetime.now(UTC).strftime("%Y-%m")
        bill = await cloud.reports.invoice(ROOT, p.organization_id, month)
        return rows, "".join(lines), invoice_json(bill), invoice_csv(bill)

    rows, csv_text, bill, bill_csv = with_clouds(db_url, scenario)
    assert [(r["model"], r["requests"], r["cost_usd"]) for r in rows] == [
        ("m1", 3, "0.006"), ("m2", 1, "0.000000000005")]
    assert csv_text.count("\n") == 4 and csv_text.startswith("request_id,")
    assert bill["subtotal_usd"] == "0.006000000005"
    assert bill["credits_usd"] == "0.001"
    assert bill["total_usd"] == "0.005000000005"
    assert [line["input_tokens"] for line in bill["lines"]] == [30, 10]
    assert bill_csv.splitlines()[-1].endswith(",0.005000000005")


def test_scopes_hide_other_organizations(db_url: str) -> None:
    async def scenario(cloud: Cloud) -> None:
        mine = await cloud.orgs.create_org(ROOT, "mine")
        theirs = await cloud.orgs.create_org(ROOT, "theirs")
        their_project = await cloud.orgs.create_project(ROOT, theirs.id, "p")
        their_key, _ = await cloud.keys.create_key(ROOT, their_project.id)
        scope = AdminScope("akey_x", Role.OWNER, mine.id)
        for call in (lambda: cloud.orgs.get_org(scope, theirs.id),
                     lambda: cloud.orgs.get_project(scope, their_project.id),
                     lambda: cloud.orgs.update_project(scope, their_project.id, {"rpm_limit": 1}),
                     lambda: cloud.orgs.create_project(scope, theirs.id, "sneaky"),
                     lambda: cloud.keys.get_key(scope, their_key.id),
                     lambda: cloud.keys.revoke(scope, their_key.id),
                     lambda: cloud.keys.create_key(scope, their_project.id),
                     lambda: cloud.reports.summary(scope, UsageFilter(project_id=their_project.id),
                                                   ()),
                     lambda: cloud.reports.invoice(scope, theirs.id, "2026-01")):
            with pytest.raises(NotFound):
                await call()
        assert [o.id for o in await cloud.orgs.list_orgs(scope)] == [mine.id]
        assert await cloud.orgs.list_projects(scope) == []
        assert await cloud.keys.list_keys(scope) == []
        viewer = AdminScope("akey_v", Role.VIEWER, mine.id)
        with pytest.raises(PermissionError):
            await cloud.orgs.create_project(viewer, mine.id, "nope")
        with pytest.raises(AccountError):
            await cloud.orgs.create_project(scope, mine.id, "bad\x00name")

    with_clouds(db_url, scenario)


def test_upgrade_from_0001_keeps_data(db_url: str) -> None:
    command.upgrade(migrate.alembic_config(db_url), "0001")
    engine = create_engine(db.sync_url(db_url))
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO organizations VALUES ('org_1', 'default', :t)"), {"t": now})
        conn.execute(text("INSERT INTO projects VALUES ('proj_1', 'org_1', 'web', :t)"),
                     {"t": now})
        conn.execute(text("INSERT INTO usage (request_id, api_key_id, project_id, model, "
                          "prompt_tokens, cached_tokens, completion_tokens, status, started_at, "
                          "finished_at) VALUES ('r', 'k', 'proj_1', 'm', 1, 0, 1, 'completed', "
                          ":t, :t)"), {"t": now})
    migrate.upgrade(db_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT organization_id, cost_pico FROM usage")).one() == (
            "org_1", 0)
        assert conn.execute(text("SELECT weight FROM projects")).scalar() == 1.0
    engine.dispose()

    async def scenario(cloud: Cloud) -> None:
        other = await cloud.orgs.create_org(ROOT, "other")
        await cloud.orgs.create_project(ROOT, other.id, "web")  # same name, other org
        with pytest.raises(AccountError):
            await cloud.orgs.create_project(ROOT, "org_1", "web")

    with_clouds(db_url, scenario)


def test_money_parsing_refuses_inexact_or_absurd_amounts() -> None:
    assert usd_to_pico("0.000000000001") == 1
    for bad in ("0.0000000000001", "-1", "NaN", "Infinity", "1e9", "abc"):
        with pytest.raises(ValueError):
            usd_to_pico(bad)


def test_holds_of_crashed_requests_expire(db_url: str) -> None:
    async def scenario(cloud: Cloud) -> None:
        p = await tenant(cloud, project_budget=10 * USD)
        short = Budgets(db.session_factory(cloud.database), cloud.direct, hold_seconds=0.05)
        await short.reserve(p, "crashed", 9 * USD)  # its server dies: never settled
        with pytest.raises(BudgetExceeded):
            await cloud.budgets.reserve(p, "r1", 9 * USD)
        await asyncio.sleep(0.1)
        assert await cloud.budgets.purge_expired() == 1
        assert await cloud.budgets.reserve(p, "r1", 9 * USD) is not None

    with_clouds(db_url, scenario)
    assert_counters_match_rows(db_url)  # the purged hold left the counters; r1 is in them
