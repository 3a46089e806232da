"""Where aicloud's own time goes when it relays a partner model: the setup of
bench/upstream.py (the fake provider, a provider added with the CLI, the `partner` model,
a key) served by `aicloud serve`, driven one streamed request at a time on one
keep-alive connection; then the provider alone, the same way. Prints the median request
time of both (the difference is what aicloud adds), then drives the server again under
cProfile (switched on by SIGUSR1 after the start and the warm-up, so neither is in it; off
and written by SIGUSR2) and prints the functions of its event-loop thread that cost the
most, in microseconds of its CPU time per request (cProfile counts each resumption of a
coroutine as a call, so "calls" of `async def` functions are resumptions). Before that,
without the profiler, the server's CPU time per request from /proc (its event-loop
thread, and the whole process): the figure that a change must lower, and one that a
crowded machine disturbs much less than latency.

    python bench/profile_relay.py --seconds 10 [--budget] [--no-profile] [--top 30]

`--budget` gives the key's project a budget, so each request also takes a budget hold.
A check of where time goes, not a benchmark to record: numbers on a loaded machine are
indicative only; bench/upstream.py is the measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import pstats
import signal
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway import free_port, server, wait_ready
from upstream import CORE, Sample, Target, aicloud_cli, fake_provider, raw_load, register

# `aicloud` with cProfile on its main (event-loop) thread between SIGUSR1 and SIGUSR2
# (signal handlers run on the main thread, which is what enabling a profiler needs),
# counting that thread's CPU time: on a crowded machine wall time would mostly measure
# waits for a core and for the GIL
PROFILED = (
    "import cProfile, signal, sys, time\n"
    "profiler = cProfile.Profile(time.thread_time)\n"
    "def stop(*_):\n"
    "    profiler.disable()\n"
    "    profiler.dump_stats({path!r})\n"
    "signal.signal(signal.SIGUSR1, lambda *_: profiler.enable())\n"
    "signal.signal(signal.SIGUSR2, stop)\n"
    "sys.argv = ['aicloud', *sys.argv[1:]]\n"
    "from aicloud.cli import app\n"
    "app()\n")


def drive(target: Target, seconds: float) -> Sample:
    asyncio.run(raw_load(target, target.model, 1, min(2.0, seconds)))  # warm up
    return asyncio.run(raw_load(target, target.model, 1, seconds))


def cpu_seconds(pid: int, thread: bool) -> float:
    """utime + stime of the process, or of its main thread, from /proc."""
    path = f"/proc/{pid}/task/{pid}/stat" if thread else f"/proc/{pid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def median_ms(sample: Sample) -> float:
    return statistics.median(sample.totals) * 1e3 if sample.totals else float("nan")


def _package(file: str) -> str:
    """`httpx`, `starlette`, `aicloud/api`... for a function's file; `~` for builtins."""
    parts = Path(file).parts
    for anchor in ("site-packages", "src"):
        if anchor in parts:
            rest = parts[parts.index(anchor) + 1:]
            return "/".join(rest[:2]) if rest[0] == "aicloud" and len(rest) > 2 else rest[0]
    return "python" if "python3" in file else file[:20]


def report(path: Path, requests: int, top: int) -> None:
    out = io.StringIO()
    stats = pstats.Stats(str(path), stream=out)
    rows = []
    for (file, line, name), (_cc, calls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append((tottime, cumtime, calls, f"{Path(file).name}:{line}({name})", file))
    total = sum(row[0] for row in rows)
    print(f"\nserver event-loop thread under cProfile, {requests} requests, "
          f"{total / requests * 1e6:.0f} us of CPU per request (with the profiler's own); "
          "us per request (self / with callees), calls per request:")
    packages: dict[str, float] = {}
    for tottime, _, _, _, file in rows:
        packages[_package(file)] = packages.get(_package(file), 0.0) + tottime
    print("\n-- own time by package: " + ", ".join(
        f"{name} {spent / requests * 1e6:.0f}" for name, spent in
        sorted(packages.items(), key=lambda kv: kv[1], reverse=True)[:12]))
    for title, ours in (("by own time", False), ("aicloud's functions by own time", True)):
        print(f"\n-- {title}")
        chosen = sorted(rows, key=lambda r: r[0], reverse=True)
        if ours:
            chosen = [r for r in chosen if "/aicloud/" in r[4]]
        for tottime, cumtime, calls, where, _ in chosen[:top]:
            print(f"{tottime / requests * 1e6:9.1f} {cumtime / requests * 1e6:9.1f} "
                  f"{calls / requests:7.2f}  {where}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--budget", action="store_true")
    parser.add_argument("--no-profile", action="store_true", help="only the medians")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="aicloud-relay-profile-") as name, \
            ExitStack() as stack:
        tmp = Path(name)
        healthy = fake_provider(stack, tmp)
        home = tmp / "aicloud"
        env = {"AICLOUD_HOME": str(home), "AICLOUD_LOG_LEVEL": "warning"}
        register(home, env, healthy, healthy)
        key = aicloud_cli(env, "keys", "create", "--project", "bench").strip().splitlines()[-1]
        if args.budget:
            (project,) = json.loads(aicloud_cli(env, "projects", "list"))["data"]
            aicloud_cli(env, "projects", "update", project["id"], "--budget-usd", "1000000")
        port = free_port()
        profile = tmp / "serve.prof"
        command = [sys.executable, "-c", PROFILED.format(path=str(profile)), "serve",
                   "--port", str(port)]
        log = tmp / "aicloud.log"
        target = Target("aicloud", f"http://127.0.0.1:{port}/v1", key, "partner")
        with server(command, env, log, CORE) as proc:
            wait_ready(f"http://127.0.0.1:{port}/healthz", proc, log, 300)
            asyncio.run(raw_load(target, target.model, 1, min(2.0, args.seconds)))
            idle = cpu_seconds(proc.pid, True), cpu_seconds(proc.pid, False)
            time.sleep(args.seconds / 2)
            before = cpu_seconds(proc.pid, True), cpu_seconds(proc.pid, False)
            started = time.perf_counter()
            relayed = asyncio.run(raw_load(target, target.model, 1, args.seconds))
            after = cpu_seconds(proc.pid, True), cpu_seconds(proc.pid, False)
            busy = time.perf_counter() - started
            count = len(relayed.totals) + relayed.errors
            # less what the server spends when no request comes (its background tasks)
            loop_us, all_us = ((b - a - (a - i) * busy / (args.seconds / 2)) / count * 1e6
                               for i, a, b in zip(idle, before, after, strict=True))
            direct = drive(Target("direct", f"http://127.0.0.1:{healthy}/v1", "x", "fake"),
                              args.seconds)
            added = median_ms(relayed) - median_ms(direct)
            print(f"median per request: provider alone {median_ms(direct):.2f} ms, through "
                  f"aicloud {median_ms(relayed):.2f} ms (added {added:.2f} ms); "
                  f"{relayed.errors} errors", flush=True)
            print(f"server CPU per request: {loop_us:.0f} us on the event-loop thread, "
                  f"{all_us:.0f} us in the whole process ({count} requests; idle CPU "
                  f"{(before[1] - idle[1]) / (args.seconds / 2) * 1e3:.0f} ms/s taken off)",
                  flush=True)
            if args.no_profile:
                return
            os.kill(proc.pid, signal.SIGUSR1)
            time.sleep(0.5)
            profiled = asyncio.run(raw_load(target, target.model, 1, args.seconds))
            os.kill(proc.pid, signal.SIGUSR2)
            deadline = time.monotonic() + 30
            while not profile.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(1.0)  # the dump finishes
        print(f"under the profiler: {median_ms(profiled):.2f} ms per request")
        report(profile, len(profiled.totals) + profiled.errors, args.top)


if __name__ == "__main__":
    main()
