"""Per-model prices, kept as an append-only history so old bills stay explainable."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from aicloud.accounts.base import AdminScope, Role, aware, now
from aicloud.billing.money import MoneyError, Rates
from aicloud.store.tables import Price

# Prices change rarely; each process re-reads them at most this often.
CACHE_SECONDS = 2.0
# what a batch line pays less than an interactive request, unless set (OpenAI's: half)
BATCH_DISCOUNT_PCT = 50


@dataclass(slots=True, frozen=True)
class PriceView:
    model: str
    rates: Rates
    effective_at: datetime
    batch_discount_pct: int = BATCH_DISCOUNT_PCT

    @property
    def batch_rates(self) -> Rates:
        return self.rates.discounted(self.batch_discount_pct)


class PriceBook:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions
        self._cache: dict[str, PriceView] = {}
        self._loaded = -CACHE_SECONDS

    async def set_price(self, scope: AdminScope, model: str, rates: Rates,
                        batch_discount_pct: int = BATCH_DISCOUNT_PCT) -> PriceView:
        scope.require(Role.ADMIN, installation=True)
        if not 0 <= batch_discount_pct <= 100:
            raise MoneyError("batch_discount_pct must be between 0 and 100")
        row = Price(model=model, input_micro=rates.input_micro,
                    cached_input_micro=rates.cached_input_micro,
                    output_micro=rates.output_micro, effective_at=now(),
                    batch_discount_pct=batch_discount_pct)
        async with self._sessions.begin() as session:
            session.add(row)
        self._loaded = -CACHE_SECONDS
        return PriceView(model, rates, aware(row.effective_at), batch_discount_pct)

    async def current(self) -> list[PriceView]:
        newest = (select(Price.model, func.max(Price.id).label("id"))
                  .group_by(Price.model).subquery())
        async with self._sessions() as session:
            rows = await session.scalars(
                select(Price).join(newest, Price.id == newest.c.id).order_by(Price.model))
            return [PriceView(p.model, Rates(p.input_micro, p.cached_input_micro,
                                             p.output_micro), aware(p.effective_at),
                              p.batch_discount_pct)
                    for p in rows]

    async def rates(self, model: str, batch: bool = False) -> Rates:
        """What a request for `model` costs now (a batch line: at the batch discount); a
        model without a price is free."""
        if time.monotonic() - self._loaded > CACHE_SECONDS:
            self._cache = {p.model: p for p in await self.current()}
            self._loaded = time.monotonic()
        view = self._cache.get(model)
        if view is None:
            return Rates()
        return view.batch_rates if batch else view.rates
