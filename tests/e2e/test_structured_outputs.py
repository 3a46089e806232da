"""Structured outputs through the official openai client, LangChain and instructor, against
a live server with the real bundled model: every answer is constrained while it is made."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from tests.conftest import Server

MODEL = "smollm2-135m-instruct"
PROMPT = [{"role": "user", "content": "Describe a book you like."}]
BOOK = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 20},
    "rating": {"type": "integer", "minimum": 1, "maximum": 5},
    "genre": {"enum": ["drama", "comedy", "horror", "poetry"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 2},
    "author": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 16},
        "born": {"type": "integer", "minimum": 1500, "maximum": 2020},
    }, "required": ["name", "born"], "additionalProperties": False},
}, "required": ["title", "rating", "genre", "tags", "author"], "additionalProperties": False}


def book_format(schema: dict[str, Any] = BOOK) -> dict[str, Any]:
    return {"type": "json_schema",
            "json_schema": {"name": "book", "schema": schema, "strict": True}}


class Author(BaseModel):
    # extra="forbid" is additionalProperties: false, which instructor does not add itself:
    # without it the schema allows any further keys, and a small model keeps adding them
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=16)
    born: int = Field(ge=1500, le=2020)


class Book(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str = Field(max_length=20)
    genre: Literal["drama", "comedy", "horror", "poetry"]
    author: Author


@pytest.fixture
def client(server: Server) -> openai.OpenAI:
    """A long timeout: fifty constrained answers share two cores with the rest of the
    suite."""
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=server.keys["alpha"],
                         max_retries=0, timeout=600)


@pytest.fixture
def http(server: Server) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, timeout=60,
                        headers={"Authorization": f"Bearer {server.keys['alpha']}"})


def validate(value: Any, schema: dict[str, Any]) -> None:
    """jsonschema when installed; the pydantic twin of BOOK otherwise."""
    try:
        import jsonschema
    except ImportError:
        Book.model_validate(value)
        assert 1 <= value["rating"] <= 5 and len(value["tags"]) <= 2
        return
    jsonschema.validate(value, schema)


def test_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(
        model=MODEL, messages=PROMPT, response_format=Book, max_tokens=120, temperature=0)
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, Book)
    assert message.parsed == Book.model_validate_json(message.content)


def test_strict_schema_holds_over_fifty_seeds(client: openai.OpenAI) -> None:
    """Nested objects, arrays, enums, bounds and required fields at temperature 1: every
    one of 50 answers is a valid instance, compact, and ends by itself."""
    def ask(seed: int) -> tuple[str, str | None]:
        resp = client.chat.completions.create(
            model=MODEL, messages=PROMPT, response_format=book_format(),  # type: ignore[arg-type]
            max_tokens=160, temperature=1.0, seed=seed)
        return resp.choices[0].finish_reason, resp.choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(50)))
    for finish, content in answers:
        assert finish == "stop" and content is not None
        value = json.loads(content)
        validate(value, BOOK)
        assert content == json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    assert len({content for _, content in answers}) > 10  # sampled, not one canned answer


def test_json_object(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=80, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Give me a JSON object about a cat."}])
    content = resp.choices[0].message.content
    if resp.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)
    else:
        assert content.startswith("{")


def test_streamed_deltas_join_into_valid_json(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=PROMPT, response_format=book_format(),  # type: ignore[arg-type]
        max_tokens=200, temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    validate(json.loads(text), BOOK)
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 3


def test_max_tokens_inside_the_json_is_length(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model=MODEL, messages=PROMPT, response_format=book_format(),  # type: ignore[arg-type]
        max_tokens=6, temperature=0)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 6
    assert resp.choices[0].message.content.startswith('{"title":"')
    with pytest.raises(openai.LengthFinishReasonError):
        client.chat.completions.parse(model=MODEL, messages=PROMPT, response_format=Book,
                                      max_tokens=6, temperature=0)


def test_completions_endpoint(client: openai.OpenAI) -> None:
    resp = client.completions.create(
        model=MODEL, prompt="A book, as JSON:", max_tokens=200, temperature=0,
        extra_body={"response_format": book_format()})
    assert resp.choices[0].finish_reason == "stop"
    validate(json.loads(resp.choices[0].text), BOOK)


@pytest.mark.parametrize("fmt", [
    {"type": "json_schema"},
    {"type": "json_schema", "json_schema": {"name": "x"}},
    {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strung"}}},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "pattern": "(unclosed"}}},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "$ref": "#/$defs/nowhere"}}},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": [1, 2]}},
    {"type": "json_object", "json_schema": {"name": "x", "schema": {}}},
    {"type": "xml"},
    {"type": "text", "extra": 1},
    "json",
])
def test_bad_response_formats_are_400(http: httpx.Client, fmt: Any) -> None:
    for path, body in (("/v1/chat/completions", {"messages": PROMPT}),
                       ("/v1/completions", {"prompt": "hi"})):
        resp = http.post(path, json={"model": MODEL, "response_format": fmt, **body})
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["param"] == "response_format" and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("schema", [
    {"enum": [f"value-{i}" for i in range(8_000)]},  # 100 KB
    {"allOf": [{"anyOf": [{"type": "object", "properties": {f"a{i}{j}": {"type": "string"}}}
                          for j in range(10)]} for i in range(6)]},
    json.loads('{"type":"array","items":' * 200 + '{"type":"string"}' + "}" * 200),
])
def test_pathological_schemas_are_refused_quickly(http: httpx.Client, schema: Any) -> None:
    t0 = time.perf_counter()
    resp = http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": PROMPT, "response_format": book_format(schema)})
    assert time.perf_counter() - t0 < 3.0
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "response_format"


def test_exponential_regex_stays_bounded(client: openai.OpenAI) -> None:
    """`[ab]*a[ab]{25}` has 2^25 DFA states; llguidance builds them lazily, so the answer
    comes within the client's timeout (no hang) and matches."""
    schema = {"type": "object", "properties": {"code": {
        "type": "string", "pattern": "^[ab]*a[ab]{25}$", "maxLength": 40}},
        "required": ["code"], "additionalProperties": False}
    resp = client.chat.completions.create(
        model=MODEL, messages=PROMPT, response_format=book_format(schema),  # type: ignore[arg-type]
        max_tokens=60, temperature=0)
    if resp.choices[0].finish_reason == "stop":
        code = json.loads(resp.choices[0].message.content)["code"]
        assert set(code) <= {"a", "b"} and code[-26] == "a"


def test_langchain_with_structured_output(server: Server) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=f"{server.base_url}/v1",
                     api_key=server.keys["alpha"], temperature=0, max_tokens=120,
                     max_retries=0, timeout=600)
    book = llm.with_structured_output(Book, method="json_schema").invoke(
        "Describe a book you like.")
    assert isinstance(book, Book)


def test_instructor(client: openai.OpenAI) -> None:
    import instructor

    patched = instructor.from_openai(client, mode=instructor.Mode.JSON_SCHEMA)
    book = patched.chat.completions.create(model=MODEL, messages=PROMPT,  # type: ignore[arg-type]
                                           response_model=Book, max_tokens=120,
                                           temperature=0, max_retries=0)
    assert isinstance(book, Book)
