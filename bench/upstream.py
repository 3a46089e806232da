"""Upstream benchmark: what relaying a partner model through aicloud costs, against
LiteLLM's proxy routing to the same provider, in one run.

The provider is bench/fake_provider.py (a bare ASGI app streaming six chunks and a usage
chunk, no work of its own). Called directly it is the baseline; aicloud serves it as an
upstream model (provider added with the CLI, key sealed, the full cloud path: key, RPM/TPM
buckets, budget hold, ledger row with the provider's usage); LiteLLM's proxy (bench/
setup-litellm.sh, master key, no database) routes to it as an `openai/` model.

Three questions, each against every target:
- latency added per request (p50, p99 of a whole streamed answer, one request at a time,
  minus the provider's own) and per streamed chunk (the gaps after the first chunk);
- requests/s at concurrency 32 (streamed requests, read to the end);
- with a second provider failing 30% of requests (HTTP 500) and a fallback to the healthy
  one configured (aicloud: `options["fallbacks"]`, the flaky provider with no retries of
  its own; LiteLLM: `fallbacks` in its router settings, `num_retries: 0`), the share of
  requests the client sees fail.

Latency at one request is taken with httpx (chunk by chunk); requests/s and the failure
share with keep-alive HTTP/1.1 on bare sockets (gateway.py's reader), since httpx as the
client topped out near 40 req/s here whatever the server. Every target gets the same
clients.

    python bench/upstream.py --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway import LITELLM, LITELLM_ENV, QUIET, free_port, read_body, server, wait_ready

ROOT = Path(__file__).resolve().parent.parent
MESSAGES = [{"role": "user", "content": "Say hello in one short sentence, please."}]
CONCURRENCY = 32
CORE = "0-1"  # everything shares the machine's two cores; ratios are what we report


@dataclass
class Sample:
    totals: list[float] = field(default_factory=list)  # whole answers, seconds
    gaps: list[float] = field(default_factory=list)  # between chunks after the first
    errors: int = 0
    wall: float = 0.0

    def pct(self, values: list[float], q: int) -> float:
        if len(values) < 2:
            return float("nan")
        return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1e3

    @property
    def rps(self) -> float:
        return len(self.totals) / self.wall if self.wall else 0.0


@dataclass
class Target:
    name: str
    url: str
    key: str
    model: str
    flaky_model: str | None = None
    failure: str | None = None
    results: dict[str, Sample] = field(default_factory=dict)


async def one(client: httpx.AsyncClient, target: Target, model: str, sample: Sample) -> None:
    body = {"model": model, "messages": MESSAGES, "max_tokens": 32, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    stamps: list[float] = []
    ok = False
    try:
        async with client.stream("POST", f"{target.url}/chat/completions", json=body,
                                 headers={"Authorization": f"Bearer {target.key}"}) as resp:
            if resp.status_code == 200:
                async for line in resp.aiter_lines():
                    if line.startswith("data: "):
                        if line == "data: [DONE]":
                            ok = True
                        elif '"error"' in line:
                            break
                        else:
                            stamps.append(time.perf_counter())
    except httpx.HTTPError:
        ok = False
    if not ok:
        sample.errors += 1
        return
    sample.totals.append(time.perf_counter() - start)
    sample.gaps.extend(b - a for a, b in itertools.pairwise(stamps))


async def load(target: Target, model: str, concurrency: int, seconds: float) -> Sample:
    sample = Sample()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        until = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < until:
                await one(client, target, model, sample)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        sample.wall = time.perf_counter() - start
    return sample


def request_bytes(target: Target, model: str) -> tuple[int, bytes]:
    port = int(target.url.rsplit(":", 1)[1].split("/", 1)[0])
    body = json.dumps({"model": model, "messages": MESSAGES, "max_tokens": 32,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    head = [b"POST /v1/chat/completions HTTP/1.1", f"host: 127.0.0.1:{port}".encode(),
            b"content-type: application/json", f"content-length: {len(body)}".encode(),
            f"authorization: Bearer {target.key}".encode()]
    return port, b"\r\n".join(head) + b"\r\n\r\n" + body


async def raw_connection(port: int, request: bytes, until: float, sample: Sample) -> None:
    """Keep-alive HTTP/1.1 on a bare socket: httpx as the client topped out near 40 req/s
    on this machine whatever the server, so the throughput phases use this instead."""
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    while time.perf_counter() < until:
        if writer is None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert reader is not None
        start = time.perf_counter()
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            headers = dict(line.lower().split(b": ", 1) for line in lines[1:] if b": " in line)
            body = await read_body(reader, headers)
            ok = (lines[0].split(b" ")[1] == b"200" and body.rstrip().endswith(b"[DONE]")
                  and b'"error"' not in body)
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            ok = False
            writer.close()
            writer = None
        if ok:
            sample.totals.append(time.perf_counter() - start)
        else:
            sample.errors += 1
    if writer is not None:
        writer.close()


async def raw_load(target: Target, model: str, concurrency: int, seconds: float) -> Sample:
    sample = Sample()
    port, request = request_bytes(target, model)
    start = time.perf_counter()
    await asyncio.gather(*(raw_connection(port, request, start + seconds, sample)
                           for _ in range(concurrency)))
    sample.wall = time.perf_counter() - start
    return sample


def measure(target: Target, args: argparse.Namespace) -> None:
    asyncio.run(raw_load(target, target.model, 4, args.warmup))
    target.results["c1"] = asyncio.run(load(target, target.model, 1, args.seconds))
    target.results["c32"] = asyncio.run(raw_load(target, target.model, CONCURRENCY,
                                                 args.seconds))
    if target.flaky_model:
        target.results["flaky"] = asyncio.run(raw_load(target, target.flaky_model, 8,
                                                       args.seconds))
    c1, c32 = target.results["c1"], target.results["c32"]
    print(f"  {target.name}: p50 {c1.pct(c1.totals, 50):.2f} ms, {c32.rps:.0f} req/s at "
          f"c={CONCURRENCY}", flush=True)


# -- targets ----------------------------------------------------------------------------------

def fake_provider(stack: ExitStack, tmp: Path, fail_rate: float = 0.0) -> int:
    port = free_port()
    log = tmp / f"fake-{port}.log"
    proc = stack.enter_context(server(
        [sys.executable, str(ROOT / "bench" / "fake_provider.py"), "--port", str(port),
         "--no-record", "--fail-rate", str(fail_rate)], {}, log, CORE))
    wait_ready(f"http://127.0.0.1:{port}/v1/models", proc, log)
    return port


def aicloud_cli(env: dict[str, str], *args: str, stdin: str = "") -> str:
    return subprocess.run([sys.executable, "-m", "aicloud", *args], env={**os.environ, **env},
                          input=stdin, capture_output=True, text=True, check=True,
                          timeout=120).stdout


def register(home: Path, env: dict[str, str], healthy: int, flaky: int) -> None:
    """Two providers and their models in a fresh home; models go straight into the catalog
    (the `aicloud models` CLI is the pool's)."""
    from aicloud.models.catalog import Catalog, CatalogEntry, EngineKind
    from aicloud.store import db, migrate

    for name, port, retries in (("healthy", healthy, "2"), ("flaky", flaky, "0")):
        aicloud_cli(env, "providers", "add", name, "--base-url",
                    f"http://127.0.0.1:{port}/v1", "--api-key-stdin", "--retries", retries,
                    stdin="sk-bench-provider\n")
    url = f"sqlite:///{home / 'aicloud.db'}"
    migrate.upgrade(url)

    async def add() -> None:
        engine = db.create_engine_async(url)
        try:
            catalog = Catalog(db.session_factory(engine))
            await catalog.add(CatalogEntry("partner", EngineKind.UPSTREAM, provider="healthy",
                                           upstream_model="fake"))
            await catalog.add(CatalogEntry("partner-flaky", EngineKind.UPSTREAM,
                                           provider="flaky", upstream_model="fake",
                                           options={"fallbacks": ["partner"]}))
        finally:
            await engine.dispose()

    asyncio.run(add())
    for model in ("partner", "partner-flaky"):
        aicloud_cli(env, "prices", "set", model, "--input", "0.5", "--output", "1.5")


@contextmanager
def aicloud(tmp: Path, healthy: int, flaky: int) -> Iterator[Target]:
    home = tmp / "aicloud"
    env = {"AICLOUD_HOME": str(home), "AICLOUD_LOG_LEVEL": "warning"}
    register(home, env, healthy, flaky)
    key = aicloud_cli(env, "keys", "create", "--project", "bench").strip().splitlines()[-1]
    port = free_port()
    log = tmp / "aicloud.log"
    with server([sys.executable, "-m", "aicloud", "serve", "--port", str(port)], env, log,
                CORE) as proc:
        wait_ready(f"http://127.0.0.1:{port}/healthz", proc, log, 300)
        yield Target("aicloud", f"http://127.0.0.1:{port}/v1", key, "partner", "partner-flaky")


LITELLM_CONFIG = """\
model_list:
  - model_name: partner
    litellm_params:
      model: openai/fake
      api_base: http://127.0.0.1:{healthy}/v1
      api_key: sk-bench-provider
  - model_name: partner-flaky
    litellm_params:
      model: openai/fake
      api_base: http://127.0.0.1:{flaky}/v1
      api_key: sk-bench-provider
router_settings:
  num_retries: 0
  fallbacks: [{{"partner-flaky": ["partner"]}}]
litellm_settings:
  num_retries: 0
general_settings:
  master_key: {master}
"""


@contextmanager
def litellm(tmp: Path, healthy: int, flaky: int) -> Iterator[Target]:
    master = "sk-bench-" + secrets.token_hex(8)
    if not LITELLM.exists():
        yield Target("LiteLLM proxy", "", master, "partner",
                     failure="not installed: run bench/setup-litellm.sh")
        return
    config, quiet = tmp / "litellm.yaml", tmp / "litellm-logging.json"
    config.write_text(LITELLM_CONFIG.format(healthy=healthy, flaky=flaky, master=master))
    quiet.write_text(json.dumps(QUIET))
    port = free_port()
    log = tmp / "litellm.log"
    command = [str(LITELLM), "--config", str(config), "--host", "127.0.0.1", "--port",
               str(port), "--num_workers", "1", "--log_config", str(quiet)]
    with server(command, LITELLM_ENV, log, CORE) as proc:
        try:
            wait_ready(f"http://127.0.0.1:{port}/health/liveliness", proc, log, 600)
        except RuntimeError as exc:
            yield Target("LiteLLM proxy", "", master, "partner", failure=str(exc)[-300:])
            return
        yield Target("LiteLLM proxy", f"http://127.0.0.1:{port}/v1", master, "partner",
                     "partner-flaky")


# -- report -----------------------------------------------------------------------------------

def report(targets: list[Target]) -> None:
    direct = targets[0].results
    base_p50 = direct["c1"].pct(direct["c1"].totals, 50)
    base_p99 = direct["c1"].pct(direct["c1"].totals, 99)
    base_gap = direct["c1"].pct(direct["c1"].gaps, 50)
    litellm_rps = next((t.results["c32"].rps for t in targets
                        if t.name.startswith("LiteLLM") and "c32" in t.results), None)
    print("\n| target | p50 / p99 per request (ms) | added p50 / p99 (ms) | added per chunk, "
          f"p50 (ms) | req/s at c={CONCURRENCY} | vs LiteLLM | client-visible errors, 30% "
          "provider failures + fallback |")
    print("|---|---|---|---|---|---|---|")
    for t in targets:
        if t.failure:
            print(f"| {t.name} | fails: {t.failure} | | | | | |")
            continue
        c1, c32 = t.results["c1"], t.results["c32"]
        p50, p99 = c1.pct(c1.totals, 50), c1.pct(c1.totals, 99)
        gap = c1.pct(c1.gaps, 50)
        added = "—" if t is targets[0] else f"{p50 - base_p50:.2f} / {p99 - base_p99:.2f}"
        per_chunk = "—" if t is targets[0] else f"{gap - base_gap:.3f}"
        ratio = f"{c32.rps / litellm_rps:.1f}x" if litellm_rps else "—"
        flaky = t.results.get("flaky")
        errors = (f"{flaky.errors} / {flaky.errors + len(flaky.totals)} "
                  f"({100 * flaky.errors / max(1, flaky.errors + len(flaky.totals)):.1f}%)"
                  if flaky else "—")
        print(f"| {t.name} | {p50:.2f} / {p99:.2f} | {added} | {per_chunk} | {c32.rps:.0f} | "
              f"{ratio} | {errors} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--skip-litellm", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="aicloud-upstream-bench-") as name, \
            ExitStack() as stack:
        tmp = Path(name)
        healthy = fake_provider(stack, tmp)
        flaky = fake_provider(stack, tmp, fail_rate=0.3)
        targets = [Target("provider, direct", f"http://127.0.0.1:{healthy}/v1", "x", "fake")]
        measure(targets[0], args)
        flaky_direct = Target("flaky provider, direct (no fallback)",
                              f"http://127.0.0.1:{flaky}/v1", "x", "fake", "fake")
        flaky_direct.results["flaky"] = asyncio.run(raw_load(flaky_direct, "fake", 8,
                                                             args.seconds))
        print(f"  flaky provider alone: {flaky_direct.results['flaky'].errors} errors",
              flush=True)
        with aicloud(tmp, healthy, flaky) as target:
            measure(target, args)
            targets.append(target)
        if not args.skip_litellm:
            with litellm(tmp, healthy, flaky) as target:
                if not target.failure:
                    measure(target, args)
                targets.append(target)
        report(targets)
        flaky = flaky_direct.results["flaky"]
        print(f"\nthe flaky provider called directly: {flaky.errors} of "
              f"{flaky.errors + len(flaky.totals)} requests failed")


if __name__ == "__main__":
    main()
