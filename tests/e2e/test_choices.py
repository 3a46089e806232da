"""n > 1, logprobs, echo, several prompts and logit_bias, with the official openai client
against a live server and the real bundled model."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Server
from tests.e2e.test_openai_api import MODEL, usage_row

FRUIT = [{"role": "user", "content": "Name a fruit and say why you like it."}]
BANANA = 21285  # " banana" in SmolLM2's vocabulary (the bundled GGUF)


@pytest.fixture
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=server.keys["alpha"],
                         max_retries=0, timeout=120)


@pytest.fixture
def http(server: Server) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, timeout=120,
                        headers={"Authorization": f"Bearer {server.keys['alpha']}"})


def served_input(server: Server) -> int:
    """Prompt tokens the engine computed (the scheduler's counter), all tenants."""
    with server.admin() as admin:
        model = admin.get("/models").json()["data"][0]
    return sum(t["served_input_tokens"] for t in model["tenants"])


def running(server: Server) -> int:
    with server.admin() as admin:
        model = admin.get("/models").json()["data"][0]
    return sum(t["running"] for t in model["tenants"])


# -- n > 1 -------------------------------------------------------------------------------

def test_n_choices_at_temperature_zero_are_equal_and_usage_counts_each(
        client: openai.OpenAI, server: Server) -> None:
    one = client.chat.completions.create(model=MODEL, messages=FRUIT, max_tokens=12,
                                         temperature=0)
    three = client.chat.completions.create(model=MODEL, messages=FRUIT, max_tokens=12,
                                           temperature=0, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert {c.message.content for c in three.choices} == {one.choices[0].message.content}
    assert all(c.message.role == "assistant" for c in three.choices)
    assert three.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt once
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
    row = usage_row(server, three.id)
    assert row is not None
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        three.usage.prompt_tokens, three.usage.completion_tokens)


def test_n_siblings_reuse_the_prompt_prefilled_once(client: openai.OpenAI,
                                                    server: Server) -> None:
    """The other choices start once the first has its prompt in the cache: the engine
    computes the prompt once, plus the two tokens every reuse recomputes."""
    words = " ".join(uuid.uuid4().hex for _ in range(12))  # nothing cached shares it
    messages = [{"role": "user", "content": f"Repeat these codes: {words}"}]
    before = served_input(server)
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4,
                                          temperature=0.8, seed=3, n=3)
    computed = served_input(server) - before
    prompt = resp.usage.prompt_tokens
    fresh = prompt - resp.usage.prompt_tokens_details.cached_tokens  # the chat template's
    assert fresh > 100 and len(resp.choices) == 3  # system prompt may be cached
    assert computed == fresh + 2 * 2


def test_n_choices_streamed_with_a_seed_differ_and_reproduce(client: openai.OpenAI,
                                                              server: Server) -> None:
    def texts() -> tuple[dict[int, str], Any, list[Any]]:
        chunks = list(client.chat.completions.create(
            model=MODEL, messages=FRUIT, max_tokens=24, temperature=1.0, seed=11, n=3,
            stream=True, stream_options={"include_usage": True}))
        out: dict[int, str] = {}
        for c in chunks:
            for choice in c.choices:
                if choice.index not in out:  # each choice's first chunk names the role
                    assert choice.delta.role == "assistant"
                out[choice.index] = out.get(choice.index, "") + (choice.delta.content or "")
        return out, chunks[-1], chunks

    first, last, chunks = texts()
    again, _, _ = texts()
    assert sorted(first) == [0, 1, 2]
    assert first == again  # seeded: reproducible
    assert len(set(first.values())) > 1  # each choice sampled on its own
    finishes = {ch.index: ch.finish_reason for c in chunks for ch in c.choices
                if ch.finish_reason}
    assert sorted(finishes) == [0, 1, 2]
    assert last.choices == [] and last.usage is not None
    row = usage_row(server, last.id)
    assert row is not None
    assert row["completion_tokens"] == last.usage.completion_tokens > 3
    assert row["prompt_tokens"] == last.usage.prompt_tokens


def test_client_gone_cancels_every_choice_and_bills_them(server: Server) -> None:
    body = {"model": MODEL, "messages": FRUIT, "max_tokens": 600, "n": 3, "stream": True,
            "temperature": 1.0, "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {server.keys['alpha']}"}
    seen: set[int] = set()
    request_id = ""
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body,
                      headers=headers, timeout=60) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                request_id = chunk["id"]
                seen.update(c["index"] for c in chunk["choices"])
                if len(seen) == 3:
                    break
    row = usage_row(server, request_id, wait=20)
    assert row is not None and row["status"] == "cancelled"
    assert 3 <= row["completion_tokens"] < 3 * 600
    deadline = time.monotonic() + 20
    while running(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running(server) == 0


# -- logprobs ----------------------------------------------------------------------------

def check_chat_logprobs(content: list[Any], text: str, top: int) -> None:
    assert content and "".join(t.token for t in content) == text
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == top
        alternatives = [a.logprob for a in t.top_logprobs]
        assert alternatives == sorted(alternatives, reverse=True)
        assert t.logprob == pytest.approx(alternatives[0])  # greedy takes the best
        assert t.bytes == list(t.token.encode())


def test_chat_logprobs_streamed_and_not(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=FRUIT, max_tokens=10,
                                           temperature=0, logprobs=True, top_logprobs=3)
    choice = whole.choices[0]
    check_chat_logprobs(choice.logprobs.content, choice.message.content, 3)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=FRUIT, max_tokens=10, temperature=0, logprobs=True,
        top_logprobs=3, stream=True))
    streamed = [t for c in chunks for ch in c.choices if ch.logprobs
                for t in ch.logprobs.content or []]
    assert [(t.token, t.logprob) for t in streamed] == [
        (t.token, t.logprob) for t in choice.logprobs.content]
    plain = client.chat.completions.create(model=MODEL, messages=FRUIT, max_tokens=4)
    assert plain.choices[0].logprobs is None


def test_logprobs_are_the_raw_distribution(client: openai.OpenAI) -> None:
    """Before sampling filters: the first token's alternatives do not depend on the
    temperature or top_p the request samples with."""
    def first(**sampling: Any) -> list[tuple[str, float]]:
        resp = client.chat.completions.create(model=MODEL, messages=FRUIT, max_tokens=1,
                                              logprobs=True, top_logprobs=5, **sampling)
        return [(a.token, a.logprob) for a in resp.choices[0].logprobs.content[0].top_logprobs]

    greedy, hot = first(temperature=0), first(temperature=1.8, top_p=0.5, seed=1)
    assert [t for t, _ in greedy] == [t for t, _ in hot]
    assert [lp for _, lp in greedy] == pytest.approx([lp for _, lp in hot], abs=1e-4)


def test_completion_logprobs_streamed_and_not(client: openai.OpenAI) -> None:
    prompt = "The capital of France is"
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8,
                                      temperature=0, logprobs=3)
    lp = whole.choices[0].logprobs
    assert "".join(lp.tokens) == whole.choices[0].text
    made = whole.usage.completion_tokens - (whole.choices[0].finish_reason == "stop")
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(
        lp.text_offset) == made  # the end-of-text token is not text
    for token, value, top, offset in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs,
                                         lp.text_offset, strict=True):
        assert value <= 0 and token in top and 3 <= len(top) <= 4
        assert max(top.values()) == pytest.approx(value)
        assert whole.choices[0].text[offset:].startswith(token)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=8,
                                            temperature=0, logprobs=3, stream=True))
    tokens = [t for c in chunks for ch in c.choices if ch.logprobs for t in ch.logprobs.tokens]
    offsets = [o for c in chunks for ch in c.choices if ch.logprobs
               for o in ch.logprobs.text_offset]
    assert tokens == lp.tokens and offsets == lp.text_offset
    zero = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3,
                                     temperature=0, logprobs=0)  # 0 is a value, not "off"
    assert zero.choices[0].logprobs.token_logprobs == lp.token_logprobs[:3]
    assert all(len(top) == 1 for top in zero.choices[0].logprobs.top_logprobs)


# -- echo and several prompts ------------------------------------------------------------

def test_echo_puts_the_prompt_first(client: openai.OpenAI) -> None:
    prompt = "Once upon a time"
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6,
                                      temperature=0)
    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6,
                                       temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + plain.choices[0].text
    chunks = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6,
                                       temperature=0, echo=True, stream=True)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == echoed.choices[0].text


def test_two_prompts_times_n_two(client: openai.OpenAI, server: Server) -> None:
    prompts = ["The sky is", "My favourite number is"]
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=5, temperature=0)
             for p in prompts]
    both = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5,
                                     temperature=0, n=2)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    texts = [c.text for c in both.choices]
    assert texts == [alone[0].choices[0].text] * 2 + [alone[1].choices[0].text] * 2
    assert both.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert both.usage.completion_tokens == 2 * sum(a.usage.completion_tokens for a in alone)
    row = usage_row(server, both.id)
    assert row is not None and row["completion_tokens"] == both.usage.completion_tokens
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(model=MODEL, prompt=prompts, max_tokens=5,
                                           temperature=0, n=2, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[i] for i in range(4)] == texts


# -- logit_bias --------------------------------------------------------------------------

def test_logit_bias_bans_and_forces_a_token(client: openai.OpenAI) -> None:
    prompt = "banana banana banana banana banana banana"
    free = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8,
                                     temperature=0, logprobs=0)
    assert " banana" in free.choices[0].logprobs.tokens
    for sampling in ({"temperature": 0}, {"temperature": 1.0, "seed": 5}):
        banned = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8,
                                           logprobs=0, logit_bias={str(BANANA): -100},
                                           **sampling)
        assert " banana" not in banned.choices[0].logprobs.tokens
    forced = client.chat.completions.create(model=MODEL, messages=FRUIT, max_tokens=5,
                                            temperature=1.0, seed=2,
                                            logit_bias={str(BANANA): 100})
    assert forced.choices[0].message.content == " banana" * 5


# -- bad values --------------------------------------------------------------------------

CHAT = {"model": MODEL, "messages": FRUIT, "max_tokens": 4}
TEXT = {"model": MODEL, "prompt": "Hello", "max_tokens": 4}


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", {**CHAT, "n": 17}, "n"),
    ("/v1/chat/completions", {**CHAT, "n": 400}, "n"),
    ("/v1/chat/completions", {**CHAT, "n": 0}, "n"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "logprobs": False, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "logprobs": 3}, "logprobs"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"abc": 1}}, "logit_bias"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"-5": 1}}, "logit_bias"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"49152": 1}}, "logit_bias"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {str(i): 1 for i in range(301)}},
     "logit_bias"),
    ("/v1/completions", {**TEXT, "logprobs": 6}, "logprobs"),
    ("/v1/completions", {**TEXT, "logprobs": True}, "logprobs"),
    ("/v1/completions", {**TEXT, "best_of": 2}, "best_of"),
    ("/v1/completions", {**TEXT, "echo": True, "logprobs": 1}, "echo"),
    ("/v1/completions", {**TEXT, "echo": True, "prompt": [504, 7042]}, "echo"),
    ("/v1/completions", {**TEXT, "prompt": ["a"] * 33}, "prompt"),
    ("/v1/completions", {**TEXT, "prompt": ["a"] * 8, "n": 9}, "n"),
    ("/v1/completions", {**TEXT, "prompt": ["a", ""]}, "prompt"),
])
def test_bad_values_are_400_naming_the_field(http: httpx.Client, path: str,
                                             body: dict[str, Any], param: str) -> None:
    resp = http.post(path, json=body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param


def test_best_of_equal_to_n_is_plain_n(http: httpx.Client) -> None:
    resp = http.post("/v1/completions", json={**TEXT, "best_of": 2, "n": 2,
                                               "temperature": 0})
    assert resp.status_code == 200, resp.text
    assert [c["index"] for c in resp.json()["choices"]] == [0, 1]


def test_the_reservation_covers_every_choice(server: Server) -> None:
    """Limits and budget holds are sized for n x max_tokens before anything runs."""
    with server.admin() as root:
        org = root.post("/organizations", json={"name": "choices-tpm"}).json()
        proj = root.post("/projects", json={"organization_id": org["id"], "name": "main",
                                             "tpm_limit": 1000}).json()
        key = root.post("/keys", json={"project_id": proj["id"], "name": "k"}).json()
    http = httpx.Client(base_url=server.base_url, timeout=120,
                        headers={"Authorization": f"Bearer {key['secret']}"})
    body = {**CHAT, "max_tokens": 300, "temperature": 0}
    refused = http.post("/v1/chat/completions", json={**body, "n": 4})
    assert refused.status_code == 429, refused.text
    assert "tokens per minute" in refused.json()["error"]["message"]
    small = http.post("/v1/chat/completions", json={**body, "max_tokens": 2, "n": 4})
    assert small.status_code == 200, small.text
