"""Structured-output benchmark: json_schema-constrained chat against free chat on aicloud,
and against llama-cpp-python's server with the same schema, in one run.

Goals (issue 12): constrained within 10 % of free on aicloud at every concurrency; at least
2x llama-cpp-python's server (a GBNF grammar sampler, one request at a time) at c=1. Each
request asks for a list that the schema keeps open (at least 100 items), so constrained
answers run to `--tokens` like the free ones mostly do (answers of different lengths would
make the comparison one of tails); tok/s is completion tokens (from `usage`) over wall time, every
client sending requests back to back. llama-cpp-python takes the schema as
`{"type": "json_object", "schema": ...}`, its spelling of the same format.

    python bench/structured.py --peers aicloud llamacpp --concurrency 1 8 32
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from serving import ROOT, VENVS, bundled_gguf, free_port, stop_group, wait_ready

PROMPT = "List the items a lighthouse keeper needs for a winter, with quantities and notes."
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"items": {"type": "array", "items": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 40},
                       "quantity": {"type": "integer", "minimum": 1, "maximum": 1000},
                       "note": {"type": "string", "maxLength": 80}},
        "required": ["name", "quantity", "note"], "additionalProperties": False},
        "minItems": 100}},
    "required": ["items"], "additionalProperties": False,
}
OPENAI_FORMAT = {"type": "json_schema",
                 "json_schema": {"name": "supplies", "schema": SCHEMA, "strict": True}}
LLAMACPP_FORMAT = {"type": "json_object", "schema": SCHEMA}


@dataclass
class Level:
    label: str
    concurrency: int
    tokens: int = 0
    requests: int = 0
    errors: int = 0
    wall: float = 0.0
    latencies: list[float] = field(default_factory=list)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall if self.wall else 0.0


async def one(client: httpx.AsyncClient, body: dict[str, Any], level: Level) -> None:
    start = time.perf_counter()
    try:
        resp = await client.post("/v1/chat/completions", json=body)
    except httpx.HTTPError:
        level.errors += 1
        return
    if resp.status_code != 200:
        level.errors += 1
        if level.errors == 1:
            print(f"    {level.label}: {resp.status_code} {resp.text[:200]}", flush=True)
        return
    level.requests += 1
    level.tokens += resp.json()["usage"]["completion_tokens"]
    level.latencies.append(time.perf_counter() - start)


async def drive(base: str, key: str, body: dict[str, Any], level: Level, per_client: int
                ) -> Level:
    limits = httpx.Limits(max_connections=level.concurrency + 4)
    async with httpx.AsyncClient(base_url=base, timeout=900, limits=limits,
                                 headers={"Authorization": f"Bearer {key}"}) as client:
        async def loop() -> None:
            for _ in range(per_client):
                await one(client, body, level)

        start = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(level.concurrency)))
        level.wall = time.perf_counter() - start
    return level


def body(model: str, tokens: int, fmt: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": PROMPT}],
                           "max_tokens": tokens, "temperature": 0.8}
    if fmt is not None:
        out["response_format"] = fmt
    return out


def serve(key: str, port: int, home: Path) -> tuple[list[str], str, dict[str, str]]:
    if key == "aicloud":
        env = {"AICLOUD_HOME": str(home), "PYTHONPATH": str(ROOT / "src")}
        return ([sys.executable, "-m", "aicloud", "serve", "--port", str(port)],
                "smollm2-135m-instruct", env)
    threads = str(os.cpu_count())
    return ([str(VENVS / "llamacpp/bin/python"), "-m", "llama_cpp.server", "--model",
             str(bundled_gguf()), "--port", str(port), "--n_ctx", "4096", "--model_alias",
             "smollm2", "--n_threads", threads, "--n_threads_batch", threads], "smollm2", {})


def run_peer(key: str, args: argparse.Namespace) -> list[Level]:
    """aicloud: free and constrained alternate at each concurrency, on one server;
    llama-cpp-python: constrained only (free chat is bench/serving.py's question)."""
    port = free_port()
    levels: list[Level] = []
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        command, model, extra = serve(key, port, home)
        if not Path(command[0]).exists():
            print(f"  {key}: not installed ({command[0]}); run bench/setup-peers.sh")
            return levels
        env = {**os.environ, **extra}
        api_key = "none"
        if key == "aicloud":
            out = subprocess.run([sys.executable, "-m", "aicloud", "keys", "create",
                                  "--project", "bench"], env=env, capture_output=True,
                                 text=True, check=True)
            api_key = out.stdout.strip().splitlines()[-1]
        log = open(home / "server.log", "wb")  # noqa: SIM115 - lives as long as the server
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base, proc, 600, {"Authorization": f"Bearer {api_key}"})
            kinds = [("json_schema", OPENAI_FORMAT), ("free", None)] if key == "aicloud" else [
                ("json_schema", LLAMACPP_FORMAT)]
            # one warm-up request per kind: the first constrained request builds the
            # tokenizer (~1 s), which is a start-up cost, not a per-request one
            for _, fmt in kinds:
                asyncio.run(drive(base, api_key, body(model, 8, fmt), Level("warm", 1), 1))
            for c in args.concurrency:
                per_client = max(1, args.requests // c)
                for label, fmt in kinds:
                    level = asyncio.run(drive(base, api_key, body(model, args.tokens, fmt),
                                              Level(f"{key} {label}", c), per_client))
                    levels.append(level)
                    print(f"  {level.label} c={c}: {level.tok_s:.1f} tok/s "
                          f"({level.tokens} tokens, {level.requests} ok, "
                          f"{level.errors} errors)", flush=True)
        except RuntimeError as exc:
            print(f"  {key} failed: {exc}: {(home / 'server.log').read_text()[-300:]}")
        finally:
            stop_group(proc)
    return levels


def table(levels: list[Level]) -> str:
    rows = ["| server | format | concurrency | output tok/s | vs free | errors / requests |",
            "|---|---|---|---|---|---|"]
    free = {lv.concurrency: lv.tok_s for lv in levels if lv.label == "aicloud free"}
    for lv in levels:
        server, _, kind = lv.label.partition(" ")
        ratio = (f"{lv.tok_s / free[lv.concurrency]:.2f}" if free.get(lv.concurrency)
                 else "—")
        rows.append(f"| {server} | {kind} | {lv.concurrency} | {lv.tok_s:.1f} | {ratio} | "
                    f"{lv.errors} / {lv.errors + lv.requests} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--peers", nargs="+", default=["aicloud", "llamacpp"],
                        choices=["aicloud", "llamacpp"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--requests", type=int, default=32,
                        help="requests per level and format (at least one per client)")
    args = parser.parse_args()
    levels: list[Level] = []
    for key in args.peers:
        print(f"== {key}", flush=True)
        levels += run_peer(key, args)
    print(table(levels))


if __name__ == "__main__":
    main()
