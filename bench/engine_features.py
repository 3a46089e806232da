"""Engine-only timings of structured outputs and embeddings: `LlamaCppEngine` driven
directly (no HTTP, no server), so a change inside the engine can be compared with less
noise than bench/structured.py and bench/embeddings.py give on a shared machine.

Run it alternately on two source trees (the code before and after a change) to get an A/B:

    PYTHONPATH=/tmp/before/src python bench/engine_features.py structured --rounds 3
    PYTHONPATH=src python bench/engine_features.py structured --rounds 3
    PYTHONPATH=src python bench/engine_features.py embeddings --batch 1 32

`structured`: json_schema-constrained chat (bench/structured.py's schema and prompt)
against free chat, alternating within each round, tok/s at each concurrency; `--timers`
also reports what each constrained step waited for its masks between `llama_decode` and
sampling, and the decode's own time.
`embeddings`: vectors/s of bench/embeddings.py's 24-word inputs, in requests of `--batch`
inputs, one request at a time, and the process's CPU time per vector (less disturbed by
neighbours than wall time); `--weights q4_0` serves the re-typed copy aicloud serves by
default on AVX2 (made once under ~/.aicloud/weights).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from aicloud.engines.base import ChatMessage, EmbeddingRequest, GenerationRequest, SamplingParams
from aicloud.engines.llamacpp.engine import LlamaCppEngine
from aicloud.engines.llamacpp.model import ContextConfig
from aicloud.engines.llamacpp.weights import NATIVE
from aicloud.models.catalog import bundled_model
from aicloud.structured import compile_constraint
from embeddings import texts
from structured import PROMPT, SCHEMA


async def started(sequences: int, weights: str = NATIVE) -> LlamaCppEngine:
    spec = bundled_model()
    engine = LlamaCppEngine(spec.model_id, spec.path,
                            ContextConfig(sequences=sequences, context_per_sequence=2048),
                            weights=weights)
    await engine.start()
    return engine


class StepTimers:
    """Wall time of each `Guidance.mask` call (what a step waits for between its decode and
    sampling) and of each `llama_decode`, by wrapping the engine's own methods."""

    def __init__(self, engine: LlamaCppEngine) -> None:
        self.masks: list[float] = []
        self.decodes: list[float] = []
        batcher = engine.batcher
        mask, decode = batcher.guidance.mask, batcher._llama_decode

        def timed_mask(ctx: Any, rows: list[Any]) -> None:
            start = time.perf_counter()
            mask(ctx, rows)
            if rows:
                self.masks.append(time.perf_counter() - start)

        def timed_decode(measured: bool) -> int:
            start = time.perf_counter()
            status = decode(measured)
            self.decodes.append(time.perf_counter() - start)
            return status

        batcher.guidance.mask = timed_mask  # type: ignore[method-assign]
        batcher._llama_decode = timed_decode  # type: ignore[method-assign]

    def report(self) -> str:
        def ms(xs: list[float]) -> str:
            if not xs:
                return "-"
            return f"{statistics.median(xs) * 1e3:.2f} / {statistics.mean(xs) * 1e3:.2f} ms"
        text = f"mask wait {ms(self.masks)}, llama_decode {ms(self.decodes)} (median / mean)"
        self.masks.clear()
        self.decodes.clear()
        return text


async def structured(args: argparse.Namespace) -> None:
    engine = await started(max(args.concurrency))
    timers = StepTimers(engine) if args.timers else None
    prompt = await engine.encode_chat([ChatMessage("user", PROMPT)])
    constraint = compile_constraint("json_schema", SCHEMA)

    async def one(i: int, constrained: bool) -> int:
        request = GenerationRequest(str(i), prompt, SamplingParams(temperature=0.8, seed=i),
                                    args.tokens,
                                    constraint=constraint if constrained else None)
        last = 0
        async for event in await engine.generate(request):
            last = event.completion_tokens
        return last

    async def rate(c: int, constrained: bool) -> float:
        start = time.perf_counter()
        produced = sum(await asyncio.gather(*(one(i, constrained) for i in range(c))))
        return produced / (time.perf_counter() - start)

    await one(0, True)  # warm up: builds llguidance's tokenizer
    await one(0, False)
    print("| c | json_schema tok/s | free tok/s | ratio |\n|---|---|---|---|")
    for c in args.concurrency:
        pairs = []
        for _ in range(args.rounds):
            if timers is not None:
                timers.report()  # drop what earlier levels left
            constrained = await rate(c, True)
            if timers is not None:
                print(f"  c={c} json_schema: {constrained:.1f} tok/s, {timers.report()}",
                      flush=True)
            pairs.append((constrained, await rate(c, False)))
        ratios = [a / b for a, b in pairs]
        print(f"| {c} | {' '.join(f'{a:.1f}' for a, _ in pairs)} | "
              f"{' '.join(f'{b:.1f}' for _, b in pairs)} | "
              f"{' '.join(f'{r:.2f}' for r in ratios)} (median "
              f"{statistics.median(ratios):.2f}) |", flush=True)
    await engine.close()


async def embeddings(args: argparse.Namespace) -> None:
    engine = await started(1, args.weights)
    print("| inputs per request | vectors/s per round | ms per vector (best) "
          "| process CPU ms per vector (best) |\n|---|---|---|---|")
    for batch in args.batch:
        rates, cpu = [], []
        for r in range(args.rounds):
            inputs = [await engine.encode_text(t)
                      for t in texts(max(batch, args.vectors), args.words, seed=r)]
            await engine.embed(EmbeddingRequest("warm", inputs[:batch]))
            start, cpu_start = time.perf_counter(), time.process_time()
            for k in range(0, len(inputs), batch):
                await engine.embed(EmbeddingRequest(str(k), inputs[k : k + batch]))
            rates.append(len(inputs) / (time.perf_counter() - start))
            cpu.append(1000 * (time.process_time() - cpu_start) / len(inputs))
        print(f"| {batch} | {' '.join(f'{v:.1f}' for v in rates)} | "
              f"{1000 / max(rates):.1f} | {min(cpu):.1f} |", flush=True)
    await engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="what", required=True)
    s = sub.add_parser("structured")
    s.add_argument("--concurrency", nargs="+", type=int, default=[1])
    s.add_argument("--tokens", type=int, default=128)
    s.add_argument("--rounds", type=int, default=3)
    s.add_argument("--timers", action="store_true",
                   help="also time each step's mask wait and llama_decode (constrained runs)")
    e = sub.add_parser("embeddings")
    e.add_argument("--batch", nargs="+", type=int, default=[1, 32])
    e.add_argument("--vectors", type=int, default=64, help="inputs per round")
    e.add_argument("--words", type=int, default=24)
    e.add_argument("--rounds", type=int, default=2)
    e.add_argument("--weights", default=NATIVE,
                   help="the weight format served (native, q4_0, auto: weights.py)")
    args = parser.parse_args()
    asyncio.run(structured(args) if args.what == "structured" else embeddings(args))


if __name__ == "__main__":
    main()
