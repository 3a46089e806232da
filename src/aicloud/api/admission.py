"""Letting one generation in: rate limits, then the budget hold, at today's price.

Order matters, cheapest first: the request bucket (RPM) and a bound on the prompt's
characters are checked before the prompt is tokenized (refusing a 7 MiB prompt took 12-17 s
and +318 MiB of peak memory when it was tokenized first; 0.6 s and +22 MiB now), the token
buckets (TPM) once its tokens are counted, and the database transaction of the budget hold
last; a refused budget gives the tokens back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aicloud.accounts.keys import Principal
from aicloud.api.errors import APIError, invalid
from aicloud.billing.budgets import BudgetExceeded, Hold
from aicloud.billing.money import Rates
from aicloud.engines.base import Usage
from aicloud.limits.policy import RateLimited, Ticket
from aicloud.services import Cloud

# No token of a usual vocabulary is longer than this many bytes (the bundled SmolLM2's
# longest is 81: a newline and 80 spaces; GPT-style vocabularies top out at 128), and a
# character is at least one byte, so a prompt of more characters than context_length times
# this cannot fit, whatever it says, and is refused without tokenizing it.
MAX_BYTES_PER_TOKEN = 128


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


async def _take(cloud: Cloud, principal: Principal, tokens: int,
                buckets: tuple[str, ...]) -> Ticket:
    try:
        return await cloud.limits.admit(principal, tokens, buckets=buckets)
    except RateLimited as exc:
        raise APIError(429, str(exc), code="rate_limit_exceeded", headers=exc.headers) from None


async def admit_request(cloud: Cloud, principal: Principal) -> Ticket:
    """Take the request from the RPM buckets before any work on its prompt: a caller over
    its requests per minute costs one bucket check, whatever it sent."""
    return await _take(cloud, principal, 0, ("rpm",))


def check_prompt_size(characters: int, context_length: int, param: str) -> None:
    """Refuse, without tokenizing, a prompt too long for the context in any vocabulary."""
    if context_length > 0 and characters > context_length * MAX_BYTES_PER_TOKEN:
        raise invalid(f"This model's maximum context length is {context_length} tokens, "
                      f"but the prompt has {characters} characters, more than that many "
                      "tokens can hold.", param, "context_length_exceeded")


async def admit(cloud: Cloud, principal: Principal, model: str, request_id: str,
                prompt_tokens: int, max_completion: int,
                requests: Ticket | None = None, batch: bool = False) -> Admission:
    """With `requests` (from `admit_request`), only the token buckets are left to take;
    `batch`: a Batch API line, priced at the model's batch rates."""
    tokens = prompt_tokens + max_completion
    if requests is None:
        ticket = await _take(cloud, principal, tokens, ("rpm", "tpm"))
    else:
        ticket = await _take(cloud, principal, tokens, ("tpm",))
        ticket.headers = {**requests.headers, **ticket.headers}
    admission = Admission(request_id, principal, await cloud.prices.rates(model, batch),
                          ticket)
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
