"""The progress journal: what each running request has produced so far, kept in the
database, so that a server killed mid-stream still bills the tokens it sent.

A usage row is written when a request ends, and a server killed with SIGKILL never gets
there. So each server process is an *instance* (a random id and a `server_instances` row
with a heartbeat), every budget hold names the instance that took it, and about once a
second one statement writes the completion count of each running request that made
progress since the last tick, deletes the rows of requests that have written their usage
row since, and refreshes the heartbeat. A request that ends within its first second never
touches the journal; one that streams for a minute costs sixty row updates, batched with
everyone else's.

An instance is dead when a server starts on the same host, home and port (it then holds
that slot's lock file, which the kernel freed when the old process died), or when its
heartbeat is older than `stale_after` (a server that never comes back; any live server
notices). Settling a dead instance turns each of its journal rows into a usage row with
status `interrupted`, costed like a cancelled request with those counts at the price the
request was admitted at, written by the ledger with the release of its hold; then the
instance's remaining holds (requests that had not produced a token yet) and its rows go.
Usage rows are keyed by request id, so a request that did finish (its row written, its
journal row not yet deleted) keeps its one row. A live server's rows are never settled.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import IO, Any

from aicloud.accounts.base import now
from aicloud.accounts.keys import Principal
from aicloud.billing.budgets import Hold, release_where
from aicloud.billing.money import Rates
from aicloud.billing.usage import UsageEntry, UsageLedger
from aicloud.store.direct import Conn, DatabaseUnavailable, Direct

log = logging.getLogger(__name__)

TICK_SECONDS = 1.0  # the most progress a SIGKILL can leave unbilled, per stream
HEARTBEAT_SECONDS = 5.0  # an idle server still says it is alive this often
REAP_SECONDS = 5.0  # how often a server looks for instances that went silent
STATUS = "interrupted"

COLUMNS = ("request_id", "organization_id", "project_id", "api_key_id", "model",
           "prompt_tokens", "cached_tokens", "completion_tokens", "input_micro",
           "cached_input_micro", "output_micro", "hold_pico", "started_at")
TYPES = ("text", "text", "text", "text", "text", "integer", "integer", "integer", "bigint",
         "bigint", "bigint", "bigint", "timestamptz")
PROGRESSED = ("ON CONFLICT (request_id) DO UPDATE SET completion_tokens = "
              "excluded.completion_tokens, progress_at = excluded.progress_at")
UPSERT = (f"INSERT INTO progress_journal ({', '.join(COLUMNS)}, instance_id, progress_at) "
          f"VALUES ({', '.join(':' + c for c in COLUMNS)}, :instance, :at) {PROGRESSED}")
FORGET = "DELETE FROM progress_journal WHERE request_id = :request_id"
HEARTBEAT = "UPDATE server_instances SET heartbeat_at = :at WHERE id = :instance RETURNING id"
# PostgreSQL: the whole tick is one statement over arrays (one round trip, whatever the
# number of requests), and its text never changes, so it stays prepared. With 32 running
# requests a tick took 2.4-5.6 ms here (median, heavily loaded 2-core machine); SQLite's one
# transaction of prepared upserts 0.7 ms (tests/billing/test_journal.py prints both).
_ARRAYS = ", ".join(f"CAST(:{c} AS {t}[])" for c, t in zip(COLUMNS, TYPES, strict=True))
TICK_POSTGRES = f"""
WITH progress AS (
  INSERT INTO progress_journal ({', '.join(COLUMNS)}, instance_id, progress_at)
  SELECT r.*, :instance, :at FROM unnest({_ARRAYS}) AS r({', '.join(COLUMNS)})
  {PROGRESSED} RETURNING 1),
     finished AS (DELETE FROM progress_journal
                  WHERE request_id = ANY(CAST(:finished AS text[])) RETURNING 1)
{HEARTBEAT}
"""
REGISTER = (
    "INSERT INTO server_instances (id, slot, pid, started_at, heartbeat_at) "
    "VALUES (:instance, :slot, :pid, :at, :at) "
    "ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at")
DEAD = ("SELECT id FROM server_instances WHERE id <> :instance "
        "AND (slot = :slot OR heartbeat_at < :cutoff) ORDER BY id")
ROWS = f"SELECT {', '.join(COLUMNS)}, progress_at FROM progress_journal WHERE instance_id = :dead"


def new_instance_id() -> str:
    return secrets.token_hex(8)


@dataclass(slots=True)
class InFlight:
    """A running request as the journal sees it: all fixed at admission but the count,
    which the request sets as its events arrive (a store per event, nothing more)."""

    request_id: str
    principal: Principal
    model: str
    prompt_tokens: int
    rates: Rates
    hold: Hold | None
    started_at: datetime
    completion_tokens: int = 0
    written: int = 0  # the count its journal row holds; 0: no row

    def row(self, count: int) -> dict[str, Any]:
        p, r = self.principal, self.rates
        return {"request_id": self.request_id, "organization_id": p.organization_id,
                "project_id": p.project_id, "api_key_id": p.api_key_id, "model": self.model,
                "prompt_tokens": self.prompt_tokens, "cached_tokens": 0,
                "completion_tokens": count, "input_micro": r.input_micro,
                "cached_input_micro": r.cached_input_micro, "output_micro": r.output_micro,
                "hold_pico": self.hold.amount_pico if self.hold else None,
                "started_at": self.started_at}


def _tick(conn: Conn, rows: list[dict[str, Any]], finished: list[str], instance: str,
          at: datetime) -> bool:
    """Write progress, forget finished requests, beat; False if this instance's row is
    gone (another server took it for dead)."""
    if conn.dialect == "postgresql":
        arrays = {c: [row[c] for row in rows] for c in COLUMNS}
        return bool(conn.round_trip(TICK_POSTGRES, {
            **arrays, "finished": finished, "instance": instance, "at": at}, durable=False))
    stamp = conn.time(at)
    with conn.transaction():
        conn.run_many(UPSERT, [{**row, "started_at": conn.time(row["started_at"]),
                                "instance": instance, "at": stamp} for row in rows])
        conn.run_many(FORGET, [{"request_id": r} for r in finished])
        return bool(conn.all(HEARTBEAT, {"instance": instance, "at": stamp}))


def _register(conn: Conn, instance: str, slot: str | None, at: datetime) -> None:
    conn.run(REGISTER, {"instance": instance, "slot": slot, "pid": os.getpid(),
                        "at": conn.time(at)})


def _dead(conn: Conn, instance: str, slot: str | None, cutoff: datetime) -> list[str]:
    return [row[0] for row in conn.all(DEAD, {"instance": instance, "slot": slot,
                                               "cutoff": conn.time(cutoff)})]


def _entries(conn: Conn, dead: str) -> list[tuple[UsageEntry, Hold | None]]:
    settled = []
    for values in conn.all(ROWS, {"dead": dead}):
        row = dict(zip((*COLUMNS, "progress_at"), values, strict=True))
        rates = Rates(row["input_micro"], row["cached_input_micro"], row["output_micro"])
        counts = (row["prompt_tokens"], row["cached_tokens"], row["completion_tokens"])
        entry = UsageEntry(
            request_id=row["request_id"], organization_id=row["organization_id"],
            api_key_id=row["api_key_id"], project_id=row["project_id"], model=row["model"],
            prompt_tokens=counts[0], cached_tokens=counts[1], completion_tokens=counts[2],
            cost_pico=rates.cost(*counts), status=STATUS,
            started_at=_aware(conn, row["started_at"]),
            finished_at=_aware(conn, row["progress_at"]))
        hold = (Hold(row["request_id"], row["organization_id"], row["project_id"],
                     int(row["hold_pico"])) if row["hold_pico"] is not None else None)
        settled.append((entry, hold))
    return settled


def _aware(conn: Conn, value: Any) -> datetime:
    moment = conn.read_time(value)
    assert moment is not None  # NOT NULL columns
    return moment


def _forget_instance(conn: Conn, dead: str) -> int:
    """After its usage rows are written: its journal rows, the holds of its requests that
    never produced a token, and the instance itself, in one transaction."""
    with conn.transaction():
        conn.run("DELETE FROM progress_journal WHERE instance_id = :dead", {"dead": dead})
        released = release_where(conn, "instance_id = :dead", {"dead": dead})
        conn.run("DELETE FROM server_instances WHERE id = :dead", {"dead": dead})
        return released


def claim_slot(home: Path, host: str, port: int) -> tuple[str | None, IO[str] | None]:
    """Lock this host, home and port for this process's lifetime. Holding it proves every
    earlier instance on the slot dead (the kernel drops a lock with its process, SIGKILL
    or not); a slot another live server holds gives None."""
    path = home / f"server-{port}.lock"
    handle = path.open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None, None
    return f"{socket.gethostname()}:{home.resolve()}:{port}", handle


class Journal:
    def __init__(self, direct: Direct, ledger: UsageLedger, instance_id: str,
                 stale_after: float = 60.0, tick_seconds: float = TICK_SECONDS) -> None:
        self.instance_id = instance_id
        self._direct = direct
        self._ledger = ledger
        self._stale_after = timedelta(seconds=stale_after)
        self._tick_seconds = tick_seconds
        self._running: dict[str, InFlight] = {}
        self._finished: set[str] = set()  # have a journal row, and their usage row now
        self._slot: str | None = None
        self._lock: IO[str] | None = None
        self._beat = 0.0

    def track(self, request_id: str, principal: Principal, model: str, prompt_tokens: int,
              rates: Rates, hold: Hold | None, started_at: datetime) -> InFlight:
        """A request is running: the journal writes its count from its first token on."""
        entry = InFlight(request_id, principal, model, prompt_tokens, rates, hold, started_at)
        self._running[request_id] = entry
        return entry

    def finish(self, entry: InFlight) -> None:
        """Its usage row is written (or spooled): its journal row, if any, goes next tick."""
        self._running.pop(entry.request_id, None)
        if entry.written:
            self._finished.add(entry.request_id)

    @property
    def running(self) -> int:
        return len(self._running)

    async def tick(self, beat: bool = False) -> None:
        """One statement for all running requests: those that made progress, those that
        finished. Skipped when there is nothing to say and no heartbeat is due."""
        changed = [(e, e.completion_tokens) for e in self._running.values()
                   if e.completion_tokens > e.written]
        finished = list(self._finished)
        beat = beat or time.monotonic() - self._beat >= HEARTBEAT_SECONDS
        if not changed and not finished and not beat:
            return
        rows = [entry.row(count) for entry, count in changed]
        at = now()
        alive = await self._direct.run(
            partial(_tick, rows=rows, finished=finished, instance=self.instance_id, at=at))
        self._beat = time.monotonic()
        self._finished.difference_update(finished)
        for entry, count in changed:
            entry.written = count
            if entry.request_id not in self._running:  # finished while this tick ran
                self._finished.add(entry.request_id)
        if not alive:
            await self._rejoin()

    async def _rejoin(self) -> None:
        """Another server took this one for dead (no heartbeat reached the database for
        `stale_after`) and billed its requests as interrupted: register again; the rows of
        requests still running are written anew, and their final rows will not land."""
        log.warning("server instance %s was settled as dead by another server (database "
                    "unreachable too long?); registering again", self.instance_id)
        await self._direct.run(partial(_register, instance=self.instance_id,
                                       slot=self._slot, at=now()))
        for entry in self._running.values():
            entry.written = 0

    async def start(self, home: Path | None, host: str, port: int) -> int:
        """At server start: claim the slot, register, write spooled usage of dead processes
        first (their rows are exact), then settle dead instances. Returns how many
        requests were billed as interrupted."""
        if home is not None:
            self._slot, self._lock = claim_slot(home, host, port)
        with contextlib.suppress(DatabaseUnavailable):
            await self._direct.run(partial(_register, instance=self.instance_id,
                                           slot=self._slot, at=now()))
            self._beat = time.monotonic()
            await self._ledger.replay()
            return await self.settle_dead()
        return 0

    async def settle_dead(self) -> int:
        """Bill the journaled requests of dead instances and release their holds."""
        cutoff = now() - self._stale_after
        dead = await self._direct.run(partial(_dead, instance=self.instance_id,
                                              slot=self._slot, cutoff=cutoff))
        billed = 0
        for instance in dead:
            billed += await self._settle(instance)
        return billed

    async def _settle(self, instance: str) -> int:
        entries = await self._direct.run(partial(_entries, dead=instance))
        for entry, hold in entries:
            await self._ledger.record(entry, hold)
        released = await self._direct.run(partial(_forget_instance, dead=instance))
        if entries or released:
            log.warning("server instance %s ended with requests running: %d billed as %s, "
                        "%d further budget holds released", instance, len(entries), STATUS,
                        released)
        return len(entries)

    async def run(self) -> None:
        """The server's journal task: a tick a second, a look for silent instances every
        few seconds. It outlives any failure (a database outage ends by itself)."""
        last_look = time.monotonic()
        while True:
            await asyncio.sleep(self._tick_seconds)
            try:
                await self.tick()
                if time.monotonic() - last_look >= REAP_SECONDS:
                    last_look = time.monotonic()
                    await self.settle_dead()
            except DatabaseUnavailable:
                pass  # the ledger and the request path report outages
            except Exception:
                log.exception("progress journal tick failed; trying again")

    async def close(self) -> None:
        """At a clean shutdown, after the engines stopped: write the last counts, then
        settle this instance like a dead one (requests cut by the shutdown are billed as
        interrupted, holds released) and give up the slot."""
        try:
            with contextlib.suppress(DatabaseUnavailable):
                await self.tick(beat=True)
                await self._settle(self.instance_id)
        finally:
            if self._lock is not None:
                self._lock.close()
                self._lock = None
