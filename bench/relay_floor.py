"""The floor under a relayed request: what the HTTP client alone costs per streamed chat
completion, against bench/fake_provider.py, one request at a time on one keep-alive
connection (as the relay holds its provider link). For each client: the median and p99
time of a whole answer read to its end, and this process's CPU time per request (the
provider runs in its own process), so a crowded machine disturbs the CPU column less.

- `raw socket`: HTTP/1.1 written and read by hand (gateway.py's reader), the floor of the
  floor;
- `httpx`: an `httpx.AsyncClient` used exactly as `engines/upstream.py` uses it
  (`build_request`, `send(stream=True)`, `aiter_raw`, `aclose`);
- `aiohttp`, for comparison, when installed.

If httpx alone costs more than the added-latency goal of bench/upstream.py, no change
elsewhere in aicloud's relay can meet that goal while it relays through httpx.

    python bench/relay_floor.py --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway import read_body
from upstream import MESSAGES, fake_provider

BODY = {"model": "fake", "messages": MESSAGES, "max_tokens": 32, "stream": True,
        "stream_options": {"include_usage": True}}
HEADERS = {"authorization": "Bearer sk-bench-provider", "content-type": "application/json"}

One = Callable[[], Awaitable[bool]]


async def raw_client(port: int) -> tuple[One, Callable[[], Awaitable[None]]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps(BODY).encode()
    request = b"\r\n".join([
        b"POST /v1/chat/completions HTTP/1.1", f"host: 127.0.0.1:{port}".encode(),
        *(f"{k}: {v}".encode() for k, v in HEADERS.items()),
        f"content-length: {len(body)}".encode()]) + b"\r\n\r\n" + body

    async def one() -> bool:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers = dict(line.lower().split(b": ", 1) for line in lines[1:] if b": " in line)
        return (await read_body(reader, headers)).rstrip().endswith(b"[DONE]")

    async def close() -> None:
        writer.close()

    return one, close


async def httpx_client(port: int) -> tuple[One, Callable[[], Awaitable[None]]]:
    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}/v1", trust_env=False,
                               limits=httpx.Limits(max_connections=1))
    url = httpx.URL(f"http://127.0.0.1:{port}/v1/chat/completions")
    headers = httpx.Headers(HEADERS)

    async def one() -> bool:
        request = client.build_request("POST", url, json=BODY, headers=headers)
        response = await client.send(request, stream=True)
        data = b""
        async for piece in response.aiter_raw():
            data += piece
        await response.aclose()
        return response.status_code == 200 and data.rstrip().endswith(b"[DONE]")

    return one, client.aclose


async def aiohttp_client(port: int) -> tuple[One, Callable[[], Awaitable[None]]]:
    import aiohttp

    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
    url = f"http://127.0.0.1:{port}/v1/chat/completions"

    async def one() -> bool:
        async with session.post(url, json=BODY, headers=HEADERS) as response:
            data = b""
            async for piece in response.content.iter_any():
                data += piece
            return response.status == 200 and data.rstrip().endswith(b"[DONE]")

    return one, session.close


async def measure(make: Callable[[int], Awaitable[tuple[One, Callable[[], Awaitable[None]]]]],
                  port: int, seconds: float) -> tuple[list[float], float, int]:
    one, close = await make(port)
    try:
        until = time.perf_counter() + min(1.0, seconds)
        while time.perf_counter() < until:  # warm up
            await one()
        times: list[float] = []
        errors = 0
        cpu = time.process_time()
        until = time.perf_counter() + seconds
        while time.perf_counter() < until:
            start = time.perf_counter()
            if await one():
                times.append(time.perf_counter() - start)
            else:
                errors += 1
        return times, time.process_time() - cpu, errors
    finally:
        await close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2, help="each client this many times, "
                        "alternating (A/B under the same load)")
    args = parser.parse_args()
    clients: list[tuple[str, Callable[[int], Awaitable[tuple[One, Any]]]]] = [
        ("raw socket", raw_client), ("httpx", httpx_client)]
    try:
        import aiohttp  # noqa: F401

        clients.append(("aiohttp", aiohttp_client))
    except ImportError:
        pass
    results: dict[str, list[tuple[list[float], float, int]]] = {n: [] for n, _ in clients}
    with tempfile.TemporaryDirectory(prefix="aicloud-relay-floor-") as name, \
            ExitStack() as stack:
        port = fake_provider(stack, Path(name))
        for _ in range(args.rounds):
            for label, make in clients:
                results[label].append(asyncio.run(measure(make, port, args.seconds)))
    print("| client | requests | p50 / p99 (ms) | client CPU per request (us) | errors |")
    print("|---|---|---|---|---|")
    for label, runs in results.items():
        times = [t for run in runs for t in run[0]]
        cpu = sum(run[1] for run in runs)
        errors = sum(run[2] for run in runs)
        q = statistics.quantiles(times, n=100, method="inclusive")
        print(f"| {label} | {len(times)} | {statistics.median(times) * 1e3:.2f} / "
              f"{q[98] * 1e3:.2f} | {cpu / max(1, len(times)) * 1e6:.0f} | {errors} |")


if __name__ == "__main__":
    main()
