"""Embeddings on the llama.cpp engine: a second context on the same weights, decoded on
the batcher's thread between generation steps."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import llama_cpp
import numpy as np
import pytest

from aicloud.engines.base import (
    EMBED,
    GENERATE,
    ChatMessage,
    ContextLengthExceeded,
    EmbeddingRequest,
    EngineError,
    GenerationRequest,
    SamplingParams,
)
from aicloud.engines.llamacpp.embedder import Embedder, pooling_of
from aicloud.engines.llamacpp.engine import LlamaCppEngine
from aicloud.engines.llamacpp.headless import NormTap
from aicloud.engines.llamacpp.model import ContextConfig
from tests.conftest import LoopThread
from tests.engines.checks import running_engine

SENTENCES = [f"Sentence number {i} is about {topic}." for i, topic in enumerate(
    ["the sea", "a castle", "green tea", "the moon", "old trains", "rain", "a fox", "winter"])]
TEXTS = ["The sea is calm tonight.", "Green tea and lemon.", "A fox ran over the hill.",
         "Trains were late again."]


@pytest.fixture(scope="module")
def engine(loop_thread: LoopThread) -> Iterator[LlamaCppEngine]:
    yield from running_engine(loop_thread,
                              ContextConfig(sequences=2, context_per_sequence=256, threads=1))


async def embed(engine: LlamaCppEngine, texts: list[str]) -> np.ndarray:
    inputs = [await engine.encode_text(t) for t in texts]
    result = await engine.embed(EmbeddingRequest("e", inputs))
    assert result.usage.prompt_tokens == sum(map(len, inputs))
    return np.array(result.vectors)


def test_decoder_model_without_pooling_gets_mean(engine: LlamaCppEngine) -> None:
    assert engine.model.metadata("llama.pooling_type") is None
    assert pooling_of(engine.model) == llama_cpp.LLAMA_POOLING_TYPE_MEAN
    assert engine.info().capabilities == frozenset({GENERATE, EMBED})


def test_the_embedding_context_is_made_by_the_first_embeddings_request(
        loop_thread: LoopThread) -> None:
    """A model loaded to generate does not set up a second context at load (a cold
    request's load waited ~0.1 s for it); the first embeddings request makes it, once,
    however many ask at the same time."""
    async def at_once(engine: LlamaCppEngine) -> list[np.ndarray]:
        return await asyncio.gather(*(embed(engine, [t]) for t in TEXTS))

    for engine in running_engine(loop_thread, ContextConfig(sequences=1,
                                                            context_per_sequence=128,
                                                            threads=1)):
        assert engine._embedder is None
        assert EMBED in engine.info().capabilities
        first = loop_thread.run(at_once(engine))
        made = engine._embedder
        assert made is not None
        again = loop_thread.run(embed(engine, TEXTS))
        assert engine._embedder is made
        assert np.abs(np.vstack(first) - again).max() < 1e-6


def test_vectors_are_unit_and_independent_of_the_batch(engine: LlamaCppEngine,
                                                       loop_thread: LoopThread) -> None:
    """Packed in any order (so at other offsets in the decode), an input keeps its vector
    alone; unaligned packing moved some of these by up to 9e-4."""
    alone = np.array([loop_thread.run(embed(engine, [s]))[0] for s in SENTENCES])
    assert alone.shape == (8, 576)
    assert np.allclose(np.linalg.norm(alone, axis=1), 1.0, atol=1e-6)
    for order in ([7, 0], [1, 2, 3, 4, 5, 6, 7, 0], [7, 6, 5, 4, 3, 2, 1, 0]):
        packed = loop_thread.run(embed(engine, [SENTENCES[i] for i in order]))
        assert np.abs(packed - alone[order]).max() < 1e-6, order


def test_embeddings_between_steps_leave_generation_unchanged(
        engine: LlamaCppEngine, loop_thread: LoopThread) -> None:
    """Embedding decodes run on the batcher's thread between steps, on their own context:
    a greedy generation makes the same text with embeddings flowing meanwhile, and the
    vectors equal those made with nothing else running."""
    alone = loop_thread.run(embed(engine, TEXTS))

    async def generate() -> str:
        tokens = await engine.encode_chat([ChatMessage("user", "Tell me about the sea.")])
        stream = await engine.generate(GenerationRequest(
            "g", tokens, SamplingParams(temperature=0.0), max_tokens=12))
        return "".join([e.text async for e in stream])

    async def both() -> tuple[str, list[np.ndarray]]:
        gen = asyncio.ensure_future(generate())
        vectors = []
        while not gen.done():
            vectors.append(await embed(engine, TEXTS))
        return await gen, vectors

    quiet = loop_thread.run(generate())
    busy, during = loop_thread.run(both())
    assert busy == quiet
    assert len(during) >= 2  # embeddings were served while the generation ran
    for vectors in during:
        assert np.abs(vectors - alone).max() < 1e-5


def test_bad_inputs_are_refused_before_decoding(engine: LlamaCppEngine,
                                                loop_thread: LoopThread) -> None:
    with pytest.raises(ContextLengthExceeded) as exc:
        loop_thread.run(engine.embed(EmbeddingRequest("e", [[1] * 257])))
    assert exc.value.param == "input"
    for inputs in ([], [[]], [[1, 2], [engine.model.n_vocab]], [[1]] * 2049):
        with pytest.raises(EngineError) as exc:
            loop_thread.run(engine.embed(EmbeddingRequest("e", inputs)))
        assert exc.value.param == "input"
    # the longest input the model takes still works, alone in its decode
    (vec,) = loop_thread.run(engine.embed(EmbeddingRequest("e", [[1] * 256]))).vectors
    assert abs(np.linalg.norm(vec) - 1.0) < 1e-5


def test_a_vector_does_not_depend_on_the_thread_count(engine: LlamaCppEngine,
                                                      loop_thread: LoopThread) -> None:
    """The embedder re-decides its thread count while serving (threads.py), so a vector
    must come out the same at any count."""
    embedder = loop_thread.run(engine._embedding())
    counts = (1, 2)
    try:
        at = []
        for n in counts:
            embedder.threads.current = n
            at.append(loop_thread.run(embed(engine, TEXTS)))
            assert embedder._threads_set == n
    finally:
        embedder.threads.current = 1
    assert np.abs(at[0] - at[1]).max() < 1e-6


def reference(engine: LlamaCppEngine, pooling: int, tokens: list[int]) -> np.ndarray:
    """llama.cpp's own pooled unit vector: a plain embedding context, whole graph."""
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = 256
    cparams.n_seq_max, cparams.n_threads, cparams.n_threads_batch = 1, 1, 1
    cparams.embeddings, cparams.pooling_type = True, pooling
    cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = llama_cpp.llama_init_from_model(engine.model.model, cparams)
    batch = llama_cpp.llama_batch_init(256, 0, 1)
    try:
        for pos, token in enumerate(tokens):
            batch.token[pos], batch.pos[pos], batch.n_seq_id[pos] = token, pos, 1
            batch.seq_id[pos][0], batch.logits[pos] = 0, 1
        batch.n_tokens = len(tokens)
        assert llama_cpp.llama_decode(ctx, batch) == 0
        n_embd = llama_cpp.llama_model_n_embd(engine.model.model)
        raw = np.ctypeslib.as_array(llama_cpp.llama_get_embeddings_seq(ctx, 0),
                                    shape=(n_embd,)).astype(np.float64)
        return raw / np.linalg.norm(raw)
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)


def embedder_with(engine: LlamaCppEngine, pooling: int) -> Embedder:
    """A second embedder on the engine's model, driven directly on this thread."""
    return Embedder(engine.model, pooling, 256, 1, 512, lambda chore: chore())


def test_the_output_head_is_skipped(engine: LlamaCppEngine, loop_thread: LoopThread) -> None:
    """Every decode's graph stops at the final norm, before the 49k-row output head."""
    embedder = engine._embedder
    assert embedder is not None and embedder.tap is not None and embedder.tap.stopping
    before = embedder.tap.stops
    loop_thread.run(embed(engine, TEXTS))
    assert embedder.tap.stops - before == len(TEXTS)


@pytest.mark.parametrize("pooling", [llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                                     llama_cpp.LLAMA_POOLING_TYPE_CLS,
                                     llama_cpp.LLAMA_POOLING_TYPE_LAST])
def test_headless_vectors_equal_llama_cpp_pooling(engine: LlamaCppEngine,
                                                  loop_thread: LoopThread, pooling: int) -> None:
    """Pooled here from the final norm's rows, a vector is llama.cpp's own to 1e-6."""
    embedder = embedder_with(engine, pooling)
    try:
        assert embedder.tap is not None and embedder.tap.stopping
        for text in TEXTS + SENTENCES[:2]:
            tokens = loop_thread.run(engine.encode_text(text))
            stops = embedder.tap.stops
            vector = np.array(embedder._embed_one(tokens))
            assert embedder.tap.stops == stops + 1
            assert np.abs(vector - reference(engine, pooling, tokens)).max() < 1e-6, text
    finally:
        embedder.close()


def test_a_model_whose_norm_is_not_found_computes_the_whole_graph(
        engine: LlamaCppEngine, loop_thread: LoopThread,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The check decode decides: no rows (or rows that pool to another vector, as dense
    layers after pooling would make) and the embedder keeps llama.cpp's whole graph."""
    monkeypatch.setattr(NormTap, "NODE", b"no_such_node")
    embedder = embedder_with(engine, llama_cpp.LLAMA_POOLING_TYPE_MEAN)
    try:
        assert embedder.tap is None
        tokens = loop_thread.run(engine.encode_text(TEXTS[0]))
        vector = np.array(embedder._embed_one(tokens))
        expected = reference(engine, llama_cpp.LLAMA_POOLING_TYPE_MEAN, tokens)
        assert np.abs(vector - expected).max() < 1e-6
    finally:
        embedder.close()


def test_rows_that_pool_to_another_vector_are_not_used() -> None:
    tap = NormTap(4)
    tap.rows = np.array([[1, 0, 0, 0], [0, 1, 0, 0]], dtype=np.float32)
    mean = np.array([1, 1, 0, 0]) / np.sqrt(2)
    assert tap.verify(llama_cpp.LLAMA_POOLING_TYPE_MEAN, mean) and tap.stopping
    assert not tap.verify(llama_cpp.LLAMA_POOLING_TYPE_LAST, mean) and not tap.stopping
    assert not tap.verify(llama_cpp.LLAMA_POOLING_TYPE_RANK, mean)
