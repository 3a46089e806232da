"""Gateway benchmark: what the cloud path costs, against LiteLLM's proxy, in one run.

Every server gets an instant model, so all its time is its own: aicloud serves a fake
engine in-process (bench/fake_engine.py), LiteLLM's proxy forwards to a fake upstream
(bench/fake_upstream.py), and that upstream called directly is the baseline round trip.

- aicloud, on SQLite and on PostgreSQL: a real key made with the admin CLI in a project
  with RPM/TPM limits (high enough never to refuse), a price for the model and a budget,
  so each request authenticates, takes its rate-limit buckets, holds its budget, and
  writes its usage row while settling the hold. A second key, in a project with no
  limits and no budget, shows the same server without limits and budget hold.
- LiteLLM's proxy (bench/setup-litellm.sh), with its PostgreSQL database and a virtual
  key with a budget and RPM/TPM limits, made through its /key/generate.

Each server runs under uvicorn with one worker, pinned to core 0 (`taskset -c 0`); the
load generator (raw asyncio HTTP/1.1 on keep-alive connections, non-streaming chat
completions) runs on core 1, as does the upstream behind LiteLLM. Latency is taken at
one connection (unloaded); requests/s at `--concurrency` connections. "Added p50" is a
server's p50 minus the direct upstream's, both at one connection.

    python bench/gateway.py --seconds 10 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
LITELLM = BENCH / ".venvs" / "litellm" / "bin" / "litellm"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
MODEL = "fake-instant"
SERVER_CORE, CLIENT_CORE = 0, 1
BODY = json.dumps({"model": MODEL, "max_tokens": 16, "messages": [
    {"role": "user", "content": "Say hello in one short sentence, please."}]}).encode()
HUGE = "1000000000"  # RPM / TPM limits that never refuse


# -- load generator -------------------------------------------------------------------------

@dataclass
class Sample:
    """One load level: latency of every good request, and how many failed."""

    concurrency: int
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    wall: float = 0.0

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.wall if self.wall else 0.0

    def pct_ms(self, q: int) -> float:
        if len(self.latencies) < 2:
            return float("nan")
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[q - 1] * 1e3


def request_bytes(port: int, key: str | None) -> bytes:
    head = [b"POST /v1/chat/completions HTTP/1.1", f"host: 127.0.0.1:{port}".encode(),
            b"content-type: application/json", f"content-length: {len(BODY)}".encode()]
    if key:
        head.append(f"authorization: Bearer {key}".encode())
    return b"\r\n".join(head) + b"\r\n\r\n" + BODY


async def read_body(reader: asyncio.StreamReader, headers: dict[bytes, bytes]) -> bytes:
    if b"content-length" in headers:
        return await reader.readexactly(int(headers[b"content-length"]))
    chunks = []
    while size := int((await reader.readuntil(b"\r\n")).strip() or b"0", 16):
        chunks.append(await reader.readexactly(size))
        await reader.readexactly(2)
    await reader.readuntil(b"\r\n")
    return b"".join(chunks)


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   request: bytes) -> bool:
    """One request on a keep-alive connection; True for a 200 with a completion."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = dict(line.lower().split(b": ", 1) for line in lines[1:] if b": " in line)
    body = await read_body(reader, headers)
    return lines[0].split(b" ")[1] == b"200" and b'"choices"' in body


async def connection(port: int, request: bytes, until: float, sample: Sample) -> None:
    reader = writer = None
    while time.perf_counter() < until:
        if writer is None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert reader is not None
        start = time.perf_counter()
        try:
            ok = await exchange(reader, writer, request)
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            ok = False
            writer.close()
            writer = None
        if ok:
            sample.latencies.append(time.perf_counter() - start)
        else:
            sample.errors += 1
    if writer is not None:
        writer.close()


async def load(port: int, key: str | None, concurrency: int, seconds: float) -> Sample:
    sample = Sample(concurrency)
    request = request_bytes(port, key)
    start = time.perf_counter()
    await asyncio.gather(*(connection(port, request, start + seconds, sample)
                           for _ in range(concurrency)))
    sample.wall = time.perf_counter() - start
    return sample


@dataclass
class Result:
    name: str
    database: str
    unloaded: Sample | None = None
    loaded: Sample | None = None
    failure: str | None = None


def measure(name: str, database: str, port: int, key: str | None,
            args: argparse.Namespace) -> Result:
    asyncio.run(load(port, key, args.concurrency, args.warmup))
    result = Result(name, database, asyncio.run(load(port, key, 1, args.seconds)),
                    asyncio.run(load(port, key, args.concurrency, args.seconds)))
    assert result.loaded is not None and result.unloaded is not None
    print(f"  {name} [{database}]: {result.loaded.rps:.0f} req/s at c={args.concurrency}, "
          f"p50 {result.unloaded.pct_ms(50):.2f} ms at c=1, errors "
          f"{result.unloaded.errors + result.loaded.errors}", flush=True)
    return result


# -- processes --------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(command: list[str], env: dict[str, str], log: Path, core: int) -> Iterator[
        subprocess.Popen[bytes]]:
    """A server pinned to one core, in its own process group, stopped on the way out."""
    with log.open("wb") as out:
        proc = subprocess.Popen(["taskset", "-c", str(core), *command],
                                env={**os.environ, **env}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield proc
        finally:
            for sig in (signal.SIGINT, signal.SIGKILL):
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(20)
                    break
                except subprocess.TimeoutExpired:
                    continue


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 300,
               headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}: {log.read_text()[-600:]}")
        with suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2, headers=headers).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"not ready in {timeout:.0f} s: {log.read_text()[-600:]}")


def python_server(script: str, port: int, *extra: str) -> list[str]:
    return [sys.executable, str(BENCH / script), "--port", str(port), *extra]


@contextmanager
def fake_upstream(tmp: Path, core: int) -> Iterator[int]:
    port = free_port()
    log = tmp / f"upstream-{port}.log"
    with server(python_server("fake_upstream.py", port), {}, log, core) as proc:
        wait_ready(f"http://127.0.0.1:{port}/v1/models", proc, log)
        yield port


@contextmanager
def postgres_database(prefix: str) -> Iterator[str]:
    """A fresh database on the local PostgreSQL, dropped afterwards."""
    import psycopg

    name = f"{prefix}_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- the peers ----------------------------------------------------------------------------------

def measure_direct(args: argparse.Namespace, tmp: Path) -> Result:
    with fake_upstream(tmp, SERVER_CORE) as port:
        return measure("fake upstream, direct (baseline)", "—", port, None, args)


def aicloud_cli(env: dict[str, str], *words: str) -> str:
    out = subprocess.run([sys.executable, "-m", "aicloud", *words], env={**os.environ, **env},
                         capture_output=True, text=True, check=True)
    return out.stdout


def provision_aicloud(env: dict[str, str]) -> tuple[str, str]:
    """Keys through the admin CLI: one in a project with limits and a budget on a priced
    model, one in a project with neither. Returns both secrets."""
    org = json.loads(aicloud_cli(env, "orgs", "create", "bench"))["id"]
    aicloud_cli(env, "prices", "set", MODEL, "--input", "0.5", "--output", "1.5")
    limited = json.loads(aicloud_cli(env, "projects", "create", "limited", "--org", org,
                                     "--rpm", HUGE, "--tpm", HUGE,
                                     "--budget-usd", "1000000"))["id"]
    bare = json.loads(aicloud_cli(env, "projects", "create", "bare", "--org", org))["id"]
    keys = [aicloud_cli(env, "keys", "create", "--project-id", pid, "--rpm", HUGE,
                        "--tpm", HUGE).strip().splitlines()[-1] for pid in (limited,)]
    keys += [aicloud_cli(env, "keys", "create", "--project-id", bare).strip().splitlines()[-1]]
    return keys[0], keys[1]


def measure_aicloud(database: str, url: str | None, args: argparse.Namespace,
                    tmp: Path) -> list[Result]:
    home = tmp / f"aicloud-{database}"
    env = {"AICLOUD_HOME": str(home), "PYTHONPATH": str(ROOT / "src")}
    if url:
        env["AICLOUD_DATABASE_URL"] = url
    limited, bare = provision_aicloud(env)
    port = free_port()
    extra = ["--home", str(home)] + (["--database-url", url] if url else [])
    log = tmp / f"aicloud-{database}.log"
    with server(python_server("fake_engine.py", port, *extra), env, log, SERVER_CORE) as proc:
        wait_ready(f"http://127.0.0.1:{port}/v1/models", proc, log,
                   headers={"Authorization": f"Bearer {limited}"})
        full = measure("aicloud: key + limits + budget hold + ledger", database, port, limited,
                       args)
        light = measure("aicloud: key + ledger (no limits, no budget)", database, port, bare,
                        args)
    report_ledger(env, database, [full, light])
    return [full, light]


def report_ledger(env: dict[str, str], database: str, results: list[Result]) -> None:
    """Every 200 must have its usage row: compare the ledger with what the client got."""
    summary = json.loads(aicloud_cli(env, "billing", "usage", "--group-by", "project"))
    rows = sum(group["requests"] for group in summary["data"])
    answered = sum(len(s.latencies) for r in results for s in (r.unloaded, r.loaded) if s)
    print(f"  aicloud [{database}]: {rows} usage rows for {answered} measured 200s "
          "(plus warm-up)", flush=True)


LITELLM_CONFIG = """\
model_list:
  - model_name: {model}
    litellm_params:
      model: openai/{model}
      api_base: http://127.0.0.1:{upstream}/v1
      api_key: fake
      input_cost_per_token: 0.0000005
      output_cost_per_token: 0.0000015
general_settings:
  master_key: {master}
"""
# uvicorn's access log off, as for the other servers
QUIET = {"version": 1, "disable_existing_loggers": False,
         "loggers": {"uvicorn.access": {"level": "WARNING"}, "uvicorn.error": {"level": "WARNING"}}}
LITELLM_ENV = {"LITELLM_LOG": "ERROR", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}


def litellm_key(port: int, master: str) -> str:
    """A virtual key with a budget and RPM/TPM limits, like aicloud's limited key."""
    reply = httpx.post(f"http://127.0.0.1:{port}/key/generate", timeout=60,
                       headers={"Authorization": f"Bearer {master}"},
                       json={"models": [MODEL], "max_budget": 1000000,
                             "rpm_limit": int(HUGE), "tpm_limit": int(HUGE)})
    reply.raise_for_status()
    return reply.json()["key"]


def why_litellm_failed(log: Path, error: Exception) -> str:
    text = log.read_text(errors="replace")
    if "binaries.prisma.sh" in text:
        return ("its Prisma client needs Prisma's query-engine binary, downloaded from "
                "binaries.prisma.sh at `prisma generate`/startup; no package registry ships it "
                "and that host is unreachable here")
    return f"{error}"[-300:]


def run_litellm(tmp: Path, upstream: int, database_url: str | None,
                args: argparse.Namespace, name: str) -> Result:
    """One LiteLLM proxy; with a database, loaded with a virtual key, else the master key."""
    master = "sk-bench-" + secrets.token_hex(8)
    config, quiet = tmp / "litellm.yaml", tmp / "litellm-logging.json"
    config.write_text(LITELLM_CONFIG.format(model=MODEL, upstream=upstream, master=master))
    quiet.write_text(json.dumps(QUIET))
    port = free_port()
    log = tmp / f"litellm-{port}.log"
    command = [str(LITELLM), "--config", str(config), "--host", "127.0.0.1", "--port",
               str(port), "--num_workers", "1", "--log_config", str(quiet)]
    env = LITELLM_ENV | ({"DATABASE_URL": database_url} if database_url else {})
    database = "postgresql" if database_url else "none"
    try:
        with server(command, env, log, SERVER_CORE) as proc:
            wait_ready(f"http://127.0.0.1:{port}/health/liveliness", proc, log, 600)
            key = litellm_key(port, master) if database_url else master
            return measure(name, database, port, key, args)
    except (RuntimeError, httpx.HTTPError) as exc:
        return Result(name, database, failure=why_litellm_failed(log, exc))


def measure_litellm(args: argparse.Namespace, tmp: Path) -> list[Result]:
    """Virtual keys (the configuration we compare against) first; if they cannot run here,
    the proxy with its master key and no database, marked as such."""
    name = "LiteLLM proxy: virtual key + budget + limits"
    if not LITELLM.exists():
        return [Result(name, "postgresql", failure="not installed: run bench/setup-litellm.sh")]
    with fake_upstream(tmp, CLIENT_CORE) as upstream:
        with postgres_database("litellm_bench") as url:
            keyed = run_litellm(tmp, upstream, url, args, name)
        if keyed.failure is None:
            return [keyed]
        print(f"  {name}: fails: {keyed.failure}", flush=True)
        bare = run_litellm(tmp, upstream, None, args,
                           "LiteLLM proxy (no virtual keys: see above): master key, no DB")
        return [keyed, bare]


# -- report ---------------------------------------------------------------------------------------

def table(results: list[Result], concurrency: int) -> str:
    base = next((r.unloaded.pct_ms(50) for r in results if r.unloaded and r.name.startswith(
        "fake upstream")), float("nan"))
    litellm = next((r.loaded.rps for r in results  # the first LiteLLM that ran
                    if r.loaded and r.name.startswith("LiteLLM")), None)
    rows = [f"| server | database | req/s at c={concurrency} | vs LiteLLM | p50 / p99 at c=1 (ms) "
            f"| added p50 (ms) | p50 / p99 at c={concurrency} (ms) | errors / requests |",
            "|---" * 8 + "|"]
    for r in results:
        if r.failure or r.loaded is None or r.unloaded is None:
            rows.append(f"| {r.name} | {r.database} | fails: {r.failure} | | | | | |")
            continue
        ratio = f"{r.loaded.rps / litellm:.1f}x" if litellm else "—"
        added = r.unloaded.pct_ms(50) - base
        total = len(r.loaded.latencies) + len(r.unloaded.latencies)
        errors = r.loaded.errors + r.unloaded.errors
        rows.append(
            f"| {r.name} | {r.database} | {r.loaded.rps:.0f} | {ratio} | "
            f"{r.unloaded.pct_ms(50):.2f} / {r.unloaded.pct_ms(99):.2f} | "
            f"{'—' if r.name.startswith('fake upstream') else f'{added:.2f}'} | "
            f"{r.loaded.pct_ms(50):.1f} / {r.loaded.pct_ms(99):.1f} | "
            f"{errors} / {errors + total} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="per load level")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--only", nargs="+", default=["direct", "sqlite", "postgresql",
                                                      "litellm"],
                        choices=["direct", "sqlite", "postgresql", "litellm"])
    args = parser.parse_args()
    os.sched_setaffinity(0, {CLIENT_CORE})
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as name:
        tmp = Path(name)
        if "direct" in args.only:
            results.append(measure_direct(args, tmp))
        if "sqlite" in args.only:
            results += measure_aicloud("sqlite", None, args, tmp)
        if "postgresql" in args.only:
            with postgres_database("aicloud_bench") as url:
                results += measure_aicloud("postgresql", url, args, tmp)
        if "litellm" in args.only:
            results += measure_litellm(args, tmp)
    print(table(results, args.concurrency))


if __name__ == "__main__":
    main()
