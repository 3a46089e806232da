"""`X-Request-Timeout: SECONDS` through a live server and the official openai client: a
bad value is a 400 naming the header; a request whose deadline the model's line cannot
meet is shed by the admission layer with a 503 and Retry-After, at no cost and with its
budget hold released, while one with a generous timeout is served."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.conftest import Server, start_server

MODEL = "smollm2-135m-instruct"
HEADER = "X-Request-Timeout"
PROMPT = [{"role": "user", "content": "Count from 1 to 500, one number per line."}]


@pytest.fixture(scope="module")
def priced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    """A server whose model is priced, and a key of a project with a budget, so every
    admitted request holds part of it."""
    srv = start_server(tmp_path_factory.mktemp("deadline"), "--context", "512",
                       "--sequences", "4")
    try:
        with srv.admin() as admin:
            org = admin.post("/organizations", json={"name": "late"}).json()
            project = admin.post("/projects", json={"organization_id": org["id"],
                                                    "name": "p", "budget_usd": "1000"}).json()
            secret = admin.post("/keys", json={"project_id": project["id"]}).json()["secret"]
            assert admin.put(f"/prices/{MODEL}", json={"input_per_million": 1,
                                                       "output_per_million": 1}
                             ).status_code == 200
        yield srv, secret
    finally:
        srv.stop()


def client_of(priced: tuple[Server, str]) -> openai.OpenAI:
    srv, secret = priced
    return openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key=secret, max_retries=0)


def ledger(srv: Server) -> tuple[list[tuple[Any, ...]], int]:
    """Every usage row (status, tokens, cost) and the number of live budget holds."""
    with sqlite3.connect(srv.db) as conn:
        rows = conn.execute("SELECT status, prompt_tokens, completion_tokens, cost_pico "
                            "FROM usage ORDER BY rowid").fetchall()
        held = conn.execute("SELECT count(*) FROM reservations").fetchone()[0]
    return rows, held


@pytest.mark.parametrize("value", ["soon", "0", "-1", "nan", "inf", ""])
def test_a_bad_timeout_is_a_400_naming_the_header(priced: tuple[Server, str],
                                                  value: str) -> None:
    client = client_of(priced)
    calls = [
        lambda: client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=2,
                                               extra_headers={HEADER: value}),
        lambda: client.completions.create(model=MODEL, prompt="1, 2,", max_tokens=2,
                                          extra_headers={HEADER: value}),
        lambda: client.responses.create(model=MODEL, input="Hi", max_output_tokens=16,
                                        extra_headers={HEADER: value}),
    ]
    for call in calls:
        with pytest.raises(openai.BadRequestError) as caught:
            call()
        assert isinstance(caught.value.body, dict) and caught.value.body["param"] == HEADER


def test_a_lost_deadline_is_shed_unbilled(priced: tuple[Server, str]) -> None:
    srv, _ = priced
    client = client_of(priced)
    before, _ = ledger(srv)
    # served, which also gives the model's line its service time (well over 1 ms), so a
    # 1 ms deadline is lost at its turn however fast the machine: nothing here is timed
    done = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=8,
                                          temperature=0, extra_headers={HEADER: "300"})
    assert done.choices[0].finish_reason == "length" and done.usage is not None
    busy = [client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=400,
                                           temperature=0, stream=True) for _ in range(2)]
    try:
        for stream in busy:  # both running
            next(iter(stream))
        late = [
            lambda: client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=8,
                                                   extra_headers={HEADER: "0.001"}),
            lambda: client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=8,
                                                   stream=True,
                                                   extra_headers={HEADER: "0.001"}),
            lambda: client.completions.create(model=MODEL, prompt="1, 2,", max_tokens=8,
                                              extra_headers={HEADER: "0.001"}),
            lambda: client.responses.create(model=MODEL, input="Hi", max_output_tokens=16,
                                            extra_headers={HEADER: "0.001"}),
        ]
        for call in late:
            with pytest.raises(openai.InternalServerError) as caught:
                call()
            shed = caught.value
            assert shed.status_code == 503 and int(shed.response.headers["retry-after"]) >= 1
            assert isinstance(shed.body, dict) and shed.body["code"] == "model_overloaded"
        # a generous timeout is served while the model is busy
        text = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=4,
                                         temperature=0, extra_headers={HEADER: "300"})
        assert text.choices[0].finish_reason == "length"
    finally:
        for stream in busy:
            stream.close()
    waited = time.monotonic() + 30  # the closed streams are billed in the background
    while True:
        rows, held = ledger(srv)
        new = rows[len(before):]
        if (len(new) >= 8 and held == 0) or time.monotonic() > waited:
            break
        time.sleep(0.2)
    # the shed ones cost nothing and produced nothing; their rows released their holds
    assert sorted(r for r in new if r[0] == "overloaded") == [("overloaded", 0, 0, 0)] * 4, new
    billed = [r for r in new if r[0] != "overloaded"]
    assert len(billed) == 4 and all(r[3] > 0 for r in billed), new  # done, busy x2, text
    assert held == 0, "a shed request's budget hold was not released"
