"""Plain DB-API access for the statements every API request runs (authenticate, hold the
budget, write the usage row), each job on a worker thread that owns its connection.

Why not SQLAlchemy here: through the async ORM and aiosqlite one of these statements cost
about 0.35 ms, against 15 us for sqlite3 itself and 90 us for a PostgreSQL round trip, and
a request runs eight of them. A job is a plain function of a `Conn` that runs all its
statements in one hop to its thread, so a transaction costs one hop, not one per statement.
Admin and report paths, which run rarely, stay on SQLAlchemy.

SQL is written once for both databases with `:name` parameters; timestamps are stored as
SQLAlchemy stores them (UTC text on SQLite, timestamptz on PostgreSQL), so rows written
here and rows read by the ORM agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, TypeVar

from sqlalchemy.engine import make_url

T = TypeVar("T")

SQLITE_TIME = "%Y-%m-%d %H:%M:%S.%f"
# an advisory lock writes nothing (a row lock would dirty the organization's row each time)
LOCK_ORGANIZATION = "pg_advisory_xact_lock(hashtextextended(:organization, 0))"
NOT_DURABLE = "set_config('synchronous_commit', 'off', true)"
# PostgreSQL commits wait on the WAL flush; a few connections let those waits overlap
POSTGRES_WORKERS = 4


class DatabaseUnavailable(Exception):
    """The database could not be reached, or the connection broke during a job."""


@lru_cache(maxsize=256)
def _pyformat(sql: str) -> str:
    return re.sub(r"(?<!:):([A-Za-z_]\w*)", r"%(\1)s", sql)


class Conn:
    """One worker's connection, with the few operations the request path needs."""

    def __init__(self, raw: Any, dialect: str) -> None:
        self.raw = raw
        self.dialect = dialect

    def _sql(self, sql: str) -> str:
        return sql if self.dialect == "sqlite" else _pyformat(sql)

    def one(self, sql: str, params: Mapping[str, Any] | None = None) -> tuple[Any, ...] | None:
        # fetchall: a SQLite statement left unfinished would pin this connection's snapshot
        rows = self.raw.execute(self._sql(sql), params or {}).fetchall()
        return rows[0] if rows else None

    def all(self, sql: str, params: Mapping[str, Any] | None = None) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = self.raw.execute(self._sql(sql), params or {}).fetchall()
        return rows

    def run(self, sql: str, params: Mapping[str, Any] | None = None) -> int:
        """Execute a write; returns the rows it changed."""
        changed: int = self.raw.execute(self._sql(sql), params or {}).rowcount
        return changed

    def run_many(self, sql: str, rows: list[Mapping[str, Any]]) -> None:
        """Execute one write for each of `rows` (SQLite: one prepared statement, no round
        trips to save; PostgreSQL batches should rather be one statement over arrays)."""
        if not rows:
            return
        if self.dialect == "sqlite":
            self.raw.executemany(sql, rows)
            return
        with self.raw.cursor() as cursor:
            cursor.executemany(_pyformat(sql), rows)

    @contextmanager
    def transaction(self, lock_organization: str | None = None) -> Iterator[None]:
        """All or nothing. With `lock_organization`, transactions naming the same
        organization run one at a time, in every process: SQLite takes its database write
        lock at BEGIN, PostgreSQL takes an advisory lock named after the organization."""
        if self.dialect == "sqlite":
            self.raw.execute("BEGIN IMMEDIATE" if lock_organization else "BEGIN")
        else:
            self._begin_postgres(lock_organization, durable=True)
        try:
            yield
        except BaseException:
            self.raw.execute("ROLLBACK")
            raise
        self.raw.execute("COMMIT")

    def _begin_postgres(self, lock_organization: str | None, durable: bool) -> None:
        self.raw.execute("BEGIN")
        preamble = [*([] if durable else [NOT_DURABLE]),
                    *([LOCK_ORGANIZATION] if lock_organization else [])]
        if preamble:
            self.raw.execute(_pyformat(f"SELECT {', '.join(preamble)}"),
                             {"organization": lock_organization})

    def round_trip(self, sql: str, params: Mapping[str, Any], *,
                   lock_organization: str | None = None,
                   durable: bool = True) -> list[tuple[Any, ...]]:
        """One PostgreSQL statement as its own transaction (locked as in `transaction`) in a
        single network round trip: alone, or pipelined between BEGIN and COMMIT.

        `durable=False` lets PostgreSQL acknowledge the commit before its WAL reaches the
        disk: other sessions see it at once, and only a crash of PostgreSQL itself within
        a fraction of a second could lose it (SQLite in WAL mode with synchronous=NORMAL
        already commits this way)."""
        if durable and not lock_organization:
            cursor = self.raw.execute(_pyformat(sql), params)
            return cursor.fetchall() if cursor.description else []
        try:
            with self.raw.pipeline():
                self._begin_postgres(lock_organization, durable)
                cursor = self.raw.execute(_pyformat(sql), params)
                self.raw.execute("COMMIT")
        except BaseException:
            import psycopg

            if self.raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                self.raw.execute("ROLLBACK")  # a failed statement skipped the COMMIT
            raise
        return cursor.fetchall() if cursor.description else []

    def time(self, moment: datetime) -> Any:
        """A timestamp as this database stores it."""
        if self.dialect == "sqlite":
            return moment.astimezone(UTC).strftime(SQLITE_TIME)
        return moment

    def read_time(self, value: Any) -> datetime | None:
        if value is None:
            return None
        moment = datetime.fromisoformat(value) if isinstance(value, str) else value
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)

    def read_json(self, value: Any) -> Any:
        return json.loads(value) if isinstance(value, str) else value


# every request inserts and deletes a hold and updates two counter rows of each kind
CHURN_TABLES = ("reservations", "budget_held", "monthly_spend")


def vacuum_churn_tables(conn: Conn) -> bool:
    """On a PostgreSQL whose autovacuum is off, clear the dead rows the request path leaves
    (thousands a minute); otherwise every hold and settle walks further through them.
    SQLite frees them at once. Returns whether it vacuumed."""
    if conn.dialect != "postgresql" or (conn.one("SHOW autovacuum") or ("on",))[0] != "off":
        return False
    conn.run(f"VACUUM {', '.join(CHURN_TABLES)}")  # a table it may not vacuum is a warning
    return True


class Direct:
    """Worker threads, each with its own connection, made on first use and remade after
    a failure, so a database that comes back is used again without a restart. A job is
    handed over on a queue and its result comes back with one `call_soon_threadsafe`:
    about half the cost of an executor round trip, on every statement of every request."""

    def __init__(self, url: str) -> None:
        parsed = make_url(url)
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite":
            self._target = parsed.database or ":memory:"
            workers = 1  # one writer at a time anyway; reads queue behind it for microseconds
        elif self.dialect == "postgresql":
            self._target = parsed.set(drivername="postgresql").render_as_string(
                hide_password=False)
            workers = POSTGRES_WORKERS
        else:
            raise ValueError(f"unsupported database {self.dialect!r}")
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"db-{self.dialect}-{i}",
                                          daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def _connect(self) -> Conn:
        if self.dialect == "sqlite":
            raw: Any = sqlite3.connect(self._target, isolation_level=None,
                                       check_same_thread=False)
            for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=10000",
                           "foreign_keys=ON"):
                raw.execute(f"PRAGMA {pragma}")
        else:
            import psycopg

            raw = psycopg.connect(self._target, autocommit=True, connect_timeout=5)
        return Conn(raw, self.dialect)

    def _errors(self) -> tuple[type[Exception], ...]:
        if self.dialect == "sqlite":
            return (sqlite3.OperationalError,)
        import psycopg

        return (psycopg.OperationalError, psycopg.InterfaceError)

    def _work(self) -> None:
        conn: Conn | None = None
        while (item := self._jobs.get()) is not None:
            job, future, loop = item
            try:
                if conn is None:
                    conn = self._connect()
                outcome, failed = job(conn), False
            except self._errors() as exc:
                if conn is not None and (self.dialect != "sqlite" or conn.raw.in_transaction):
                    with contextlib.suppress(Exception):  # already broken: only tidiness
                        conn.raw.close()
                    conn = None
                error = DatabaseUnavailable(f"{type(exc).__name__}: {exc}")
                error.__cause__ = exc
                outcome, failed = error, True
            except BaseException as exc:  # the caller's to handle, as if it ran there
                outcome, failed = exc, True
            with contextlib.suppress(RuntimeError):  # the loop closed while we worked
                loop.call_soon_threadsafe(_settle, future, outcome, failed)
        if conn is not None:
            with contextlib.suppress(Exception):  # at shutdown: nothing left to save
                conn.raw.close()

    async def run(self, job: Callable[[Conn], T]) -> T:
        """Run `job` on a worker thread; its statements never block the event loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((job, future, loop))
        return await future

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()


_Job = tuple[Callable[[Conn], Any], "asyncio.Future[Any]", asyncio.AbstractEventLoop]


def _settle(future: asyncio.Future[Any], outcome: Any, failed: bool) -> None:
    if future.cancelled():
        return
    if failed:
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
