"""Batch lines pay the model's batch price: its prices less the model's discount."""

from __future__ import annotations

import pytest

from aicloud.accounts.base import AdminScope
from aicloud.billing.money import MoneyError, Rates
from aicloud.services import Cloud
from tests.billing.test_ledger import with_clouds

ROOT = AdminScope.installation()


def test_rates_discounted_round_down_to_the_micro_dollar() -> None:
    assert Rates(3, 5, 10).discounted(50) == Rates(1, 2, 5)
    assert Rates(3, 5, 10).discounted(0) == Rates(3, 5, 10)
    assert Rates(3, 5, 10).discounted(100) == Rates(0, 0, 0)


def test_the_price_book_keeps_a_discount_per_model(db_url: str) -> None:
    async def scenario(cloud: Cloud) -> None:
        await cloud.prices.set_price(ROOT, "a", Rates(1_000_000, 500_000, 4_000_000), 20)
        await cloud.prices.set_price(ROOT, "b", Rates(1_000_000, 1_000_000, 2_000_000))
        assert await cloud.prices.rates("a") == Rates(1_000_000, 500_000, 4_000_000)
        assert await cloud.prices.rates("a", batch=True) == Rates(800_000, 400_000, 3_200_000)
        assert await cloud.prices.rates("b", batch=True) == Rates(500_000, 500_000, 1_000_000)
        assert await cloud.prices.rates("free", batch=True) == Rates()
        views = {v.model: v for v in await cloud.prices.current()}
        assert views["a"].batch_discount_pct == 20 and views["b"].batch_discount_pct == 50
        with pytest.raises(MoneyError):
            await cloud.prices.set_price(ROOT, "a", Rates(1, 1, 1), 101)

    with_clouds(db_url, scenario)
