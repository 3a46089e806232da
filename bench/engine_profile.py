"""Where the engine thread's time goes, no HTTP: closed-loop clients on the real batcher,
with each of its phases timed (decode, sampling, delivery, planning, ...) and the first
token's wait inside the engine.

    python bench/engine_profile.py --concurrency 1 8 32 --requests 64
    python bench/engine_profile.py --concurrency 32 --requests 32   # all arriving at once
    python bench/engine_profile.py --concurrency 32 --step-sequences 16 32

Compare with the raw decode of the same file (`bench/serving.py --peers raw-q4_0`): what a
step costs beyond its `llama_decode` is the engine's own work.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import time
from collections.abc import Callable
from typing import Any

from aicloud.engines.base import ChatMessage, GenerationRequest, SamplingParams
from aicloud.engines.llamacpp import batcher
from aicloud.engines.llamacpp.engine import LlamaCppEngine
from aicloud.engines.llamacpp.model import ContextConfig
from aicloud.models.catalog import bundled_model

PROMPT = "Write a long story about a lighthouse keeper."
PHASES = ["step", "_llama_decode", "_sample", "_account", "_deliver", "_plan", "_fill",
          "_admit", "_run_chore"]
seconds: collections.Counter[str] = collections.Counter()
calls: collections.Counter[str] = collections.Counter()


def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[name] += time.perf_counter() - start
            calls[name] += 1
    return run


def instrument() -> None:
    for name in PHASES:
        raw = batcher.Batcher.__dict__[name]
        if isinstance(raw, staticmethod):
            setattr(batcher.Batcher, name, staticmethod(timed(name, raw.__func__)))
        else:
            setattr(batcher.Batcher, name, timed(name, raw))


async def level(engine: LlamaCppEngine, prompt: list[int], clients: int, per_client: int,
                tokens: int, temperature: float) -> None:
    firsts: list[float] = []

    async def one(i: int) -> int:
        request = GenerationRequest(str(i), prompt, SamplingParams(temperature=temperature,
                                                                   seed=i), tokens)
        start, produced = time.perf_counter(), 0
        async for event in await engine.generate(request):
            if not produced:
                firsts.append(time.perf_counter() - start)
            produced = event.completion_tokens
        return produced

    async def client(k: int) -> int:
        return sum([await one(k * 1000 + j) for j in range(per_client)])

    seconds.clear()
    calls.clear()
    start, cpu = time.perf_counter(), time.process_time()
    produced = sum(await asyncio.gather(*(client(k) for k in range(clients))))
    wall = time.perf_counter() - start
    firsts.sort()
    print(f"c={clients}: {produced / wall:.1f} tok/s, {produced} tokens in {wall:.2f} s, "
          f"process CPU {time.process_time() - cpu:.2f} s; first token in the engine p50 "
          f"{firsts[len(firsts) // 2]:.3f} s, max {firsts[-1]:.3f} s; decode threads "
          f"{engine.batcher.threads.current}")
    for name, total in seconds.most_common():
        print(f"  {name:14s} {total * 1000:9.1f} ms  {calls[name]:6d} calls  "
              f"{total / calls[name] * 1e6:8.1f} us each  {total / produced * 1e6:7.1f} us/token")


async def main(args: argparse.Namespace) -> None:
    instrument()
    spec = bundled_model()
    for step in args.step_sequences:
        engine = LlamaCppEngine(spec.model_id, spec.path, ContextConfig(
            sequences=max(args.concurrency), context_per_sequence=2048,
            step_sequences=step or None), weights=args.weights)
        await engine.start()
        try:
            prompt = await engine.encode_chat([ChatMessage("user", PROMPT)])
            await level(engine, prompt, 1, 1, 16, args.temperature)  # warm up, cache the prompt
            print(f"== step_sequences {engine.config.step_sequences}, weights {args.weights}")
            for c in args.concurrency:
                await level(engine, prompt, c, max(1, args.requests // c), args.tokens,
                            args.temperature)
        finally:
            await engine.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--weights", default="q4_0")
    parser.add_argument("--step-sequences", nargs="+", type=int, default=[0],
                        help="sequences decoded per step (0: the engine's default)")
    asyncio.run(main(parser.parse_args()))
