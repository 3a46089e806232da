"""Tokens of a provider's answer that came without usage, counted with the model's
tokenizer (`options["tokenizer"]`, the bundled SmolLM2 GGUF here) and compared with the
bundled model's own tokenization; a bad tokenizer option refused when the model is added."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from aicloud.engines.base import (
    EngineError,
    FinishReason,
    GenerationRequest,
    RelayBody,
    TokenEvent,
)
from aicloud.engines.llamacpp.chat import ChatTemplate
from aicloud.engines.llamacpp.model import ContextConfig, LlamaModel
from aicloud.engines.upstream_count import chat_messages, check_tokenizer, counter_for
from aicloud.models.catalog import CatalogEntry, EngineKind, bundled_model
from aicloud.models.engines import check_source
from aicloud.providers.link import ProviderLinks
from tests.conftest import LoopThread
from tests.providers.test_upstream_engine import MESSAGES, engine, request, run_all

ANSWER = "Hello from the fake provider."
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def own() -> Iterator[LlamaModel]:
    """The bundled model itself (weights and all): what a local request counts with."""
    model = LlamaModel(bundled_model().path, ContextConfig(sequences=1,
                                                           context_per_sequence=128))
    yield model
    model.close()


def own_chat_tokens(model: LlamaModel) -> int:
    template = ChatTemplate(model.metadata("tokenizer.chat_template"),
                            bos_token=model.bos_text, eos_token=model.eos_text)
    try:
        return len(template.encode(chat_messages(MESSAGES), model))
    finally:
        template.close()


def tokenizer() -> str:
    return str(bundled_model().path)


def test_a_chat_without_usage_is_counted_exactly_with_the_models_tokenizer(
        links: ProviderLinks, loop_thread: LoopThread, own: LlamaModel) -> None:
    final = loop_thread.run(run_all(engine(links, "fake-nousage", tokenizer=tokenizer()),
                                    request()))[-1]
    assert final.finish_reason is FinishReason.STOP and final.usage is not None
    assert not final.usage.estimated
    assert final.usage.prompt_tokens == own_chat_tokens(own)
    assert final.usage.completion_tokens == len(own.encode_plain(ANSWER))
    # without a tokenizer, the same answer is an estimate (the request's prompt estimate)
    guessed = loop_thread.run(run_all(engine(links, "fake-nousage"), request()))[-1]
    assert guessed.usage is not None and guessed.usage.estimated
    assert guessed.usage.prompt_tokens == 5


def test_a_text_completion_counts_its_prompt_as_the_local_route_does(
        links: ProviderLinks, loop_thread: LoopThread, own: LlamaModel) -> None:
    body = {"model": "partner", "prompt": "say hello", "max_tokens": 3}
    req = GenerationRequest("req-2", [], max_tokens=3,
                            relay=RelayBody("completions", body, 3))
    final = loop_thread.run(run_all(engine(links, "fake-nousage", tokenizer=tokenizer()),
                                    req))[-1]
    assert final.usage is not None and not final.usage.estimated
    assert final.usage.prompt_tokens == len(own.tokenize("say hello", special=False))
    assert final.usage.completion_tokens == 3  # never more than the provider may make


def test_tool_calls_cannot_be_counted_exactly_and_stay_estimated(
        links: ProviderLinks, loop_thread: LoopThread) -> None:
    final = loop_thread.run(run_all(engine(links, "fake-nousage", tokenizer=tokenizer()),
                                    request(tools=[TOOL])))[-1]
    assert final.usage is not None and final.usage.estimated
    assert final.usage.prompt_tokens > 5  # the prompt (with its tools) was still counted


def test_a_tokenizer_is_loaded_once_per_file() -> None:
    assert counter_for(tokenizer()) is counter_for(tokenizer())


def test_a_bad_tokenizer_is_refused_when_the_model_is_added(tmp_path: Path) -> None:
    text = tmp_path / "tokenizer.txt"
    text.write_text("not a model")
    torn = tmp_path / "torn.gguf"
    torn.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    for value, reason in ((str(tmp_path / "missing.gguf"), "not found"),
                          (str(text), "not a GGUF file"), (str(torn), "cannot read"),
                          ("", "path of a GGUF"), (7, "path of a GGUF")):
        with pytest.raises(EngineError, match=reason) as caught:
            check_tokenizer(value)
        assert caught.value.param == "options.tokenizer"

    entry = CatalogEntry("p", EngineKind.UPSTREAM, provider="x", upstream_model="y",
                         options={"tokenizer": str(torn)})
    with pytest.raises(EngineError, match=r"options\.tokenizer"):
        check_source(entry)
    relative = os.path.relpath(tokenizer())
    good = check_source(CatalogEntry("p", EngineKind.UPSTREAM, provider="x",
                                     upstream_model="y", options={"tokenizer": str(relative)}))
    assert good.options["tokenizer"] == tokenizer()  # stored absolute
    local = CatalogEntry("l", source=tokenizer(), options={"tokenizer": tokenizer()})
    with pytest.raises(EngineError, match="upstream models"):
        check_source(local)


def test_a_cancelled_stream_without_usage_is_counted_too(
        links: ProviderLinks, loop_thread: LoopThread, own: LlamaModel) -> None:
    """The client left before the provider's usage chunk: what came is counted."""
    async def scenario() -> tuple[str, TokenEvent]:
        stream = await engine(links, "fake-slow", tokenizer=tokenizer()).generate(request())
        seen: list[str] = []
        async for event in stream:
            seen.append(event.text)
            if len(seen) == 3:
                stream.cancel()
                break
        return "".join(seen), await stream.final()

    seen, final = loop_thread.run(scenario())
    assert final.finish_reason is FinishReason.CANCELLED and final.usage is not None
    assert not final.usage.estimated
    assert final.usage.prompt_tokens == own_chat_tokens(own)
    assert final.usage.completion_tokens >= len(own.encode_plain(seen))
