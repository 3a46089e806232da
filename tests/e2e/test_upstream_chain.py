"""The real thing: one `aicloud serve` (B, the bundled model) as the provider of another
(A). A request to A's upstream model is relayed to B with B's key; the usage both sides
bill is the same (B's engine counted it), each at its own price, and B's key never shows
in A's log or answers."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import openai
import pytest

from aicloud.models.catalog import CatalogEntry, EngineKind
from tests.conftest import Server, start_server
from tests.e2e.test_upstream import add_catalog, cli

LOCAL = "smollm2-135m-instruct"
SMALL = ("--context", "512", "--sequences", "4")
ASK = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    b = start_server(tmp_path_factory.mktemp("provider-b"), *SMALL)
    try:
        b.keys["relay"] = b.new_key("relay")
        home = tmp_path_factory.mktemp("gateway-a")
        env = {**b.env, "AICLOUD_HOME": str(home)}
        cli(env, "providers", "add", "b", "--base-url", f"{b.base_url}/v1", "--api-key-stdin",
            stdin=b.keys["relay"] + "\n")
        add_catalog(home, [CatalogEntry("remote-smol", EngineKind.UPSTREAM, provider="b",
                                        upstream_model=LOCAL, options={"context": 512})])
        a = start_server(home, *SMALL)
    except BaseException:
        b.stop()
        raise
    a.keys["user"] = a.new_key("user")
    with a.admin() as admin:
        admin.put("/prices/remote-smol", json={"input_per_million": 3, "output_per_million": 5})
    with b.admin() as admin:
        admin.put(f"/prices/{LOCAL}", json={"input_per_million": 1, "output_per_million": 2})
    yield a, b
    a.stop()
    b.stop()


def rows(server: Server) -> list[tuple[int, int, int, str | None]]:
    with sqlite3.connect(server.db) as conn:
        return conn.execute("SELECT prompt_tokens, completion_tokens, cost_pico, provider "
                            "FROM usage ORDER BY id").fetchall()


def test_both_sides_bill_the_same_usage_at_their_own_prices(chain: tuple[Server, Server]
                                                            ) -> None:
    a, b = chain
    client = openai.OpenAI(base_url=f"{a.base_url}/v1", api_key=a.keys["user"],
                           max_retries=0, timeout=120)
    whole = client.chat.completions.create(model="remote-smol", messages=ASK, max_tokens=8,
                                           temperature=0)
    assert whole.model == "remote-smol" and whole.choices[0].message.content
    chunks = list(client.chat.completions.create(
        model="remote-smol", messages=ASK, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        whole.choices[0].message.content  # greedy: the same text either way
    streamed = chunks[-1].usage
    assert streamed is not None
    seen = [(u.prompt_tokens, u.completion_tokens) for u in (whole.usage, streamed)]

    on_a, on_b = rows(a), rows(b)
    assert [(p, c) for p, c, _, _ in on_a] == seen
    assert [(p, c) for p, c, _, _ in on_b] == seen
    assert all(provider == "b" for *_, provider in on_a)
    assert all(provider is None for *_, provider in on_b)
    for (p, c, cost_a, _), (_, _, cost_b, _) in zip(on_a, on_b, strict=True):
        assert cost_a == p * 3_000_000 + c * 5_000_000
        assert cost_b == p * 1_000_000 + c * 2_000_000
    assert b.keys["relay"] not in a.log.read_text()


def test_embeddings_through_the_chain_are_the_providers_own(chain: tuple[Server, Server]
                                                            ) -> None:
    """A's remote-smol embeds on B's bundled model: the same vectors as asking B itself,
    the same usage on both sides, each at its own price."""
    a, b = chain
    before_a, before_b = len(rows(a)), len(rows(b))
    texts = ["The sky is blue.", "Grass is green."]
    via_a = openai.OpenAI(base_url=f"{a.base_url}/v1", api_key=a.keys["user"],
                          max_retries=0, timeout=120).embeddings.create(
        model="remote-smol", input=texts)
    at_b = openai.OpenAI(base_url=f"{b.base_url}/v1", api_key=b.keys["relay"],
                         max_retries=0, timeout=120).embeddings.create(model=LOCAL, input=texts)
    assert via_a.model == "remote-smol"
    assert [d.embedding for d in via_a.data] == [d.embedding for d in at_b.data]
    assert via_a.usage.prompt_tokens == at_b.usage.prompt_tokens > 0

    (p_a, c_a, cost_a, provider_a), = rows(a)[before_a:]
    relayed, _direct = rows(b)[before_b:]
    assert (p_a, c_a, provider_a) == (via_a.usage.prompt_tokens, 0, "b")
    assert relayed[:2] == (p_a, 0) and relayed[3] is None
    assert cost_a == p_a * 3_000_000 and relayed[2] == p_a * 1_000_000
