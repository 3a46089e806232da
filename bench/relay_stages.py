"""Where the wall time of one relayed request goes, stage by stage: bench/upstream.py's
setup (the fake provider, a provider added with the CLI, the `partner` model, a key),
served by `aicloud serve` with a monotonic clock read around each stage, driven one
streamed request at a time on one keep-alive connection (bench/upstream.py's raw
client); then the provider alone, the same way. Prints the client's median of both and
the server's median of each stage, in microseconds.

Stages nest (the provider gate and the httpx call are inside `open_relay`, which is
inside `relay()`, inside the ASGI call): read the table as a tree. Numbers move with
the machine's load; this says where the time is, bench/upstream.py measures it.

    python bench/relay_stages.py --seconds 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

# (owner module, attribute, its class or None, label), in the order printed
STAGES = [
    ("aicloud.accounts.keys", "KeyService", "authenticate", "auth: key lookup (a DB hop)"),
    ("aicloud.api.routes.openai", "parse_body", None, "body: JSON, NUL check, pydantic"),
    ("aicloud.api.routes.openai", "engine_for", None, "model lease (pool)"),
    ("aicloud.api.relay", "relay", None, "relay(): until the response object"),
    ("aicloud.api.relay", "open_relay", None, "  open_relay"),
    ("aicloud.api.relay", "admit", None, "    admit: RPM/TPM, price, budget hold"),
    ("aicloud.scheduling.admission", "Admitter", "generate",
     "    admission layer + upstream generate"),
    ("aicloud.engines.upstream", "UpstreamEngine", "_place", "      provider gate"),
    ("aicloud.engines.upstream", "UpstreamEngine", "_open",
     "      httpx: send, response head, first chunk"),
    ("aicloud.api.relay", "begin", None, "  begin: first event (the pump parses the stream)"),
    ("aicloud.api.generation", "Run", "record", "record: usage row + settle (a DB hop)"),
    ("aicloud.engines.upstream", "UpstreamStream", "_close",
     "upstream body drained and closed (pump task)"),
    ("aicloud.store.direct", "Direct", "run", "any DB hop (auth, record)"),
]

TIMES: dict[str, list[int]] = defaultdict(list)


def _timed(label: str, function: Callable[..., Any]) -> Callable[..., Any]:
    async def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter_ns()
        try:
            return await function(*args, **kwargs)
        finally:
            TIMES[label].append(time.perf_counter_ns() - start)

    return timed


def _instrument() -> None:
    """Wrap each stage where its callers look it up (a module attribute or a method)."""
    import importlib

    for module_name, attribute, method, label in STAGES:
        owner = importlib.import_module(module_name)
        if method is None:
            setattr(owner, attribute, _timed(label, getattr(owner, attribute)))
        else:
            cls = getattr(owner, attribute)
            setattr(cls, method, _timed(label, getattr(cls, method)))
    from aicloud.api import app as app_module
    from aicloud.api import relay

    events = relay.relay_events

    async def relay_events(*args: Any) -> AsyncIterator[bytes]:
        start, first = time.perf_counter_ns(), None
        async for data in events(*args):
            if first is None:
                first = time.perf_counter_ns()
                TIMES["body: generator start to first chunk"].append(first - start)
            yield data
        assert first is not None
        TIMES["body: first chunk to [DONE] (with the record)"].append(
            time.perf_counter_ns() - first)

    relay.relay_events = relay_events  # type: ignore[assignment]
    create_app = app_module.create_app

    def timed_app(settings: Any, pool: Any) -> Any:
        app = create_app(settings, pool)

        async def asgi(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http" or not scope["path"].endswith("/chat/completions"):
                await app(scope, receive, send)
                return
            marks = {"call": time.perf_counter_ns()}

            async def marked(message: Any) -> None:
                if message["type"] == "http.response.start":
                    marks["start"] = time.perf_counter_ns()
                await send(message)
                if message["type"] == "http.response.body" and not message.get("more_body"):
                    marks["end"] = time.perf_counter_ns()

            await app(scope, receive, marked)
            TIMES["ASGI app: call to response start"].append(marks["start"] - marks["call"])
            TIMES["ASGI app: response start to last byte"].append(marks["end"] - marks["start"])
            TIMES["ASGI app: whole"].append(marks["end"] - marks["call"])

        return asgi

    app_module.create_app = timed_app  # type: ignore[assignment]


def serve() -> None:
    """`aicloud serve` instrumented: SIGUSR1 clears the times, SIGUSR2 writes them."""
    _instrument()
    out = Path(os.environ["RELAY_STAGES_OUT"])
    signal.signal(signal.SIGUSR1, lambda *_: TIMES.clear())
    signal.signal(signal.SIGUSR2, lambda *_: out.write_text(json.dumps(TIMES)))
    sys.argv = ["aicloud", *sys.argv[2:]]
    from aicloud.cli import app

    app()


def main() -> None:
    from gateway import free_port, server, wait_ready
    from upstream import CORE, Target, aicloud_cli, fake_provider, raw_load, register

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="aicloud-relay-stages-") as name, \
            ExitStack() as stack:
        tmp = Path(name)
        healthy = fake_provider(stack, tmp)
        home = tmp / "aicloud"
        out = tmp / "stages.json"
        env = {"AICLOUD_HOME": str(home), "AICLOUD_LOG_LEVEL": "warning",
               "RELAY_STAGES_OUT": str(out)}
        register(home, env, healthy, healthy)
        key = aicloud_cli(env, "keys", "create", "--project", "bench").strip().splitlines()[-1]
        port = free_port()
        log = tmp / "aicloud.log"
        command = [sys.executable, __file__, "--serve", "serve", "--port", str(port)]
        target = Target("aicloud", f"http://127.0.0.1:{port}/v1", key, "partner")
        with server(command, env, log, CORE) as proc:
            wait_ready(f"http://127.0.0.1:{port}/healthz", proc, log, 300)
            asyncio.run(raw_load(target, target.model, 1, min(2.0, args.seconds)))
            os.kill(proc.pid, signal.SIGUSR1)
            time.sleep(0.2)
            relayed = asyncio.run(raw_load(target, target.model, 1, args.seconds))
            os.kill(proc.pid, signal.SIGUSR2)
            deadline = time.monotonic() + 10
            while not out.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(0.5)
        direct = Target("direct", f"http://127.0.0.1:{healthy}/v1", "x", "fake")
        asyncio.run(raw_load(direct, direct.model, 1, min(2.0, args.seconds)))
        alone = asyncio.run(raw_load(direct, direct.model, 1, args.seconds))
        times = json.loads(out.read_text())
    requests = len(relayed.totals)
    print(f"median per request: provider alone {statistics.median(alone.totals) * 1e3:.2f} ms,"
          f" through aicloud {statistics.median(relayed.totals) * 1e3:.2f} ms "
          f"({requests} requests, {relayed.errors} errors)\n")
    print("| stage (server side, nested) | median (us) | per request |")
    print("|---|---|---|")
    asgi = sorted(k for k in times if k.startswith("ASGI"))
    order = [*asgi, *(label for *_, label in STAGES), *sorted(
        k for k in times if k.startswith("body"))]
    for label in sorted(times, key=lambda k: order.index(k) if k in order else len(order)):
        values = times[label]
        print(f"| {label} | {statistics.median(values) / 1e3:.0f} | "
              f"{len(values) / max(1, requests):.2f} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve()
    else:
        main()
