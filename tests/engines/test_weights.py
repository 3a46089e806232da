"""Re-typing weights for the machine: made once, cached, and served like the original."""

from __future__ import annotations

from pathlib import Path

import pytest

from aicloud.engines.base import ChatMessage, FinishReason, GenerationRequest, SamplingParams
from aicloud.engines.llamacpp.engine import LlamaCppEngine
from aicloud.engines.llamacpp.model import ContextConfig, ModelLoadError
from aicloud.engines.llamacpp.weights import (
    AUTO,
    Probe,
    choose_format,
    decode_rate,
    ensure_weights,
    retyped_path,
)
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


@pytest.fixture(scope="module")
def weights_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the module, so the file is re-typed once; each test starts without
    format decisions."""
    return tmp_path_factory.mktemp("weights")


def probe_with(rates: dict[str, float], calls: list[Path]) -> Probe:
    def probe(path: Path) -> float:
        calls.append(path)
        return rates["q4_0" if path.name.endswith(".q4_0.gguf") else "native"]
    return probe


@pytest.mark.parametrize("native, retyped, expected", [
    (100.0, 120.0, "q4_0"), (100.0, 105.0, "native"), (100.0, 60.0, "native")])
def test_auto_serves_the_faster_format_and_decides_once(
        weights_cache: Path, native: float, retyped: float, expected: str) -> None:
    (weights_cache / "formats.json").unlink(missing_ok=True)
    source, calls = bundled_model().path, []
    probe = probe_with({"native": native, "q4_0": retyped}, calls)
    assert choose_format(source, weights_cache, probe) == expected
    assert len(calls) == 2 and calls[0] == source
    assert choose_format(source, weights_cache, probe) == expected
    assert len(calls) == 2  # remembered, not measured again
    served = ensure_weights(source, AUTO, weights_cache)
    assert served == (source if expected == "native" else retyped_path(source, "q4_0",
                                                                          weights_cache))


def test_auto_keeps_files_of_other_precisions(weights_cache: Path) -> None:
    eight_bit = ensure_weights(bundled_model().path, "q8_0", weights_cache)
    calls: list[Path] = []
    assert choose_format(eight_bit, weights_cache, probe_with({}, calls)) == "native"
    assert calls == []


def test_auto_measures_real_decoding(weights_cache: Path) -> None:
    source = bundled_model().path
    assert decode_rate(source, sequences=4, steps=2) > 0
    (weights_cache / "formats.json").unlink(missing_ok=True)
    choice = choose_format(source, weights_cache)
    assert choice in ("native", "q4_0")
    assert choose_format(source, weights_cache, probe_with({}, [])) == choice
