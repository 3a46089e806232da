"""A step's decode rows reach llama.cpp so that a run of neighbouring slots is computed as
one graph: with per-sequence KV streams llama.cpp puts only consecutive sequence ids, in
batch order, into one ubatch, and each further ubatch is one more pass over every weight.

The graph computations are counted through llama.cpp's eval callback on the real engine:
the callback asks for the output node ("result_output"), reached once per ubatch."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field

import llama_cpp
import pytest
from llama_cpp import _ggml

from aicloud.engines.base import ChatMessage, GenerationRequest, SamplingParams
from aicloud.engines.llamacpp.engine import LlamaCppEngine
from aicloud.engines.llamacpp.model import ContextConfig
from tests.conftest import LoopThread
from tests.engines.checks import running_engine

_lib = _ggml.libggml
_lib.ggml_get_name.restype = llama_cpp.ctypes.c_char_p
_lib.ggml_get_name.argtypes = [llama_cpp.ctypes.c_void_p]
PROMPTS = ["Name a fruit.", "Name a colour.", "Name a country.", "Name an animal."]


@dataclass
class Decodes:
    """Each llama_decode of the engine's context: its rows' (sequence, position) and how
    many graph computations it took."""

    calls: list[tuple[list[tuple[int, int]], int]] = field(default_factory=list)
    graphs: int = 0

    def on_node(self, tensor: int | None, ask: bool, _user: int | None) -> bool:
        if tensor and _lib.ggml_get_name(tensor) == b"result_output":
            if not ask:
                self.graphs += 1
            return True
        return False


@pytest.fixture(scope="module")
def counted(loop_thread: LoopThread) -> Iterator[tuple[LlamaCppEngine, Decodes]]:
    decodes = Decodes()
    callback = llama_cpp.ggml_backend_sched_eval_callback(decodes.on_node)
    init, decode = llama_cpp.llama_init_from_model, llama_cpp.llama_decode
    contexts: list[object] = []

    def init_counting(model: object, cparams: llama_cpp.llama_context_params) -> object:
        if not cparams.embeddings:
            cparams.cb_eval = callback
        ctx = init(model, cparams)
        contexts.append(ctx)
        return ctx

    def decode_counting(ctx: object, batch: llama_cpp.llama_batch) -> int:
        if ctx is not contexts[0]:
            return decode(ctx, batch)
        before = decodes.graphs
        status = decode(ctx, batch)
        rows = [(batch.seq_id[i][0], batch.pos[i]) for i in range(batch.n_tokens)]
        decodes.calls.append((rows, decodes.graphs - before))
        return status

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(llama_cpp, "llama_init_from_model", init_counting)
        patch.setattr(llama_cpp, "llama_decode", decode_counting)
        yield from ((engine, decodes) for engine in running_engine(
            loop_thread, ContextConfig(sequences=len(PROMPTS), context_per_sequence=512,
                                       step_sequences=len(PROMPTS))))


async def answer(engine: LlamaCppEngine, prompt: str) -> str:
    tokens = await engine.encode_chat([ChatMessage("user", prompt)])
    request = GenerationRequest("t", tokens, SamplingParams(temperature=0.0), 12, ())
    return "".join([e.text async for e in await engine.generate(request)])


def test_a_step_of_neighbouring_slots_is_one_graph_computation(
        counted: tuple[LlamaCppEngine, Decodes], loop_thread: LoopThread) -> None:
    engine, decodes = counted

    async def together(prompts: list[str]) -> list[str]:
        return await asyncio.gather(*(answer(engine, p) for p in prompts))

    loop_thread.run(together(PROMPTS))  # each slot now caches one prompt
    # in reverse, each request takes the slot caching its prompt: the running order is
    # the reverse of the slots' order
    decodes.calls.clear()
    texts = loop_thread.run(together(PROMPTS[::-1]))
    assert all(texts)
    steps = [(rows, graphs) for rows, graphs in decodes.calls
             if len(rows) > 1 and len({seq for seq, _ in rows}) == len(rows)]
    assert steps, "no step decoded several sequences at once"
    for rows, graphs in steps:
        ids = sorted(seq for seq, _ in rows)
        if ids == list(range(ids[0], ids[0] + len(ids))):  # neighbouring slots
            assert graphs == 1, f"rows {rows} took {graphs} graph computations"



def test_prompts_of_one_length_in_neighbouring_slots_share_one_graph(
        counted: tuple[LlamaCppEngine, Decodes], loop_thread: LoopThread) -> None:
    """Requests that arrive together with one prompt find it cached and compute its last
    two tokens each: one call, one graph for all of them, not a graph each."""
    engine, decodes = counted
    loop_thread.run(answer(engine, PROMPTS[0]))  # cached now

    async def together() -> list[str]:
        return await asyncio.gather(*(answer(engine, PROMPTS[0]) for _ in PROMPTS))

    decodes.calls.clear()
    texts = loop_thread.run(together())
    assert len(set(texts)) == 1
    shared = [(rows, graphs) for rows, graphs in decodes.calls
              if len({seq for seq, _ in rows}) > 1 and len(rows) == 2 * len({s for s, _ in rows})]
    assert shared, f"each prompt had a call of its own: {decodes.calls[:6]}"
    assert all(graphs == 1 for _, graphs in shared)
