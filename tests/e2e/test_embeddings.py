"""/v1/embeddings with the official openai client against a live server and the real model."""

from __future__ import annotations

import base64
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest

from tests.conftest import Server
from tests.e2e.test_errors import assert_error
from tests.e2e.test_openai_api import usage_row

MODEL = "smollm2-135m-instruct"
WIDTH = 576  # SmolLM2-135M's n_embd
SENTENCES = [f"Sentence number {i} is about {topic}." for i, topic in enumerate(
    ["the sea", "a castle", "green tea", "the moon", "old trains", "rain", "a fox",
     "winter"] * 4)]


@pytest.fixture
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=server.keys["alpha"],
                         max_retries=0, timeout=120)


def vectors(client: openai.OpenAI, inputs: str | list[str] | list[list[int]],
            **extra: object) -> np.ndarray:
    resp = client.embeddings.create(model=MODEL, input=inputs, encoding_format="float",
                                    **extra)
    assert [d.index for d in resp.data] == list(range(len(resp.data)))
    return np.array([d.embedding for d in resp.data], dtype=np.float64)


def test_shape_norm_and_determinism(client: openai.OpenAI) -> None:
    resp = client.embeddings.create(model=MODEL, input="The sky is blue.",
                                    encoding_format="float")
    assert resp.object == "list" and resp.model == MODEL and len(resp.data) == 1
    vec = np.array(resp.data[0].embedding)
    assert vec.shape == (WIDTH,) and resp.data[0].object == "embedding"
    assert abs(np.linalg.norm(vec) - 1.0) < 1e-5
    again = vectors(client, "The sky is blue.")[0]
    assert np.array_equal(vec, again)
    other = vectors(client, "Quarterly revenue grew by four percent.")[0]
    assert float(vec @ other) < 0.999  # different texts, different vectors


def test_an_input_alone_equals_it_inside_a_batch_of_32(client: openai.OpenAI) -> None:
    batch = vectors(client, SENTENCES)
    assert batch.shape == (32, WIDTH)
    assert np.allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    for i in (0, 7, 31):
        alone = vectors(client, SENTENCES[i])[0]
        assert np.abs(alone - batch[i]).max() < 1e-5, i


def test_concurrent_requests_each_get_their_own_vectors(client: openai.OpenAI) -> None:
    """Inputs of concurrent requests share decodes; each answer keeps its own order."""
    alone = {s: vectors(client, s)[0] for s in SENTENCES[:8]}
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: vectors(client, [SENTENCES[i], SENTENCES[7 - i]]),
                            range(8)))
    for i, pair in enumerate(got):
        assert np.abs(pair[0] - alone[SENTENCES[i]]).max() < 1e-5
        assert np.abs(pair[1] - alone[SENTENCES[7 - i]]).max() < 1e-5


def test_base64_decodes_to_the_float_vectors(client: openai.OpenAI) -> None:
    floats = vectors(client, SENTENCES[:3])
    resp = client.embeddings.create(model=MODEL, input=SENTENCES[:3], encoding_format="base64")
    decoded = np.array([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4")
                        for d in resp.data], dtype=np.float64)
    assert np.array_equal(decoded, floats)
    # the SDK's default asks for base64 and decodes it itself
    default = client.embeddings.create(model=MODEL, input=SENTENCES[:3])
    assert np.array_equal(np.array([d.embedding for d in default.data]), floats)


def test_token_arrays_are_embedded_and_counted(client: openai.OpenAI) -> None:
    resp = client.embeddings.create(model=MODEL, input=[[1, 2, 3, 4], [1, 2, 3, 4], [5, 6]],
                                    encoding_format="float")
    assert resp.usage.prompt_tokens == 10
    arrays = np.array([d.embedding for d in resp.data])
    assert np.abs(arrays[0] - arrays[1]).max() < 1e-5
    assert np.abs(arrays[0] - arrays[2]).max() > 1e-3
    assert np.abs(vectors(client, [1, 2, 3, 4])[0] - arrays[0]).max() < 1e-5


def test_usage_row_has_prompt_tokens_and_the_models_price(client: openai.OpenAI,
                                                          server: Server) -> None:
    admin = server.admin()
    assert admin.put(f"/prices/{MODEL}", json={"input_per_million": "3",
                                               "output_per_million": "5"}).status_code == 200
    try:
        time.sleep(2.1)  # the server re-reads prices every 2 s
        raw = client.embeddings.with_raw_response.create(model=MODEL, input=SENTENCES[:4],
                                                         user="end-user-7")
        resp = raw.parse()
        request_id = raw.headers["x-request-id"]
        assert request_id.startswith("embd-")
        row = usage_row(server, request_id)
        assert row is not None
        assert row["model"] == MODEL and row["status"] == "completed"
        assert row["prompt_tokens"] == resp.usage.prompt_tokens == resp.usage.total_tokens > 4
        assert row["completion_tokens"] == 0 and row["cached_tokens"] == 0
        assert row["cost_pico"] == resp.usage.prompt_tokens * 3_000_000
    finally:
        admin.put(f"/prices/{MODEL}", json={"input_per_million": 0, "output_per_million": 0})


def test_embeddings_count_against_the_token_limit(server: Server) -> None:
    key = server.cli("keys", "create", "--project", "embed-tpm", "--tpm", "40"
                     ).strip().splitlines()[-1]
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0)
    client.embeddings.create(model=MODEL, input="short")
    with pytest.raises(openai.RateLimitError):
        client.embeddings.create(model=MODEL, input=" ".join(["word"] * 60))


@pytest.fixture
def http(server: Server) -> httpx.Client:
    headers = {"Authorization": f"Bearer {server.keys['alpha']}"}
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=60) as client:
        yield client


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"input": ""}, "input", None),
    ({"input": []}, "input", None),
    ({"input": ["fine", ""]}, "input", None),
    ({"input": [[]]}, "input", None),
    ({"input": [[1, 2], [-3]]}, "input", None),
    ({"input": [[10**9]]}, "input", None),
    ({"input": ["x"] * 2049}, "input", None),
    ({"input": "word " * 1100}, "input", "context_length_exceeded"),
    ({"input": "hi", "dimensions": 64}, "dimensions", None),
    ({"input": "hi", "encoding_format": "int8"}, "encoding_format", None),
    ({"input": 42}, "input", None),
])
def test_bad_input_is_400_naming_the_field(http: httpx.Client, server: Server, body: dict,
                                           param: str, code: str | None) -> None:
    resp = http.post("/v1/embeddings", json={"model": MODEL, **body})
    assert_error(resp, 400, code, param)
    assert httpx.get(server.base_url + "/healthz").status_code == 200


def test_unknown_model_is_404(http: httpx.Client) -> None:
    assert_error(http.post("/v1/embeddings", json={"model": "nope", "input": "hi"}), 404,
                 "model_not_found", "model")


def test_models_say_which_embed(client: openai.OpenAI) -> None:
    (model,) = client.models.list().data
    assert set(model.capabilities) == {"generate", "embed"}  # type: ignore[attr-defined]
