"""Scale-out benchmark: the bundled model in-process and as 1, 2, 3 Ray replicas.

A Ray cluster of this machine is started here (one node, --ray-cpus logical CPUs); each
configuration is an aicloud server driven with the same streaming load as
bench/serving.py. Reported: output tok/s at each concurrency, and at concurrency 1 the
time to first token and inter-token latency, whose difference from in-process is what the
Ray path costs per request and per token.

    python bench/scaling.py --replicas 1 2 3 --concurrency 1 32   # also writes docs/scaling.png
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from serving import ROOT, Level, drive, free_port, pct, stop_group, wait_ready

MODEL = "smollm2-135m-instruct"


@dataclass
class Config:
    name: str
    args: list[str]
    levels: list[Level] = field(default_factory=list)
    startup: float | None = None
    failure: str | None = None


def configs(replicas: list[int], address: str, cores: int) -> list[Config]:
    out = [Config("in-process", [])]
    for n in replicas:
        threads = max(1, cores // n)
        out.append(Config(f"Ray, {n} replica{'s' if n > 1 else ''} x {threads} thread(s)",
                          ["--ray", address, "--replicas", str(n), "--threads", str(threads),
                           "--replica-cpus", "1"]))
    return out


def run(config: Config, args: argparse.Namespace) -> None:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "AICLOUD_HOME": tmp, "PYTHONPATH": str(ROOT / "src")}
        key = subprocess.run([sys.executable, "-m", "aicloud", "keys", "create", "--project",
                              "bench"], env=env, capture_output=True, text=True, check=True)
        os.environ["BENCH_KEY"] = key.stdout.strip().splitlines()[-1]
        log = open(Path(tmp) / "server.log", "wb")  # noqa: SIM115 - lives with the server
        command = [sys.executable, "-m", "aicloud", "serve", "--port", str(port),
                   "--sequences", str(args.sequences), *config.args]
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            headers = {"Authorization": f"Bearer {os.environ['BENCH_KEY']}"}
            config.startup = wait_ready(base, proc, 300, headers)
            for c in args.concurrency:
                per_client = max(1, args.requests // c)
                level = asyncio.run(drive(base, MODEL, c, per_client, args.tokens))
                config.levels.append(level)
                print(f"  {config.name} c={c}: {level.tok_s:.1f} tok/s, "
                      f"errors={level.errors}", flush=True)
        except RuntimeError as exc:
            config.failure = f"{exc}: {(Path(tmp) / 'server.log').read_text()[-300:]}"
        finally:
            stop_group(proc)


def table(results: list[Config], concurrency: list[int]) -> str:
    base = results[0].levels[0] if results[0].levels else None
    head = " | ".join(f"tok/s c={c}" for c in concurrency)
    rows = [f"| configuration | {head} | c=1 TTFT p50 (ms) | c=1 ITL p50 (ms) | "
            "c=1 overhead vs in-process: TTFT / ITL (ms) | errors | start (s) |",
            "|---" * (len(concurrency) + 6) + "|"]
    for r in results:
        if r.failure or not r.levels:
            rows.append(f"| {r.name} | fails: {(r.failure or '')[:80]} |")
            continue
        one = r.levels[0]
        ttft, itl = pct(one.ttft, 50) * 1e3, pct(one.itl, 50) * 1e3
        extra = "—" if base is None or r is results[0] else (
            f"{ttft - pct(base.ttft, 50) * 1e3:+.1f} / {itl - pct(base.itl, 50) * 1e3:+.2f}")
        speeds = " | ".join(f"{lv.tok_s:.1f}" for lv in r.levels)
        errors = sum(lv.errors for lv in r.levels)
        rows.append(f"| {r.name} | {speeds} | {ttft:.0f} | {itl:.1f} | {extra} | {errors} | "
                    f"{r.startup:.1f} |")
    return "\n".join(rows)


def plot(results: list[Config], concurrency: list[int], path: Path) -> None:
    """Output tok/s against concurrency, one line per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for r in results:
        if r.levels:
            ax.plot(concurrency[: len(r.levels)], [lv.tok_s for lv in r.levels], marker="o",
                    label=r.name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(concurrency, [str(c) for c in concurrency])
    ax.set_xlabel("concurrent streaming clients")
    ax.set_ylabel("output tok/s")
    ax.set_title("aicloud in-process vs Ray replicas (one 2-core node)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--replicas", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--sequences", type=int, default=16, help="per replica")
    parser.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of the cluster")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "scaling.png")
    args = parser.parse_args()
    if args.concurrency[0] != 1:
        parser.error("the first concurrency must be 1 (the overhead is measured there)")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": args.ray_cpus, "include_dashboard": False})
    try:
        results = configs(args.replicas, cluster.address, os.cpu_count() or 1)
        for config in results:
            print(f"== {config.name}", flush=True)
            run(config, args)
    finally:
        cluster.shutdown()
    print(table(results, args.concurrency))
    if args.plot:
        plot(results, args.concurrency, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
