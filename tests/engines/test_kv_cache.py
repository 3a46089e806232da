"""The KV cache's type: flash attention over a bf16 cache by default, sized by its type."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from aicloud.engines.base import ChatMessage, GenerationRequest, SamplingParams
from aicloud.engines.llamacpp.engine import LlamaCppEngine
from aicloud.engines.llamacpp.model import ContextConfig, ModelLoadError
from aicloud.models.catalog import bundled_model
from aicloud.models.memory import llamacpp_need
from tests.conftest import LoopThread
from tests.engines.checks import running_engine

GREEDY = SamplingParams(temperature=0.0)


def test_a_quantized_cache_needs_flash_attention_and_unknown_types_are_refused() -> None:
    ContextConfig(kv_type="q8_0")  # with flash attention, the default
    with pytest.raises(ModelLoadError, match="flash attention"):
        ContextConfig(kv_type="q8_0", flash_attention=False)
    with pytest.raises(ModelLoadError, match="unknown KV cache type"):
        ContextConfig(kv_type="f32")


def test_the_memory_estimate_follows_the_cache_type() -> None:
    def kv(kv_type: str) -> int:
        return llamacpp_need(bundled_model().path, context=512, sequences=4,
                             kv_budget_mb=2048, batch_tokens=512, kv_type=kv_type).kv

    assert kv("bf16") == kv("f16")
    assert kv("q8_0") * 64 == kv("bf16") * 34  # 34 bytes per 32 values against 2 each


@pytest.fixture(scope="module")
def engine(loop_thread: LoopThread) -> Iterator[LlamaCppEngine]:
    yield from running_engine(loop_thread, ContextConfig(sequences=2, context_per_sequence=1024))


def test_a_long_prompt_reused_as_a_prefix_gives_the_text_it_gives_cold(
        engine: LlamaCppEngine, loop_thread: LoopThread) -> None:
    """Flash attention keeps the text independent of how the prompt was computed: a
    prompt of more than 64 tokens is prefilled as one chunk of its stream (over an f16
    cache llama.cpp would take a tiled kernel there, not the row-by-row one); another
    prompt that reuses its prefix, computing only its own last tokens, gives the text it
    gives with nothing cached."""
    system = ("You are a careful assistant for a shipping company. Answer in one short "
              "sentence, and never mention prices or delivery dates. ") * 3

    async def answer(question: str, scope: str) -> tuple[str, int]:
        tokens = await engine.encode_chat([ChatMessage("system", system),
                                           ChatMessage("user", question)])
        assert len(tokens) > 64
        stream = await engine.generate(GenerationRequest("k", tokens, GREEDY, 24,
                                                         cache_scope=scope))
        events = [e async for e in stream]
        usage = events[-1].usage
        assert usage is not None
        return "".join(e.text for e in events), usage.cached_tokens

    async def scenario() -> tuple[str, int, str, int]:
        await answer("Where is my parcel?", "warm")  # caches the system prompt
        reused, hit = await answer("Can I change the address?", "warm")
        cold, none = await answer("Can I change the address?", "cold")
        return reused, hit, cold, none

    reused, hit, cold, none = loop_thread.run(scenario())
    assert hit > 64 and none == 0
    assert reused == cold


def test_the_server_setting_reaches_each_model_and_refuses_an_unknown_type() -> None:
    from pydantic import ValidationError

    from aicloud.cli import context_config
    from aicloud.config import Settings
    from aicloud.models.catalog import CatalogEntry

    entry = CatalogEntry("m", source=str(bundled_model().path))
    assert context_config(Settings(), entry).kv_type == "bf16"
    assert context_config(Settings(), entry).flash_attention
    config = context_config(Settings(kv_cache="q8_0"), entry)
    assert config.kv_type == "q8_0"
    with pytest.raises(ValidationError):
        Settings(kv_cache="f32")
