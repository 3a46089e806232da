"""Cross-tenant prefix cache, over real HTTP with the openai client: a project never sees a
hit on another project's prompt; `cache_salt` partitions further within a project."""

from __future__ import annotations

import secrets

import httpx
import openai
import pytest

from aicloud.accounts.keys import Principal
from aicloud.api.generation import cache_scope_of
from tests.conftest import Server

MODEL = "smollm2-135m-instruct"


def client(server: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0,
                         timeout=300)


def cached(api: openai.OpenAI, system: str, **extra: object) -> int:
    resp = api.chat.completions.create(
        model=MODEL, max_tokens=1, temperature=0,
        messages=[{"role": "system", "content": system},
                  {"role": "user", "content": "Summarise the plan."}],
        extra_body=extra or None)
    assert resp.usage is not None and resp.usage.prompt_tokens_details is not None
    return resp.usage.prompt_tokens_details.cached_tokens or 0


@pytest.fixture(scope="module")
def secret_prompt() -> str:
    """Unique to this run, so nothing cached by other tests can match it."""
    return (f"Internal memo {secrets.token_hex(4)}: the board approved the takeover of "
            "Litware for 40 million; announce it on Friday. ") * 4


def fresh_project(server: Server, name: str) -> openai.OpenAI:
    """A key of a project new to the server: nothing of its scope is cached yet (not even
    the template's `<|im_start|>system` that every chat starts with)."""
    return client(server, server.new_key(f"{name}-{secrets.token_hex(3)}"))


def test_another_project_gets_no_hit_on_a_cached_prompt(server: Server,
                                                        secret_prompt: str) -> None:
    alpha, beta = fresh_project(server, "a"), fresh_project(server, "b")
    assert cached(alpha, secret_prompt) == 0
    assert cached(alpha, secret_prompt) > 50  # A's own second request is a hit
    assert cached(beta, secret_prompt) == 0  # 54 of 56 before
    assert cached(alpha, secret_prompt) > 50  # and B did not evict it for A


def test_cache_salt_partitions_within_a_project(server: Server, secret_prompt: str) -> None:
    alpha = fresh_project(server, "a")
    system = secret_prompt.replace("Litware", "Tailspin")
    assert cached(alpha, system) == 0
    assert cached(alpha, system) > 50
    assert cached(alpha, system, cache_salt="user-1") == 0
    assert cached(alpha, system, cache_salt="user-1") > 50
    assert cached(alpha, system, cache_salt="user-2") == 0


@pytest.mark.parametrize("salt", ["", "x" * 257, 7])
def test_bad_cache_salt_is_a_400_naming_it(server: Server, salt: object) -> None:
    resp = httpx.post(f"{server.base_url}/v1/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {server.keys['alpha']}"},
                      json={"model": MODEL, "max_tokens": 1, "cache_salt": salt,
                            "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "cache_salt"


def principal(org: str, project: str, key: str) -> Principal:
    return Principal(organization_id=org, project_id=project, project_name=project,
                     api_key_id=key)


def test_cache_scope_follows_the_setting() -> None:
    a1, a2 = principal("org1", "projA", "key1"), principal("org1", "projA", "key2")
    b = principal("org1", "projB", "key3")
    assert cache_scope_of(a1, "project", None) == cache_scope_of(a2, "project", None)
    assert cache_scope_of(a1, "project", None) != cache_scope_of(b, "project", None)
    assert cache_scope_of(a1, "key", None) != cache_scope_of(a2, "key", None)
    assert cache_scope_of(a1, "organization", None) == cache_scope_of(b, "organization", None)
    assert cache_scope_of(a1, "project", "s") != cache_scope_of(a1, "project", None)
    assert "projA" not in cache_scope_of(a1, "project", "s")  # opaque to engines
