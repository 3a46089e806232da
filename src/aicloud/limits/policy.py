"""Which buckets a request takes (key and project, requests and tokens) and the
`x-ratelimit-*` headers OpenAI clients read to pace themselves."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from aicloud.accounts.keys import Principal
from aicloud.limits.buckets import Limiter, Outcome, Take


class RateLimited(Exception):
    def __init__(self, message: str, retry_after: float, headers: dict[str, str]) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.headers = headers


@dataclass(slots=True)
class Ticket:
    """What an admitted request took, so unused tokens can be given back at the end."""

    token_takes: list[Take] = field(default_factory=list)
    reserved_tokens: int = 0
    headers: dict[str, str] = field(default_factory=dict)


def _duration(seconds: float) -> str:
    """OpenAI's reset format: '1s', '6m0s', '20ms'."""
    if seconds < 1:
        return f"{max(math.ceil(seconds * 1000), 1)}ms" if seconds > 0 else "0s"
    minutes, secs = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def _headers(takes: list[Take], outcome: Outcome) -> dict[str, str]:
    headers: dict[str, str] = {}
    for kind, suffix in (("rpm", "requests"), ("tpm", "tokens")):
        pairs = [(t, lv) for t, lv in zip(takes, outcome.levels, strict=True)
                 if t.key.endswith(kind)]
        if not pairs:
            continue
        tightest, level = min(pairs, key=lambda p: p[1] / p[0].limit)
        headers[f"x-ratelimit-limit-{suffix}"] = str(tightest.limit)
        headers[f"x-ratelimit-remaining-{suffix}"] = str(max(int(level), 0))
        headers[f"x-ratelimit-reset-{suffix}"] = _duration(
            (tightest.limit - level) / tightest.per_second)
    return headers


class RateLimits:
    def __init__(self, limiter: Limiter) -> None:
        self.limiter = limiter

    async def admit(self, principal: Principal, tokens: int, *,
                    buckets: tuple[str, ...] = ("rpm", "tpm")) -> Ticket:
        """Take one request and `tokens` (prompt plus the most it may generate) from every
        bucket that applies, or raise RateLimited with when to retry. `buckets` narrows it
        to the request ("rpm") or token ("tpm") buckets: the API takes the request before
        it tokenizes a prompt, and the tokens once it knows how many."""
        takes: list[Take] = []
        for scope, rpm, tpm in (("key:" + principal.api_key_id, principal.key_rpm,
                                 principal.key_tpm),
                                ("project:" + principal.project_id, principal.project_rpm,
                                 principal.project_tpm)):
            if rpm is not None and "rpm" in buckets:
                takes.append(Take(f"{scope}:rpm", rpm, 1))
            if tpm is not None and "tpm" in buckets:
                if tokens > tpm:
                    raise RateLimited(
                        f"Request too large: it may use {tokens} tokens but the limit is "
                        f"{tpm} tokens per minute. Send a shorter prompt or lower max_tokens.",
                        0.0, {})
                takes.append(Take(f"{scope}:tpm", tpm, tokens))
        if not takes:
            return Ticket()
        outcome = await self.limiter.take(takes)
        headers = _headers(takes, outcome)
        if not outcome.allowed:
            wait = max(math.ceil(outcome.retry_after), 1)
            headers["retry-after"] = str(wait)
            kinds = " and ".join(sorted({"requests" if t.key.endswith("rpm") else "tokens"
                                         for t in takes}))
            raise RateLimited(f"Rate limit reached for {kinds} per minute. "
                              f"Please try again in {wait}s.", outcome.retry_after, headers)
        return Ticket([t for t in takes if t.key.endswith("tpm")], tokens, headers)

    async def settle(self, ticket: Ticket, used_tokens: int) -> None:
        unused = ticket.reserved_tokens - used_tokens
        if ticket.token_takes and unused > 0:
            await self.limiter.give_back([Take(t.key, t.limit, unused)
                                          for t in ticket.token_takes])
