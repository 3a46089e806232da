"""Embeddings of a provider's model through the upstream engine, against the fake
provider: relayed as sent, vectors back in input order (floats or base64), the
provider's usage, or a count when it sends none; faults retried as before a stream's
first chunk; a refusal scrubbed of our secrets."""

from __future__ import annotations

import base64
import struct
from typing import Any

import pytest

from aicloud.engines.base import (
    EmbeddingRequest,
    Embeddings,
    EngineError,
    EngineUnavailable,
    RelayBody,
)
from aicloud.engines.llamacpp.model import ContextConfig, LlamaModel
from aicloud.models.catalog import bundled_model
from aicloud.providers.link import ProviderLinks
from tests.conftest import LoopThread
from tests.providers.conftest import CANARY
from tests.providers.fake import RunningFake
from tests.providers.test_upstream_engine import engine

TEXTS = ["the quick brown fox", "jumps"]


def job(**fields: Any) -> EmbeddingRequest:
    body = {"model": "partner", "input": TEXTS, **fields}
    return EmbeddingRequest("embd-1", [], "tenant", relay=RelayBody("embeddings", body, 6))


def run(links: ProviderLinks, loop_thread: LoopThread, model: str = "fake",
        **fields: Any) -> Embeddings:
    return loop_thread.run(engine(links, model).embed(job(**fields)))


def test_vectors_come_back_in_input_order_with_the_providers_usage(
        links: ProviderLinks, fake: RunningFake, loop_thread: LoopThread) -> None:
    result = run(links, loop_thread, dimensions=4, user="u1")
    # the fake answers in reverse order: index decides
    assert result.vectors == [[19.0, 0.0, 0.5, -0.25], [5.0, 1.0, 0.5, -0.25]]
    assert (result.usage.prompt_tokens, result.usage.estimated) == (5, False)
    assert result.provider == "fake"
    sent = fake.received()[-1]
    assert sent["body"] == {"model": "fake", "input": TEXTS, "dimensions": 4, "user": "u1"}
    assert sent["authorization"] == f"Bearer {CANARY}"
    (link,) = engine(links).links()
    assert link.metrics.requests["ok"] == 1 and link.gate.busy == 0


def test_base64_vectors_are_read_as_float32(links: ProviderLinks,
                                            loop_thread: LoopThread) -> None:
    result = run(links, loop_thread, encoding_format="base64")
    assert result.vectors[1] == [5.0, 1.0, 0.5, -0.25]
    packed = base64.b64encode(struct.pack("<4f", *result.vectors[0]))
    assert struct.unpack("<4f", base64.b64decode(packed)) == (19.0, 0.0, 0.5, -0.25)


def test_token_arrays_pass_through_and_count_exactly_without_usage(
        links: ProviderLinks, fake: RunningFake, loop_thread: LoopThread) -> None:
    result = run(links, loop_thread, "fake-nousage", input=[[1, 2, 3], [4, 5]])
    assert result.vectors[0][0] == 3.0
    assert (result.usage.prompt_tokens, result.usage.estimated) == (5, False)
    assert fake.received()[-1]["body"]["input"] == [[1, 2, 3], [4, 5]]


def test_without_usage_strings_are_estimated_or_counted_with_the_tokenizer(
        links: ProviderLinks, loop_thread: LoopThread) -> None:
    guessed = run(links, loop_thread, "fake-nousage")
    assert guessed.usage.estimated and guessed.usage.prompt_tokens == 5 + 2  # 4 chars each

    path = bundled_model().path
    counted = loop_thread.run(engine(links, "fake-nousage", tokenizer=str(path)).embed(job()))
    assert not counted.usage.estimated
    own = LlamaModel(path, ContextConfig(sequences=1, context_per_sequence=64))
    try:  # what the bundled model's own embeddings route counts: encode_text per input
        expected = sum(len(own.tokenize(t, special=False)) for t in TEXTS)
    finally:
        own.close()
    assert counted.usage.prompt_tokens == expected


def test_a_failing_provider_is_retried_then_unavailable(
        links: ProviderLinks, fake: RunningFake, loop_thread: LoopThread) -> None:
    fake.fail_next(1)
    assert run(links, loop_thread).usage.prompt_tokens == 5  # the retry answered
    fake.reset()
    with pytest.raises(EngineUnavailable):
        run(links, loop_thread, "fake-500")
    assert len(fake.received()) == 2  # retries=1
    (link,) = engine(links).links()
    assert link.gate.busy == 0 and link.metrics.requests["status_5xx"] == 3


def test_a_stall_is_retried_then_unavailable(links: ProviderLinks, fake: RunningFake,
                                             loop_thread: LoopThread) -> None:
    with pytest.raises(EngineUnavailable, match="did not answer in time"):
        run(links, loop_thread, "fake-stall-first")
    assert len(fake.received()) == 2


def test_a_refusal_is_the_callers_error_without_our_secrets(
        links: ProviderLinks, fake: RunningFake, loop_thread: LoopThread) -> None:
    with pytest.raises(EngineError) as caught:
        run(links, loop_thread, "fake-echo")
    message = caught.value.message
    assert "bad request" in message and CANARY not in message
    assert "hdr-canary" not in message and fake.url not in message


def test_token_ids_without_the_request_are_refused(links: ProviderLinks,
                                                   loop_thread: LoopThread) -> None:
    with pytest.raises(EngineError) as caught:
        loop_thread.run(engine(links).embed(EmbeddingRequest("e", [[1, 2]])))
    assert caught.value.param == "model"
