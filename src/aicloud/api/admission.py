"""Letting one generation in: rate limits, then the budget hold, at today's price.

Order matters: the cheap in-memory (or Redis) limit check runs before the database
transaction of the budget hold, and a refused budget gives the tokens back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aicloud.accounts.keys import Principal
from aicloud.api.errors import APIError
from aicloud.billing.budgets import BudgetExceeded, Hold
from aicloud.billing.money import Rates
from aicloud.engines.base import Usage
from aicloud.limits.policy import RateLimited, Ticket
from aicloud.services import Cloud


@dataclass(slots=True)
class Admission:
    request_id: str
    principal: Principal
    rates: Rates
    ticket: Ticket = field(default_factory=Ticket)
    hold: Hold | None = None

    @property
    def headers(self) -> dict[str, str]:
        return self.ticket.headers

    def cost(self, usage: Usage) -> int:
        return self.rates.cost(usage.prompt_tokens, usage.cached_tokens,
                               usage.completion_tokens)


async def admit(cloud: Cloud, principal: Principal, model: str, request_id: str,
                prompt_tokens: int, max_completion: int) -> Admission:
    try:
        ticket = await cloud.limits.admit(principal, prompt_tokens + max_completion)
    except RateLimited as exc:
        raise APIError(429, str(exc), code="rate_limit_exceeded", headers=exc.headers) from None
    admission = Admission(request_id, principal, await cloud.prices.rates(model), ticket)
    ceiling = admission.rates.ceiling(prompt_tokens, max_completion)
    if ceiling:
        try:
            admission.hold = await cloud.budgets.reserve(principal, request_id, ceiling)
        except BudgetExceeded as exc:
            await cloud.limits.settle(ticket, 0)
            raise APIError(429, str(exc), code="insufficient_quota", kind="insufficient_quota",
                           headers=ticket.headers) from None
    return admission


async def withdraw(cloud: Cloud, admission: Admission) -> None:
    """The request never ran: release its hold and its tokens."""
    if admission.hold is not None:
        await cloud.budgets.release(admission.hold)
    await cloud.limits.settle(admission.ticket, 0)
