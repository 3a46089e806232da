"""The replica reviver says what keeps a replica down instead of swallowing it. A handle
whose calls fail stands in for an actor Ray cannot bring back (no cluster needed)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from aicloud.cluster.replica import ReplicaSpec
from aicloud.cluster.replica_set import Replica, ReplicaSet, Scaling


class Unreachable:
    """`handle.start.remote()` fails the way a lost node's actor does."""

    def __init__(self, enough: int) -> None:
        self.calls = 0
        self.enough, self.tried_enough = enough, asyncio.Event()

    @property
    def start(self) -> Any:
        return self

    async def remote(self) -> None:
        self.calls += 1
        if self.calls == self.enough:
            self.tried_enough.set()
        raise ConnectionError("node 10.0.0.7 is gone")


def test_failed_revivals_are_logged_not_swallowed(caplog: pytest.LogCaptureFixture) -> None:
    replicas = ReplicaSet(ReplicaSpec("m", lambda: None), Scaling(), tick=0.001)
    handle = Unreachable(enough=9)
    dead = Replica(index=3, capacity=4, handle=handle, state="dead", alive=False)
    replicas.replicas.append(dead)

    async def go() -> None:
        task = asyncio.create_task(replicas._revive(dead))
        await asyncio.wait_for(handle.tried_enough.wait(), 5)
        dead.state = "draining"  # scaled away meanwhile: the reviver stops
        await asyncio.wait_for(task, 5)

    with caplog.at_level(logging.WARNING, "aicloud.cluster.replica_set"):
        asyncio.run(go())
    attempts = [r for r in caplog.records if "not back yet" in r.getMessage()]
    assert [r.args[2] for r in attempts] == [1, 2, 4, 8]  # type: ignore[index]
    assert "ConnectionError: node 10.0.0.7 is gone" in attempts[0].getMessage()
    assert attempts[0].exc_info is not None and attempts[1].exc_info is None
