"""The official openai client against a live server with the real bundled model."""

from __future__ import annotations

import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.conftest import Server

MODEL = "smollm2-135m-instruct"
HELLO = [{"role": "user", "content": "Say hello to the world in one short sentence."}]


@pytest.fixture
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=server.keys["alpha"],
                         max_retries=0, timeout=120)


def usage_row(server: Server, request_id: str, wait: float = 5.0) -> dict | None:
    deadline = time.monotonic() + wait
    while True:
        with sqlite3.connect(server.db) as db:
            db.row_factory = sqlite3.Row
            row = db.execute("SELECT * FROM usage WHERE request_id = ?", (request_id,)).fetchone()
        if row is not None or time.monotonic() > deadline:
            return dict(row) if row else None
        time.sleep(0.1)


def test_models_list(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == [MODEL]


def test_chat_completion_records_usage(client: openai.OpenAI, server: Server) -> None:
    resp = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=32,
                                          temperature=0)
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    row = usage_row(server, resp.id)
    assert row is not None
    assert row["prompt_tokens"] == resp.usage.prompt_tokens > 0
    assert row["completion_tokens"] == resp.usage.completion_tokens > 0
    assert row["status"] in ("completed", "length")


def test_stream_usage_chunk_equals_stored_row(client: openai.OpenAI, server: Server) -> None:
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=24, stream=True,
        stream_options={"include_usage": True}, temperature=0))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert text.strip()
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    row = usage_row(server, last.id)
    assert row is not None
    assert (row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"]) == (
        last.usage.prompt_tokens, last.usage.completion_tokens,
        last.usage.prompt_tokens_details.cached_tokens)


def test_stream_matches_non_stream_at_temperature_zero(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=24,
                                           temperature=0)
    chunks = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=24,
                                            temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content


def test_max_tokens_gives_length(client: openai.OpenAI) -> None:
    prompt = [{"role": "user", "content": "Write a long story about a dragon and a castle."}]
    for limit in ({"max_tokens": 5}, {"max_completion_tokens": 5}):
        resp = client.chat.completions.create(model=MODEL, messages=prompt, temperature=0,
                                              **limit)
        assert resp.usage.completion_tokens == 5
        assert resp.choices[0].finish_reason == "length"


def test_stop_sequence_is_honoured(client: openai.OpenAI) -> None:
    prompt = [{"role": "user", "content": "Count from one to twenty in words, comma separated."}]
    full = client.chat.completions.create(model=MODEL, messages=prompt, max_tokens=60,
                                          temperature=0).choices[0].message.content
    assert len(full) > 12
    stop = full[8:12]
    cut = full[: full.index(stop)]
    for stream in (False, True):
        if stream:
            chunks = client.chat.completions.create(model=MODEL, messages=prompt, max_tokens=60,
                                                    temperature=0, stop=[stop], stream=True)
            parts = [(c.choices[0].delta.content or "", c.choices[0].finish_reason)
                     for c in chunks if c.choices]
            text, finish = "".join(p for p, _ in parts), parts[-1][1]
        else:
            resp = client.chat.completions.create(model=MODEL, messages=prompt, max_tokens=60,
                                                  temperature=0, stop=stop)
            text, finish = resp.choices[0].message.content, resp.choices[0].finish_reason
        assert text == cut
        assert finish == "stop"


def test_completions_both_modes(client: openai.OpenAI, server: Server) -> None:
    resp = client.completions.create(model=MODEL, prompt="The capital of France is",
                                     max_tokens=8, temperature=0)
    assert resp.object == "text_completion" and resp.choices[0].text
    assert resp.usage.completion_tokens <= 8
    assert usage_row(server, resp.id)["completion_tokens"] == resp.usage.completion_tokens
    chunks = list(client.completions.create(model=MODEL, prompt="The capital of France is",
                                            max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == resp.choices[0].text


def test_completion_defaults_to_sixteen_tokens(client: openai.OpenAI) -> None:
    resp = client.completions.create(model=MODEL, prompt="Once upon a time", temperature=0,
                                     stop=None, seed=3)
    assert resp.usage.completion_tokens <= 16


def test_sixteen_concurrent_streams_complete(client: openai.OpenAI) -> None:
    def one(i: int) -> tuple[str, str | None]:
        chunks = client.chat.completions.create(
            model=MODEL, stream=True, max_tokens=40, seed=i,
            messages=[{"role": "user", "content": f"Tell me fact number {i} about the sea."}])
        parts = [c for c in chunks if c.choices]
        return "".join(c.choices[0].delta.content or "" for c in parts), parts[-1].choices[
            0].finish_reason

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert len(results) == 16
    assert all(text and finish in ("stop", "length") for text, finish in results)


def test_healthz_answers_while_model_busy(client: openai.OpenAI, server: Server) -> None:
    def busy(i: int) -> None:
        client.completions.create(model=MODEL, prompt="A long essay about the sea:\n",
                                  max_tokens=200, seed=i, temperature=1.0)

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(busy, i) for i in range(8)]
        time.sleep(1.0)
        latencies, running = [], []
        with httpx.Client(base_url=server.base_url) as http:
            for _ in range(20):
                t0 = time.perf_counter()
                stats = http.get("/healthz").json()["models"][MODEL]
                latencies.append(time.perf_counter() - t0)
                running.append(stats["running"])
                time.sleep(0.05)
        assert max(running) > 0, "the model should have been busy during the probe"
        for f in futures:
            f.result()
    latencies.sort()
    assert latencies[len(latencies) // 2] < 0.1, latencies


def test_client_disconnect_cancels_and_bills(client: openai.OpenAI, server: Server) -> None:
    stream = client.chat.completions.create(
        model=MODEL, stream=True, max_tokens=500, temperature=0.8, seed=1,
        messages=[{"role": "user", "content": "Write a very long essay about the ocean."}])
    request_id = None
    for seen, chunk in enumerate(stream, start=1):
        request_id = chunk.id
        if seen == 4:
            break
    stream.close()
    row = usage_row(server, request_id, wait=10)
    assert row is not None
    assert row["status"] == "cancelled"
    assert 3 <= row["completion_tokens"] < 500
