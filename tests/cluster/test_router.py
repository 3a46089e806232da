"""Prefix affinity across Ray replicas stays inside a cache scope (no Ray needed)."""

from __future__ import annotations

from aicloud.cluster.router import PREFIX_TOKENS, Router, Slotted

PROMPT = list(range(PREFIX_TOKENS + 8))


def test_prefix_affinity_only_within_a_scope() -> None:
    router = Router()
    r0, r1 = Slotted(0, 4), Slotted(1, 4)
    r0.outstanding["busy"] = 50
    assert router.pick([r0, r1], PROMPT, "scope-a") is r1  # the least loaded: home of A's
    r1.outstanding["busy"] = 100
    # r0 is now the least loaded, r1 within the slack: A follows its cached prefix ...
    assert router.pick([r0, r1], PROMPT, "scope-a") is r1
    # ... B, sending the same prompt, is placed by load alone, as for any new prompt
    assert router.pick([r0, r1], PROMPT, "scope-b") is r0
