"""`Budgets.month_to_date_of` (the console's listings) agrees with `month_to_date` for
every project and organization, on both databases."""

from __future__ import annotations

from aicloud.services import Cloud
from tests.billing.test_ledger import ROOT, USD, entry, with_clouds


def test_spend_of_many_equals_spend_of_each(db_url: str) -> None:
    async def scenario(cloud: Cloud) -> None:
        org = await cloud.orgs.create_org(ROOT, "acme", 100 * USD)
        principals = []
        for name in ("a", "b", "idle"):
            project = await cloud.orgs.create_project(ROOT, org.id, name,
                                                      {"budget_pico": 50 * USD})
            _, secret = await cloud.keys.create_key(ROOT, project.id)
            principal = await cloud.keys.authenticate(secret)
            assert principal is not None
            principals.append(principal)
        a, b, idle = principals
        settled = await cloud.budgets.reserve(a, "a-1", 5 * USD)
        await cloud.ledger.record(entry(a, "a-1", 2 * USD), settled)
        await cloud.budgets.reserve(a, "a-2", 3 * USD)  # still running: held
        await cloud.budgets.reserve(b, "b-1", 4 * USD)
        ids = [p.project_id for p in principals]
        many = await cloud.budgets.month_to_date_of("project_id", ids)
        assert many == {i: await cloud.budgets.month_to_date("project_id", i) for i in ids}
        assert many[a.project_id] == (2 * USD, 3 * USD)
        assert many[b.project_id] == (0, 4 * USD)
        assert many[idle.project_id] == (0, 0)
        orgs = await cloud.budgets.month_to_date_of("organization_id", [org.id])
        assert orgs == {org.id: (2 * USD, 7 * USD)}
        assert await cloud.budgets.month_to_date_of("project_id", []) == {}

    with_clouds(db_url, scenario)
