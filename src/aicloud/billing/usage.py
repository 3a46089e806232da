"""The usage ledger: one append-only row per request, with the engine's own token counts
and the exact cost; writing it settles the request's budget hold and adds the cost to the
monthly spend counters in the same transaction (the counters only when the row is new).

If the database stays away longer than the retries, the entry goes to a spool file in
the server's home (appended and fsynced before the response finishes) and is written
later by a background task. Rows are keyed by request id, so replaying twice is harmless.
A spooled line that can never be written (torn by a crash mid-append, refused by the
database) moves to a quarantine file instead of blocking the lines after it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from aicloud.billing.budgets import SCOPES, Hold, month_key, release_where, scopes
from aicloud.store.direct import Conn, DatabaseUnavailable, Direct

log = logging.getLogger(__name__)

RETRY_DELAYS = (0.05, 0.2, 1.0)
SPOOL_PREFIX, SPOOL_SUFFIX = "usage-spool-", ".jsonl"
SPOOL_GLOB = f"{SPOOL_PREFIX}*{SPOOL_SUFFIX}"
# lines that can never be replayed, kept for a person to look at (outside SPOOL_GLOB)
QUARANTINE = "usage-quarantine.jsonl"


@dataclass(slots=True, frozen=True)
class UsageEntry:
    request_id: str
    organization_id: str
    api_key_id: str
    project_id: str
    model: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cost_pico: int
    status: str
    started_at: datetime
    finished_at: datetime
    provider: str | None = None  # the upstream provider that served it; None: this server
    estimated: bool = False  # the provider sent no counts: the tokens are estimates


def _encode(entry: UsageEntry, hold: Hold | None) -> str:
    data: dict[str, Any] = asdict(entry)
    data["started_at"] = entry.started_at.isoformat()
    data["finished_at"] = entry.finished_at.isoformat()
    return json.dumps({"entry": data, "hold": asdict(hold) if hold else None}) + "\n"


def _decode(line: str) -> tuple[UsageEntry, Hold | None]:
    data = json.loads(line)
    entry = data["entry"]
    for field in ("started_at", "finished_at"):
        entry[field] = datetime.fromisoformat(entry[field])
    return UsageEntry(**entry), Hold(**data["hold"]) if data["hold"] else None


INSERT_USAGE = (
    "INSERT INTO usage (request_id, organization_id, api_key_id, project_id, model, "
    "prompt_tokens, cached_tokens, completion_tokens, cost_pico, status, started_at, "
    "finished_at, provider, estimated) VALUES (:request_id, :organization_id, :api_key_id, "
    ":project_id, :model, :prompt_tokens, :cached_tokens, :completion_tokens, :cost_pico, "
    ":status, :started_at, :finished_at, :provider, :estimated) "
    "ON CONFLICT (request_id) DO NOTHING")
ADD_SPEND = (
    "INSERT INTO monthly_spend (scope, month, spent_pico) VALUES (:scope, :month, :cost) "
    "ON CONFLICT (scope, month) DO UPDATE SET spent_pico = monthly_spend.spent_pico + "
    "excluded.spent_pico")


# PostgreSQL: the row, the spend counters (only for a new row) and the settle of the hold
# (with its counters) in one statement, so one round trip
WRITE_POSTGRES = f"""
WITH new AS ({INSERT_USAGE} RETURNING cost_pico),
     spent AS (
       INSERT INTO monthly_spend (scope, month, spent_pico)
       SELECT s.scope, :month, new.cost_pico FROM new CROSS JOIN {SCOPES}
       WHERE new.cost_pico <> 0 ORDER BY s.ord
       ON CONFLICT (scope, month) DO UPDATE
       SET spent_pico = monthly_spend.spent_pico + excluded.spent_pico RETURNING 1),
     settled AS (DELETE FROM reservations WHERE request_id = :hold RETURNING amount_pico)
INSERT INTO budget_held (scope, held_pico)
SELECT s.scope, -settled.amount_pico FROM settled CROSS JOIN {SCOPES} ORDER BY s.ord
ON CONFLICT (scope) DO UPDATE SET held_pico = budget_held.held_pico + excluded.held_pico
"""


def _write(conn: Conn, entry: UsageEntry, hold: Hold | None) -> None:
    row: dict[str, object] = asdict(entry)
    row["started_at"], row["finished_at"] = conn.time(entry.started_at), conn.time(
        entry.finished_at)
    month = month_key(entry.finished_at)
    both = scopes(entry.project_id, entry.organization_id)
    if conn.dialect == "postgresql":
        conn.round_trip(WRITE_POSTGRES, {**row, **both, "month": month,
                                         "hold": hold.request_id if hold else None})
        return
    with conn.transaction():  # SQLite has no writes inside WITH: the same, step by step
        if conn.run(INSERT_USAGE, row) and entry.cost_pico:
            for scope in both.values():
                conn.run(ADD_SPEND, {"scope": scope, "month": month, "cost": entry.cost_pico})
        if hold is not None:
            release_where(conn, "request_id = :r", {"r": hold.request_id})


def _append_fsynced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _spool_pid(path: Path) -> int | None:
    """The process id in `usage-spool-<pid>.jsonl`, or None for any other name."""
    pid = path.name[len(SPOOL_PREFIX):-len(SPOOL_SUFFIX)]
    return int(pid) if pid.isascii() and pid.isdigit() and 0 < len(pid) < 10 else None


def _refused_row(exc: Exception) -> bool:
    """The database (or the driver, binding values) refuses the row itself: it always
    will. DB-API drivers name these DataError and IntegrityError."""
    if isinstance(exc, ValueError | TypeError | OverflowError):
        return True
    return any(c.__name__ in ("DataError", "IntegrityError") for c in type(exc).__mro__)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class UsageLedger:
    def __init__(self, direct: Direct, spool_dir: Path | None = None) -> None:
        self._direct = direct
        self._spool_dir = spool_dir
        self._spool = spool_dir / f"usage-spool-{os.getpid()}.jsonl" if spool_dir else None
        self._lock = asyncio.Lock()
        self._odd: set[str] = set()  # spool-looking files already reported as not ours

    async def record(self, entry: UsageEntry, hold: Hold | None = None) -> None:
        """Idempotent by request id. Retried briefly; then spooled, so a caller can send
        its response knowing the usage will land."""
        for delay in (*RETRY_DELAYS, None):
            try:
                await self._insert(entry, hold)
                return
            except DatabaseUnavailable as exc:
                if delay is not None:
                    await asyncio.sleep(delay)
                    continue
                if self._spool is None:
                    log.error("usage for request %s could not be written", entry.request_id)
                    raise
                log.warning("database unavailable (%s); usage of %s spooled to disk",
                            type(exc.__cause__).__name__, entry.request_id)
                await self._append(_encode(entry, hold))

    async def _append(self, line: str) -> None:
        async with self._lock:
            await asyncio.to_thread(self._append_sync, line)

    def _append_sync(self, line: str) -> None:
        assert self._spool is not None
        _append_fsynced(self._spool, line.encode())

    async def replay(self) -> int:
        """Write spooled entries: this process's, and those of processes that died.
        Returns how many were written; stops at the first failure to reach the database
        and keeps the rest. A file whose name carries no process id is left alone (and
        reported once); a line that cannot be read or written is quarantined."""
        if self._spool_dir is None:
            return 0
        written = 0
        for path in sorted(self._spool_dir.glob(SPOOL_GLOB)):
            pid = _spool_pid(path)
            if pid is None:
                if path.name not in self._odd:
                    self._odd.add(path.name)
                    log.warning("ignoring %s in the spool folder: not a usage-spool-<pid> "
                                "file of ours", path.name)
                continue
            if path != self._spool and _pid_alive(pid):
                continue
            written += await self._replay_file(path)
        return written

    async def _replay_file(self, path: Path) -> int:
        async with self._lock:
            lines = (await asyncio.to_thread(path.read_bytes)).splitlines(keepends=True)
            done = written = 0
            try:
                for number, line in enumerate(lines, 1):
                    if line.strip():
                        written += await self._replay_line(path, number, line)
                    done += 1
            finally:
                await asyncio.to_thread(self._rewrite, path, lines[done:])
            if written:
                log.info("wrote %d spooled usage rows from %s", written, path.name)
            return written

    async def _replay_line(self, path: Path, number: int, line: bytes) -> bool:
        """Write one spooled entry; False if it went to quarantine. A failure to reach
        the database, or one that is not about this line, leaves it (and the rest) for
        the next round; a line that can never be written is quarantined."""
        try:
            entry, hold = _decode(line.decode())
        except Exception as exc:  # torn by a crash mid-append, or edited by hand
            await self._quarantine(path, number, line, exc)
            return False
        try:
            await self._insert(entry, hold)
        except Exception as exc:
            if not _refused_row(exc):
                raise
            await self._quarantine(path, number, line, exc)
            return False
        return True

    async def _quarantine(self, path: Path, number: int, line: bytes,
                          exc: Exception) -> None:
        assert self._spool_dir is not None
        target = self._spool_dir / QUARANTINE
        log.error("spooled usage line %s:%d (%d bytes) cannot be replayed (%s: %s); moved "
                  "to %s", path.name, number, len(line), type(exc).__name__, exc, target.name)
        await asyncio.to_thread(_append_fsynced, target,
                                line if line.endswith(b"\n") else line + b"\n")

    @staticmethod
    def _rewrite(path: Path, rest: list[bytes]) -> None:
        if not rest:
            path.unlink(missing_ok=True)
            return
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(b"".join(rest))
        os.replace(tmp, path)

    async def _insert(self, entry: UsageEntry, hold: Hold | None) -> None:
        await self._direct.run(lambda conn: _write(conn, entry, hold))
