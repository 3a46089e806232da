"""Embeddings benchmark: aicloud against llama-cpp-python's server, one run.

Each server is started here, sent `/v1/embeddings` requests of `--batch` inputs each from
`--clients` clients back to back, and stopped; the score is input vectors per second.
Both pool the same way: llama-cpp-python's server has no pooling option and the bundled
SmolLM2 declares none (its server would return one vector per token), so it is started
with `Llama(pooling_type=MEAN)` patched in, which is what aicloud uses for such models.
Both normalise. The peer comes from bench/setup-peers.sh.

    python bench/embeddings.py --batch 1 32 --clients 4 --requests 64
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from serving import (
    VENVS,
    bundled_gguf,
    free_port,
    stop_group,
    tree_peak_rss_mb,
    wait_ready,
)

WORDS = ["the", "sea", "light", "harbour", "storm", "keeper", "ship", "night", "wind",
         "rock", "lamp", "wave", "tide", "cold", "bright", "long", "boat", "rope", "stair"]
# llama-cpp-python's server as shipped, with mean pooling for a model that declares none
PEER = ("import runpy, sys, llama_cpp\n"
        "base = llama_cpp.Llama.__init__\n"
        "def init(self, *a, **k):\n"
        "    k.setdefault('pooling_type', llama_cpp.LLAMA_POOLING_TYPE_MEAN)\n"
        "    base(self, *a, **k)\n"
        "llama_cpp.Llama.__init__ = init\n"
        "sys.argv[0] = 'llama_cpp.server'\n"
        "runpy.run_module('llama_cpp.server', run_name='__main__')\n")


@dataclass
class Level:
    batch: int
    vectors: int = 0
    wall: float = 0.0
    errors: int = 0

    @property
    def per_second(self) -> float:
        return self.vectors / self.wall if self.wall else 0.0


@dataclass
class Result:
    name: str
    levels: list[Level] = field(default_factory=list)
    peak_mb: float | None = None
    failure: str | None = None


def texts(n: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) + "." for _ in range(n)]


def command(key: str, port: int) -> tuple[list[str], str]:
    if key == "aicloud":
        return [sys.executable, "-m", "aicloud", "serve", "--port", str(port)], \
            "smollm2-135m-instruct"
    threads = str(len(os.sched_getaffinity(0)))
    return [str(VENVS / "llamacpp/bin/python"), "-c", PEER, "--model", str(bundled_gguf()),
            "--port", str(port), "--embedding", "true", "--n_ctx", "2048",
            "--n_batch", "2048", "--model_alias", "smollm2", "--n_threads", threads,
            "--n_threads_batch", threads], "smollm2"


async def drive(base: str, model: str, headers: dict[str, str], batch: int, clients: int,
                requests: int, words: int) -> Level:
    level = Level(batch)
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=600) as http:
        async def client(index: int) -> None:
            for r in range(max(1, requests // clients)):
                body = {"model": model, "input": texts(batch, words, index * 10_000 + r),
                        "encoding_format": "float"}
                resp = await http.post("/v1/embeddings", json=body)
                data = resp.json().get("data", []) if resp.status_code == 200 else []
                if len(data) != batch or not isinstance(data[0]["embedding"][0], float):
                    level.errors += 1
                    continue
                level.vectors += batch

        await client(-1)  # warm-up, not counted
        level.vectors = level.errors = 0
        start = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        level.wall = time.perf_counter() - start
    return level


def run_peer(key: str, args: argparse.Namespace) -> Result:
    port = free_port()
    cmd, model = command(key, port)
    result = Result("aicloud" if key == "aicloud" else "llama-cpp-python server")
    if not Path(cmd[0]).exists():
        result.failure = f"not installed ({cmd[0]}); run bench/setup-peers.sh"
        return result
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "AICLOUD_HOME": tmp,
               "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src")}
        headers = {"Authorization": "Bearer none"}
        if key == "aicloud":
            out = subprocess.run([sys.executable, "-m", "aicloud", "keys", "create",
                                  "--project", "bench"], env=env, capture_output=True,
                                 text=True, check=True)
            headers["Authorization"] = f"Bearer {out.stdout.strip().splitlines()[-1]}"
        log = Path(tmp) / "server.log"
        with log.open("wb") as sink:
            proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            base = f"http://127.0.0.1:{port}"
            try:
                wait_ready(base, proc, 600, headers)
                for batch in args.batch:
                    level = asyncio.run(drive(base, model, headers, batch, args.clients,
                                              args.requests, args.words))
                    result.levels.append(level)
                    print(f"  {result.name} batch={batch}: {level.per_second:.1f} vectors/s, "
                          f"errors={level.errors}", flush=True)
            except RuntimeError as exc:
                result.failure = f"{exc}: {log.read_text()[-300:]}"
            finally:
                result.peak_mb = tree_peak_rss_mb(proc.pid)
                stop_group(proc)
    return result


def table(results: list[Result], clients: int) -> str:
    rows = [f"| server | inputs per request | vectors/s ({clients} clients) | errors "
            "| peak RSS (MB) |", "|---" * 5 + "|"]
    for r in results:
        peak = f"{r.peak_mb:.0f}" if r.peak_mb else "—"
        if r.failure and not r.levels:
            rows.append(f"| {r.name} | — | fails: {r.failure[:80]} | | {peak} |")
        for lv in r.levels:
            rows.append(f"| {r.name} | {lv.batch} | {lv.per_second:.1f} | {lv.errors} "
                        f"| {peak} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--peers", nargs="+", default=["aicloud", "llamacpp"],
                        choices=["aicloud", "llamacpp"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 32],
                        help="inputs per request")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=64,
                        help="requests per batch size, over all clients")
    parser.add_argument("--words", type=int, default=24, help="words per input")
    args = parser.parse_args()
    results = []
    for key in args.peers:
        print(f"== {key}", flush=True)
        results.append(run_peer(key, args))
    print(table(results, args.clients))
    by_name = {r.name: {lv.batch: lv.per_second for lv in r.levels} for r in results}
    ours, theirs = by_name.get("aicloud", {}), by_name.get("llama-cpp-python server", {})
    for batch in args.batch:
        if ours.get(batch) and theirs.get(batch):
            print(f"batch {batch}: aicloud / llama-cpp-python = "
                  f"{ours[batch] / theirs[batch]:.2f}x")


if __name__ == "__main__":
    main()
