"""The order of a generation's checks, in process with the real model and engine: a caller
over its request rate, or a prompt that cannot fit the context, is refused before a single
character of the prompt is tokenized."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from aicloud.accounts.base import AdminScope
from aicloud.api.admission import MAX_BYTES_PER_TOKEN
from aicloud.api.app import create_app
from aicloud.cli import build_pool
from aicloud.config import Settings
from aicloud.engines.base import ChatMessage
from tests.conftest import LoopThread

MODEL = "smollm2-135m-instruct"
CONTEXT = 512


class Spy:
    """Counts the characters each tokenizing call of one engine was handed."""

    def __init__(self, engine: Any) -> None:
        self.calls: list[int] = []
        chat, text = engine.encode_chat, engine.encode_text

        async def encode_chat(messages: list[ChatMessage],
                              tools: list[dict[str, Any]] | None = None) -> list[int]:
            self.calls.append(sum(len(m.content) for m in messages))
            return await chat(messages, tools)

        async def encode_text(prompt: str) -> list[int]:
            self.calls.append(len(prompt))
            return await text(prompt)

        engine.encode_chat, engine.encode_text = encode_chat, encode_text


@pytest.fixture(scope="module")
def app_client(tmp_path_factory: pytest.TempPathFactory,
               loop_thread: LoopThread) -> Any:
    settings = Settings(home=tmp_path_factory.mktemp("admission"), context=CONTEXT,
                        sequences=2, database_url=None, redis_url=None, models=[])
    app = create_app(settings, build_pool(settings))
    lifespan = app.router.lifespan_context(app)
    loop_thread.run(lifespan.__aenter__())
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                               base_url="http://aicloud", timeout=120)
    spy = Spy(app.state.pool.get(MODEL))
    yield app, client, spy
    loop_thread.run(client.aclose())
    loop_thread.run(lifespan.__aexit__(None, None, None))


async def new_key(app: Any, **limits: int) -> dict[str, str]:
    cloud = app.state.cloud
    view, secret = await cloud.keys.create_for_project_name("admission")
    if limits:
        await cloud.keys.update_key(AdminScope.installation(), view.id, limits)
    return {"Authorization": f"Bearer {secret}"}


def chat(text: str) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": text}]}


def test_over_the_request_rate_is_refused_before_tokenizing(app_client: Any,
                                                            loop_thread: LoopThread) -> None:
    app, client, spy = app_client

    async def scenario() -> list[httpx.Response]:
        auth = await new_key(app, rpm_limit=1)
        first = await client.post("/v1/chat/completions", json=chat("hi"), headers=auth)
        spy.calls.clear()
        # within the character bound: only the order of the checks spares the tokenizer
        big = "hello " * (CONTEXT * 20)
        return [first,
                await client.post("/v1/chat/completions", json=chat(big), headers=auth),
                await client.post("/v1/completions", headers=auth,
                                  json={"model": MODEL, "prompt": big, "max_tokens": 1})]

    first, *refused = loop_thread.run(scenario())
    assert first.status_code == 200, first.text
    for resp in refused:
        assert resp.status_code == 429, resp.text
        assert resp.json()["error"]["code"] == "rate_limit_exceeded"
        assert resp.headers["x-ratelimit-remaining-requests"] == "0"
    assert spy.calls == []


def test_a_prompt_that_cannot_fit_is_refused_without_tokenizing(
        app_client: Any, loop_thread: LoopThread) -> None:
    app, client, spy = app_client
    bound = CONTEXT * MAX_BYTES_PER_TOKEN

    async def scenario() -> list[httpx.Response]:
        auth = await new_key(app)
        spy.calls.clear()
        over = "x" * (bound + 1)
        return [await client.post("/v1/chat/completions", json=chat(over), headers=auth),
                await client.post("/v1/completions", headers=auth,
                                  json={"model": MODEL, "prompt": over, "max_tokens": 1}),
                # one character under the bound: tokenized, then refused by its token count
                await client.post("/v1/completions", headers=auth,
                                  json={"model": MODEL, "prompt": "x" * bound,
                                        "max_tokens": 1})]

    chat_over, text_over, counted = loop_thread.run(scenario())
    for resp, param in ((chat_over, "messages"), (text_over, "prompt")):
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["code"] == "context_length_exceeded"
        assert resp.json()["error"]["param"] == param
    assert counted.status_code == 400, counted.text
    assert counted.json()["error"]["code"] == "context_length_exceeded"
    assert spy.calls == [bound]


def test_the_bound_never_refuses_what_fits() -> None:
    """No token of the bundled vocabulary is longer than MAX_BYTES_PER_TOKEN bytes, so a
    prompt over the bound can never fit."""
    from aicloud.engines.llamacpp.model import ContextConfig, LlamaModel
    from aicloud.models.catalog import bundled_model

    model = LlamaModel(bundled_model().path, ContextConfig(sequences=1,
                                                           context_per_sequence=64))
    try:
        longest = max(len(model.piece(t)) for t in range(model.n_vocab))
    finally:
        model.close()
    assert 8 <= longest <= MAX_BYTES_PER_TOKEN
