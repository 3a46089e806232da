"""Console benchmark: server time of every console page over a seeded ledger, SQLite and
PostgreSQL side by side in one run.

Each database gets 3 organizations of 4 projects with 2 keys each, prices for 3 models
and `--rows` usage rows (default 10,000) spread over the last 30 days. A real server
(`aicloud serve`, the bundled model) runs over it; the bench signs in with an
installation owner key and requests each page `--repeat` times, one at a time, reading
the page's own `Server-Timing` (queries and template render, from the route's start to
its response), the wall time seen by the client over loopback, and the CPU time the
server process spent per request (all its threads, from /proc; less the idle process's
background work; on PostgreSQL the database's own processes are not in it): on a shared
machine the wall times grow with the neighbours' load, the CPU time much less, so it is
closer to what the page costs on a machine of its own.

    python bench/console.py --rows 10000 --repeat 20
    python bench/console.py --databases sqlite          # no PostgreSQL at hand
"""

from __future__ import annotations

import argparse
import os
import random
import re
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from sqlalchemy import create_engine, insert

from aicloud.store import db, migrate
from aicloud.store.tables import ApiKey, Organization, Price, Project, UsageRecord

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN = os.environ.get("AICLOUD_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
MODELS = ("smollm2-135m-instruct", "llama-3.1-8b", "qwen2.5-7b")
STATUSES = ("completed",) * 90 + ("length",) * 8 + ("error", "interrupted")


@dataclass
class Seeded:
    orgs: list[str]
    projects: list[str]


def _id(kind: str) -> str:
    return f"{kind}_{secrets.token_hex(12)}"


def seed(url: str, rows: int) -> Seeded:
    """Tenants, prices and `rows` usage rows, written straight into the tables."""
    migrate.upgrade(url)
    engine = create_engine(db.sync_url(url))
    rng = random.Random(7)
    now = datetime.now(UTC)
    orgs = [dict(id=_id("org"), name=f"org-{i}", created_at=now, budget_pico=None)
            for i in range(3)]
    projects = [dict(id=_id("proj"), organization_id=o["id"], name=f"project-{i}",
                     created_at=now, rpm_limit=None, tpm_limit=None,
                     budget_pico=50 * 10**12, weight=1.0)
                for o in orgs for i in range(4)]
    keys = [dict(id=_id("key"), project_id=p["id"], name="",
                 prefix="sk-aic-" + secrets.token_hex(2), secret_hash=secrets.token_hex(32),
                 created_at=now, revoked_at=None,
                 expires_at=None, allowed_models=None, rpm_limit=None, tpm_limit=None)
            for p in projects for _ in range(2)]
    prices = [dict(model=m, input_micro=150_000 * (i + 1), cached_input_micro=75_000,
                   output_micro=600_000 * (i + 1), effective_at=now - timedelta(days=60))
              for i, m in enumerate(MODELS)]
    usage = []
    for n in range(rows):
        key = rng.choice(keys)
        project = next(p for p in projects if p["id"] == key["project_id"])
        finished = now - timedelta(seconds=rng.uniform(0, 30 * 86400))
        prompt, completion = rng.randint(20, 2000), rng.randint(1, 500)
        usage.append(dict(
            request_id=f"chatcmpl-bench{n:08d}", organization_id=project["organization_id"],
            api_key_id=key["id"], project_id=project["id"], model=rng.choice(MODELS),
            prompt_tokens=prompt, cached_tokens=0, completion_tokens=completion,
            cost_pico=(prompt * 150_000 + completion * 600_000), status=rng.choice(STATUSES),
            started_at=finished - timedelta(seconds=2), finished_at=finished))
    with engine.begin() as conn:
        conn.execute(insert(Organization), orgs)
        conn.execute(insert(Project), projects)
        conn.execute(insert(ApiKey), keys)
        conn.execute(insert(Price), prices)
        for start in range(0, len(usage), 2000):
            conn.execute(insert(UsageRecord), usage[start:start + 2000])
    engine.dispose()
    return Seeded([o["id"] for o in orgs], [p["id"] for p in projects])


@contextmanager
def postgres_database() -> Iterator[str]:
    import psycopg

    name = f"console_bench_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_ADMIN.rsplit('/', 1)[0]}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """User and system time of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def server(home: Path, url: str) -> Iterator[tuple[str, dict[str, str], int]]:
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AICLOUD_")},
           "AICLOUD_HOME": str(home), "AICLOUD_DATABASE_URL": url}
    log = (home / "server.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "aicloud", "serve", "--port", str(port),
                             "--context", "512", "--sequences", "2"], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise RuntimeError(f"the server did not start: see {home / 'server.log'}")
        yield base, env, proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


def owner_key(env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-m", "aicloud", "admin-keys", "create", "--role",
                          "owner"], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def signed_in(base: str, key: str) -> httpx.Client:
    client = httpx.Client(base_url=base, timeout=60, headers={"accept": "text/html"})
    form = client.get("/console/sign-in")
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    assert token, "no sign-in form"
    resp = client.post("/console/sign-in", data={"csrf_token": token[1], "key": key})
    assert resp.status_code == 303, resp.text
    return client


def pages(seeded: Seeded) -> list[str]:
    month = datetime.now(UTC).strftime("%Y-%m")
    return ["/console/", "/console/overview/live", "/console/organizations",
            f"/console/organizations/{seeded.orgs[0]}", f"/console/projects/{seeded.projects[0]}",
            "/console/keys", "/console/usage", f"/console/usage?project_id={seeded.projects[0]}",
            f"/console/invoices?organization_id={seeded.orgs[0]}&month={month}",
            "/console/prices", "/console/playground", "/console/models", "/console/models/live",
            "/console/providers", "/console/usage/export.csv"]


@dataclass
class Timing:
    server_ms: list[float]
    wall_ms: list[float]
    cpu_ms: float = 0.0  # per request


def idle_cpu_per_second(pid: int, seconds: float = 3.0) -> float:
    before = cpu_seconds(pid)
    time.sleep(seconds)
    return (cpu_seconds(pid) - before) / seconds


def measure(client: httpx.Client, path: str, repeat: int, pid: int, idle: float) -> Timing:
    client.get(path).raise_for_status()  # warm: first-use compilation of its template
    timing = Timing([], [])
    cpu, started_all = cpu_seconds(pid), time.perf_counter()
    for _ in range(repeat):
        started = time.perf_counter()
        resp = client.get(path)
        timing.wall_ms.append((time.perf_counter() - started) * 1000)
        resp.raise_for_status()
        dur = re.search(r"dur=([0-9.]+)", resp.headers.get("server-timing", ""))
        assert dur, f"{path}: no Server-Timing"
        timing.server_ms.append(float(dur[1]))
    background = idle * (time.perf_counter() - started_all)
    timing.cpu_ms = max(cpu_seconds(pid) - cpu - background, 0.0) * 1000 / repeat
    return timing


def p95(values: list[float]) -> float:
    return sorted(values)[max(0, round(0.95 * len(values)) - 1)]


def run(kind: str, url: str, rows: int, repeat: int) -> dict[str, Timing]:
    seeded = seed(url, rows)
    with tempfile.TemporaryDirectory() as home, server(Path(home), url) as (base, env, pid):
        client = signed_in(base, owner_key(env))
        idle = idle_cpu_per_second(pid)
        try:
            # by the path with its ids elided, so both databases' rows line up
            return {re.sub(r"(org|proj)_[0-9a-f]{24}", r"\1_…", path):
                    measure(client, path, repeat, pid, idle) for path in pages(seeded)}
        finally:
            client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--databases", default="sqlite,postgresql")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    results: dict[str, dict[str, Timing]] = {}
    for kind in args.databases.split(","):
        if kind == "sqlite":
            with tempfile.TemporaryDirectory() as where:
                results[kind] = run(kind, f"sqlite:///{where}/bench.db", args.rows, args.repeat)
        else:
            with postgres_database() as url:
                results[kind] = run(kind, url, args.rows, args.repeat)
    kinds = list(results)
    print(f"console pages, {args.rows:,} usage rows, {args.repeat} requests each; "
          "server time p50 / p95 ms (client wall p50) [server CPU ms per request]")
    print("| page | " + " | ".join(kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for path in next(iter(results.values())):
        cells = []
        for kind in kinds:
            t = results[kind][path]
            cells.append(f"{statistics.median(t.server_ms):.1f} / {p95(t.server_ms):.1f} "
                         f"({statistics.median(t.wall_ms):.1f}) [{t.cpu_ms:.1f}]")
        print(f"| `{path}` | " + " | ".join(cells) + " |")
    slowest = max(p95(t.server_ms) for r in results.values() for p, t in r.items()
                  if not p.endswith(".csv"))
    print(f"slowest page p95: {slowest:.1f} ms (target: under 200 ms); load average "
          f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
