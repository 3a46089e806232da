"""Re-typing weights for the machine: made once, cached, and served like the original."""

from __future__ import annotations

from pathlib import Path

import pytest

from aicloud.engines.base import ChatMessage, FinishReason, GenerationRequest, SamplingParams
from aicloud.engines.llamacpp.engine import LlamaCppEngine
from aicloud.engines.llamacpp.model import ContextConfig, ModelLoadError
from aicloud.engines.llamacpp.weights import ensure_weights
from aicloud.models.catalog import bundled_model
from tests.conftest import LoopThread


def test_retyped_weights_are_made_once(tmp_path: Path) -> None:
    source = bundled_model().path
    assert ensure_weights(source, "native", tmp_path) == source
    first = ensure_weights(source, "q4_0", tmp_path)
    assert first.parent == tmp_path and first.read_bytes()[:4] == b"GGUF"
    assert first.stat().st_size < source.stat().st_size
    made = first.stat().st_mtime_ns
    assert ensure_weights(source, "q4_0", tmp_path) == first
    assert first.stat().st_mtime_ns == made
    assert not list(tmp_path.glob("*.partial"))
    with pytest.raises(ModelLoadError):
        ensure_weights(source, "q3_weird", tmp_path)


def test_engine_serves_retyped_weights(tmp_path: Path, loop_thread: LoopThread) -> None:
    spec = bundled_model()
    engine = LlamaCppEngine(spec.model_id, spec.path,
                            ContextConfig(sequences=2, context_per_sequence=512),
                            weights="q4_0", weights_cache=tmp_path)

    async def scenario() -> tuple[str, FinishReason | None]:
        await engine.start()
        try:
            tokens = await engine.encode_chat([ChatMessage("user", "Name a colour.")])
            stream = await engine.generate(
                GenerationRequest("w", tokens, SamplingParams(temperature=0), 8))
            events = [e async for e in stream]
            return "".join(e.text for e in events), events[-1].finish_reason
        finally:
            await engine.close()

    text, finish = loop_thread.run(scenario())
    assert text.strip() and finish in (FinishReason.STOP, FinishReason.LENGTH)
    assert engine.weights == "q4_0"
