"""Rate limits: bucket arithmetic on a fake clock, and Redis shared by two 'processes'."""

from __future__ import annotations

import asyncio
import secrets

import pytest

from aicloud.accounts.keys import Principal
from aicloud.limits.buckets import MemoryLimiter, Take
from aicloud.limits.policy import RateLimited, RateLimits
from aicloud.limits.redis import RedisLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def principal(**limits: int) -> Principal:
    tag = secrets.token_hex(4)
    return Principal("org_1", f"proj_{tag}", "p", f"key_{tag}", **limits)


def test_buckets_refill_continuously_and_refuse_atomically() -> None:
    clock = Clock()
    limiter = MemoryLimiter(clock)

    async def scenario() -> None:
        rpm, tpm = Take("k:rpm", 60, 1), Take("k:tpm", 100, 80)
        assert (await limiter.take([rpm, tpm])).allowed
        refused = await limiter.take([rpm, tpm])
        assert not refused.allowed
        assert refused.retry_after == pytest.approx(60 / 100 * 60)  # 60 tokens at 100/min
        assert refused.levels == (59.0, 20.0)  # nothing was taken from the request bucket
        clock.now += 36
        assert (await limiter.take([rpm, tpm])).allowed
        await limiter.give_back([Take("k:tpm", 100, 50)])
        assert (await limiter.take([Take("k:tpm", 100, 50)])).allowed

    asyncio.run(scenario())


def test_policy_headers_and_too_large_requests() -> None:
    limits = RateLimits(MemoryLimiter(Clock()))

    async def scenario() -> None:
        p = principal(key_rpm=2, project_tpm=1000)
        ticket = await limits.admit(p, 300)
        assert ticket.headers["x-ratelimit-limit-requests"] == "2"
        assert ticket.headers["x-ratelimit-remaining-requests"] == "1"
        assert ticket.headers["x-ratelimit-remaining-tokens"] == "700"
        assert ticket.headers["x-ratelimit-reset-tokens"] == "18s"
        await limits.settle(ticket, 100)  # used 100 of the 300 it held
        second = await limits.admit(p, 10)
        assert second.headers["x-ratelimit-remaining-tokens"] == "890"
        with pytest.raises(RateLimited) as refused:
            await limits.admit(p, 10)
        assert refused.value.headers["retry-after"] == "30"
        assert refused.value.headers["x-ratelimit-remaining-requests"] == "0"
        with pytest.raises(RateLimited, match="too large"):
            await limits.admit(principal(key_tpm=100), 101)
        assert (await limits.admit(principal(), 10**9)).headers == {}

    asyncio.run(scenario())


def test_redis_buckets_are_shared_between_processes(redis_url: str) -> None:
    async def scenario() -> tuple[int, int]:
        namespace = f"test:{secrets.token_hex(4)}:"
        a, b = RedisLimiter(redis_url, namespace), RedisLimiter(redis_url, namespace)
        try:
            limits = [RateLimits(a), RateLimits(b)]
            p = principal(key_rpm=10, project_tpm=10_000)

            async def one(i: int) -> bool:
                try:
                    await limits[i % 2].admit(p, 100)
                except RateLimited:
                    return False
                return True

            admitted = sum(await asyncio.gather(*(one(i) for i in range(40))))
            ticket = await RateLimits(a).admit(principal(project_tpm=1000), 600)
            await RateLimits(b).settle(ticket, 0)
            return admitted, int(ticket.headers["x-ratelimit-remaining-tokens"])
        finally:
            await a.close()
            await b.close()

    admitted, remaining = asyncio.run(scenario())
    assert admitted == 10
    assert remaining == 400
