"""The upstream engine against a fake provider on 127.0.0.1: relaying, usage, and every
fault the provider can throw (429 + Retry-After, 500, stalls, a broken SSE line, no usage,
a dropped connection), retries, the breaker, cancellation, and no secret in errors."""

from __future__ import annotations

import time
from typing import Any

import pytest

from aicloud.engines.base import (
    EngineError,
    EngineUnavailable,
    FinishReason,
    GenerationRequest,
    RelayBody,
    TokenEvent,
)
from aicloud.engines.upstream import UpstreamEngine, retry_after
from aicloud.models.catalog import CatalogEntry, EngineKind
from aicloud.providers.link import ProviderLinks
from aicloud.providers.secrets import Secret
from aicloud.providers.store import ProviderConfig, ProviderSettings
from tests.conftest import LoopThread
from tests.providers.conftest import CANARY, Configs
from tests.providers.fake import RunningFake

MESSAGES = [{"role": "user", "content": "say hello to me"}]  # 4 words: 7 prompt tokens


def engine(links: ProviderLinks, upstream_model: str = "fake", **options: Any
           ) -> UpstreamEngine:
    entry = CatalogEntry("partner", EngineKind.UPSTREAM, provider="fake",
                         upstream_model=upstream_model, options={"context": 4096, **options})
    return UpstreamEngine(entry, links)


def request(**fields: Any) -> GenerationRequest:
    body = {"model": "partner", "messages": MESSAGES, **fields}
    return GenerationRequest("req-1", [], relay=RelayBody("chat/completions", body, 5))


async def run_all(eng: UpstreamEngine, req: GenerationRequest) -> list[TokenEvent]:
    stream = await eng.generate(req)
    return [event async for event in stream]


def test_the_answer_is_relayed_chunk_by_chunk_with_the_providers_usage(
        links: ProviderLinks, fake: RunningFake, loop_thread: LoopThread) -> None:
    eng = engine(links)
    assert eng.info().max_sequences == 64  # the default, until the provider is read
    events = loop_thread.run(run_all(eng, request(temperature=0.5)))
    assert eng.info().max_sequences == 5  # its concurrency cap
    assert eng.stats().running == 0
    assert "".join(e.text for e in events) == "Hello from the fake provider."
    assert len([e for e in events if e.upstream is not None]) == 6
    final = events[-1]
    assert final.finish_reason is FinishReason.STOP and final.provider == "fake"
    assert final.usage is not None and not final.usage.estimated
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (7, 6)
    sent = fake.received()[-1]
    assert sent["model"] == "fake"  # the provider's id, not ours
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["body"]["stream"] is True and sent["body"]["temperature"] == 0.5
    assert sent["authorization"] == f"Bearer {CANARY}"


def test_one_connection_serves_request_after_request(links: ProviderLinks, fake: RunningFake,
                                                     loop_thread: LoopThread) -> None:
    eng = engine(links)
    for _ in range(3):
        assert loop_thread.run(run_all(eng, request()))[-1].finish_reason is FinishReason.STOP
    assert len({tuple(r["client"]) for r in fake.received()}) == 1


def test_without_usage_from_the_provider_the_counts_are_estimated(
        links: ProviderLinks, loop_thread: LoopThread) -> None:
    final = loop_thread.run(run_all(engine(links, "fake-nousage"), request()))[-1]
    assert final.finish_reason is FinishReason.STOP
    assert final.usage is not None and final.usage.estimated
    assert final.usage.prompt_tokens == 5  # the request's estimate
    assert final.usage.completion_tokens >= 6


def test_a_429_is_retried_after_its_retry_after(links: ProviderLinks, fake: RunningFake,
                                                loop_thread: LoopThread) -> None:
    fake.fail_next(1, 429, "1")
    eng = engine(links)
    started = time.monotonic()
    events = loop_thread.run(run_all(eng, request()))
    assert events[-1].finish_reason is FinishReason.STOP
    assert time.monotonic() - started >= 0.9  # it waited as asked, not less
    assert len(fake.received()) == 2
    (link,) = eng.links()
    assert link.metrics.requests["status_429"] == 1 and link.metrics.retries == 1


def test_5xx_is_retried_then_unavailable_and_the_breaker_opens(
        links: ProviderLinks, fake: RunningFake, loop_thread: LoopThread) -> None:
    eng = engine(links, "fake-500")
    for _ in range(2):  # 2 attempts each (retries=1)
        with pytest.raises(EngineUnavailable):
            loop_thread.run(eng.generate(request()))
    assert len(fake.received()) == 4
    fake.reset()
    with pytest.raises(EngineUnavailable):  # 5th failure opens the breaker
        loop_thread.run(eng.generate(request()))
    with pytest.raises(EngineUnavailable) as caught:
        loop_thread.run(engine(links).generate(request()))  # same provider, any model
    assert caught.value.retry_after >= 1
    assert len(fake.received()) == 1  # the open breaker sent nothing
    (link,) = eng.links()
    assert link.metrics.requests["breaker_open"] == 2  # the 3rd call's retry, the 4th call


def test_a_stall_before_the_first_byte_times_out_and_is_retried(
        links: ProviderLinks, fake: RunningFake, loop_thread: LoopThread) -> None:
    eng = engine(links, "fake-stall-first")
    with pytest.raises(EngineUnavailable, match="did not answer in time"):
        loop_thread.run(eng.generate(request()))
    assert len(fake.received()) == 2


@pytest.mark.parametrize(("model", "kind"), [("fake-stall-mid", "timeout"),
                                             ("fake-broken", "protocol"),
                                             ("fake-cut", "cut")])
def test_a_stream_cut_midway_ends_in_error_with_the_partial_usage(
        model: str, kind: str, links: ProviderLinks, loop_thread: LoopThread) -> None:
    eng = engine(links, model)
    events = loop_thread.run(run_all(eng, request()))
    assert "".join(e.text for e in events) == "Hello from"
    final = events[-1]
    assert final.finish_reason is FinishReason.ERROR
    assert final.usage is not None and final.usage.estimated
    assert final.usage.prompt_tokens == 5 and final.usage.completion_tokens >= 2
    (link,) = eng.links()
    assert link.metrics.requests[kind] == 1


def test_cancel_closes_the_upstream_request_and_bills_what_came(
        links: ProviderLinks, fake: RunningFake, loop_thread: LoopThread) -> None:
    async def scenario() -> TokenEvent:
        stream = await engine(links, "fake-slow").generate(request())
        seen = 0
        async for _event in stream:
            seen += 1
            if seen == 3:
                stream.cancel()
                break
        return await stream.final()

    final = loop_thread.run(scenario())
    assert final.finish_reason is FinishReason.CANCELLED
    assert final.usage is not None and 3 <= final.usage.completion_tokens < 200
    deadline = time.monotonic() + 5
    while fake.app.disconnects == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake.app.disconnects == 1


def test_a_refused_request_is_the_callers_error_without_our_secrets(
        links: ProviderLinks, fake: RunningFake, loop_thread: LoopThread) -> None:
    with pytest.raises(EngineError) as caught:
        loop_thread.run(engine(links, "fake-echo").generate(request()))
    message = caught.value.message
    assert "bad request" in message and caught.value.param == "messages"
    assert CANARY not in message and "hdr-canary" not in message
    assert fake.url not in message


def test_token_ids_are_refused_a_remote_provider_is_never_tokenized_for(
        links: ProviderLinks, loop_thread: LoopThread) -> None:
    eng = engine(links)
    with pytest.raises(EngineError):
        loop_thread.run(eng.generate(GenerationRequest("r", [1, 2, 3])))
    with pytest.raises(EngineError):
        loop_thread.run(eng.encode_text("hi"))
    assert eng.info().can("relay") and not eng.info().can("embed")


def test_retry_after_reads_seconds_and_dates() -> None:
    assert retry_after("3") == 3.0
    assert retry_after(None) is None and retry_after("soon") is None
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert retry_after("nan") is None


def test_provider_changes_reach_running_links(fake: RunningFake, loop_thread: LoopThread
                                              ) -> None:
    configs = Configs(ProviderConfig("fake", fake.base_url, Secret("old"), {},
                                     ProviderSettings(timeout=1.0, retries=0)))
    made = ProviderLinks(configs)

    async def scenario() -> None:
        first = await made.link("fake")
        configs.current = ProviderConfig("fake", fake.base_url, Secret("new"), {},
                                         ProviderSettings(timeout=1.0, retries=0))
        first.checked -= 10
        second = await made.link("fake")
        assert second is not first and second.headers["authorization"] == "Bearer new"
        await made.close()

    loop_thread.run(scenario())
