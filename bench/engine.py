"""Engine-only throughput: the batcher driven directly, no HTTP, for each weight format
and each step width (running sequences decoded per `llama_decode`).

    python bench/engine.py --weights native q4_0 q8_0 bf16 --concurrency 1 32
    python bench/engine.py --weights native --concurrency 32 --step-sequences 4 8 16 32
    python bench/engine.py --weights native --unified-kv --flash-attention  # the old layout
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from aicloud.engines.base import ChatMessage, GenerationRequest, SamplingParams
from aicloud.engines.llamacpp.engine import LlamaCppEngine
from aicloud.engines.llamacpp.model import ContextConfig
from aicloud.models.catalog import bundled_model

PROMPT = "Write a long story about a lighthouse keeper."


async def measure(weights: str, step: int | None, levels: list[int], tokens: int,
                  cache: Path, layout: dict[str, bool]) -> list[float]:
    spec = bundled_model()
    engine = LlamaCppEngine(spec.model_id, spec.path,
                            ContextConfig(sequences=max(levels), context_per_sequence=2048,
                                          step_sequences=step, **layout),
                            weights=weights, weights_cache=cache)
    await engine.start()
    prompt = await engine.encode_chat([ChatMessage("user", PROMPT)])

    async def one(i: int) -> int:
        request = GenerationRequest(str(i), prompt, SamplingParams(temperature=0.8, seed=i),
                                    tokens)
        last = 0
        async for event in await engine.generate(request):
            last = event.completion_tokens
        return last

    await one(0)  # warm up
    rates = []
    for c in levels:
        start = time.perf_counter()
        produced = sum(await asyncio.gather(*(one(i) for i in range(c))))
        rates.append(produced / (time.perf_counter() - start))
    await engine.close()
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--weights", nargs="+", default=["native", "q4_0", "q8_0", "bf16"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--step-sequences", nargs="+", type=int, default=[0],
                        help="sequences decoded per step (0: the engine's default)")
    parser.add_argument("--unified-kv", action="store_true",
                        help="one KV cache shared by all sequences (default: one stream each)")
    parser.add_argument("--flash-attention", action="store_true")
    parser.add_argument("--fixed-threads", action="store_true",
                        help="every core for every decode, never re-decided (threads.py)")
    args = parser.parse_args()
    layout = {"unified_kv": args.unified_kv, "flash_attention": args.flash_attention,
              "adapt_threads": not args.fixed_threads}
    print("| weights | step | " + " | ".join(f"c={c} tok/s" for c in args.concurrency) + " |")
    print("|---" * (len(args.concurrency) + 2) + "|")
    with tempfile.TemporaryDirectory() as cache:
        for weights in args.weights:
            for step in args.step_sequences:
                rates = asyncio.run(measure(weights, step or None, args.concurrency,
                                            args.tokens, Path(cache), layout))
                print(f"| {weights} | {step or 'default'} | "
                      + " | ".join(f"{r:.0f}" for r in rates) + " |", flush=True)


if __name__ == "__main__":
    main()
