"""The Files and Batch APIs through the official openai client against a live server:
a batch runs to completion with OpenAI's output and error files, bad lines fail alone,
cancel and expiry stop a batch part way, a spent budget stops it without overspending,
embeddings batches, another project's ids are 404s, and the CLI sees every batch."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.billing.test_ledger import assert_counters_match_rows
from tests.conftest import Server, start_server

MODEL = "smollm2-135m-instruct"
OUTPUT_USD_PER_M = 1_000_000  # $1 per output token; a batch line pays half
MAX_FILE_BYTES = 65536


def chat_line(custom_id: str, content: str = "Say hello.", max_tokens: int = 6,
              **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "max_tokens": max_tokens, "temperature": 0,
                     "messages": [{"role": "user", "content": content}], **body}}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def client_for(srv: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key=key, max_retries=0)


def wait_for(client: openai.OpenAI, batch_id: str, statuses: tuple[str, ...],
             timeout: float = 180) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        assert time.monotonic() < deadline, f"batch stuck in {batch.status}"
        time.sleep(0.3)


def output_lines(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def usage_rows(srv: Server, batch_id: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(srv.db) as db:
        return db.execute("SELECT request_id, status, prompt_tokens, completion_tokens, "
                          "cost_pico FROM usage WHERE request_id LIKE ? ORDER BY request_id",
                          (f"{batch_id}-%",)).fetchall()


def submit(client: openai.OpenAI, lines: list[dict[str, Any]],
           endpoint: str = "/v1/chat/completions") -> Any:
    uploaded = client.files.create(file=("input.jsonl", jsonl(lines)), purpose="batch")
    return client.batches.create(input_file_id=uploaded.id, endpoint=endpoint,  # type: ignore[arg-type]
                                 completion_window="24h", metadata={"job": "test"})


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Two lines of a batch at a time, so a batch of a dozen is still running when a test
    cancels or expires it; output tokens at $1 (half for batch lines)."""
    home = tmp_path_factory.mktemp("batches")
    server = start_server(home, "--context", "1024", "--sequences", "8", extra_env={
        "AICLOUD_BATCH_WINDOW": "2", "AICLOUD_MAX_FILE_BYTES": str(MAX_FILE_BYTES)})
    with server.admin() as admin:
        assert admin.put(f"/prices/{MODEL}", json={
            "input_per_million": 0, "output_per_million": OUTPUT_USD_PER_M}).status_code == 200
    server.keys["a"] = server.new_key("batch-a")
    server.keys["b"] = server.new_key("batch-b")
    yield server
    server.stop()


def test_a_batch_runs_to_completion_with_output_and_error_files(srv: Server) -> None:
    client = client_for(srv, srv.keys["a"])
    lines = [chat_line(f"ok-{i}", f"Name a colour, {i}.") for i in range(4)]
    lines.insert(2, chat_line("bad-max-tokens", max_tokens=-5))
    lines.append(chat_line("bad-model", model="no-such-model"))
    lines.append(chat_line("bad-stream", stream=True))
    created = submit(client, lines)
    assert created.status == "validating" and created.metadata == {"job": "test"}
    batch = wait_for(client, created.id, ("completed", "failed"))
    assert batch.status == "completed", batch.errors
    assert (batch.request_counts.total, batch.request_counts.completed,
            batch.request_counts.failed) == (7, 4, 3)
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at

    answers = output_lines(client, batch.output_file_id)
    assert sorted(a["custom_id"] for a in answers) == [f"ok-{i}" for i in range(4)]
    rows = {row[0]: row for row in usage_rows(srv, batch.id)}
    for answer in answers:
        response = answer["response"]
        assert answer["error"] is None and response["status_code"] == 200
        body = response["body"]
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"]
        # billed once, under the request id the answer names, at the batch price
        _, status, _, completion, cost = rows.pop(response["request_id"])
        assert status in ("completed", "length")
        assert completion == body["usage"]["completion_tokens"]
        assert cost == completion * OUTPUT_USD_PER_M * 10**6 // 2
    assert rows == {}, "refused lines bill nothing"

    errors = {e["custom_id"]: e for e in output_lines(client, batch.error_file_id)}
    assert set(errors) == {"bad-max-tokens", "bad-model", "bad-stream"}
    assert errors["bad-max-tokens"]["response"]["status_code"] == 400
    assert errors["bad-max-tokens"]["response"]["body"]["error"]["param"] == "max_tokens"
    assert errors["bad-model"]["response"]["status_code"] == 404
    assert errors["bad-stream"]["response"]["body"]["error"]["param"] == "stream"

    listed = [b.id for b in client.batches.list()]
    assert created.id in listed
    shown = json.loads(srv.cli("batches", "show", created.id))
    assert shown["status"] == "completed" and shown["request_counts"]["completed"] == 4
    assert created.id in srv.cli("batches", "list")


def test_embeddings_batch(srv: Server) -> None:
    client = client_for(srv, srv.keys["a"])
    lines = [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": MODEL, "input": f"text {i}"}} for i in range(2)]
    batch = wait_for(client, submit(client, lines, "/v1/embeddings").id,
                     ("completed", "failed"))
    answers = output_lines(client, batch.output_file_id)
    assert len(answers) == 2
    for answer in answers:
        vector = answer["response"]["body"]["data"][0]["embedding"]
        assert len(vector) > 100
    assert len(usage_rows(srv, batch.id)) == 2


def test_files_api_checks_lists_serves_and_deletes(srv: Server) -> None:
    client = client_for(srv, srv.keys["a"])
    bad = jsonl([chat_line("a"), chat_line("b")]) + b"{oops\n" + jsonl([chat_line("c")])
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("bad.jsonl", bad), purpose="batch")
    assert "line 3" in caught.value.message and caught.value.param == "file"
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("x.jsonl", jsonl([chat_line("a")])), purpose="fine-tune")
    assert caught.value.param == "purpose"
    with pytest.raises(openai.APIStatusError) as too_big:
        client.files.create(file=("big.jsonl", jsonl([chat_line(
            "a", "x" * MAX_FILE_BYTES)])), purpose="batch")
    assert too_big.value.status_code == 413

    data = jsonl([chat_line("a")])
    made = client.files.create(file=("../../etc/in.jsonl", data), purpose="batch")
    assert made.filename == "in.jsonl" and made.bytes == len(data) and made.purpose == "batch"
    assert client.files.retrieve(made.id).id == made.id
    assert client.files.content(made.id).content == data
    assert made.id in [f.id for f in client.files.list(purpose="batch")]
    assert client.files.delete(made.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(made.id)
    with pytest.raises(openai.BadRequestError):  # not multipart
        client.post("/files", body={"purpose": "batch"}, cast_to=httpx.Response)


def test_another_projects_ids_are_404(srv: Server) -> None:
    a, b = client_for(srv, srv.keys["a"]), client_for(srv, srv.keys["b"])
    batch = submit(a, [chat_line("x")])
    file_id = batch.input_file_id
    for call in (lambda: b.files.retrieve(file_id), lambda: b.files.content(file_id),
                 lambda: b.files.delete(file_id), lambda: b.batches.retrieve(batch.id),
                 lambda: b.batches.cancel(batch.id),
                 lambda: b.batches.create(input_file_id=file_id,
                                          endpoint="/v1/chat/completions",
                                          completion_window="24h")):
        with pytest.raises(openai.NotFoundError):
            call()
    assert batch.id not in [x.id for x in b.batches.list()]
    assert file_id not in [f.id for f in b.files.list()]
    done = wait_for(a, batch.id, ("completed",))
    with pytest.raises(openai.NotFoundError):
        b.files.content(done.output_file_id or "")


def test_cancel_mid_way_keeps_answered_lines_and_fails_the_rest(srv: Server) -> None:
    client = client_for(srv, srv.keys["a"])
    batch = submit(client, [chat_line(f"c{i}", max_tokens=24) for i in range(12)])
    deadline = time.monotonic() + 120
    while client.batches.retrieve(batch.id).request_counts.completed < 1:  # type: ignore[union-attr]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    done = wait_for(client, batch.id, ("cancelled",))
    counts = done.request_counts
    assert counts.total == 12 and counts.completed + counts.failed == 12
    assert 1 <= counts.completed < 12
    errors = output_lines(client, done.error_file_id)
    assert len(errors) == counts.failed
    assert all(e["error"]["code"] == "batch_cancelled" and e["response"] is None
               for e in errors)
    assert len(output_lines(client, done.output_file_id)) == counts.completed
    assert len(usage_rows(srv, batch.id)) == counts.completed
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(submit_and_finish(client).id)


def submit_and_finish(client: openai.OpenAI) -> Any:
    return wait_for(client, submit(client, [chat_line("one")]).id, ("completed",))


def test_a_batch_past_its_window_expires(srv: Server) -> None:
    client = client_for(srv, srv.keys["a"])
    batch = submit(client, [chat_line(f"x{i}", max_tokens=24) for i in range(10)])
    wait_for(client, batch.id, ("in_progress",))
    with sqlite3.connect(srv.db) as db:
        db.execute("UPDATE batches SET expires_at = '2000-01-01 00:00:00.000000' "
                   "WHERE id = ?", (batch.id,))
    done = wait_for(client, batch.id, ("expired",))
    assert done.expired_at and done.request_counts.failed >= 1  # type: ignore[union-attr]
    assert {e["error"]["code"] for e in output_lines(client, done.error_file_id)} == {
        "batch_expired"}


def test_a_spent_budget_stops_the_batch_without_overspending(srv: Server) -> None:
    budget_usd = 10  # a line of 8 tokens holds $4 at the batch price: two at a time fit
    with srv.admin() as admin:
        org = admin.post("/organizations", json={"name": "tight"}).json()
        project = admin.post("/projects", json={"organization_id": org["id"], "name": "t",
                                                "budget_usd": str(budget_usd)}).json()
        key = admin.post("/keys", json={"project_id": project["id"]}).json()["secret"]
    client = client_for(srv, key)
    lines = [chat_line(f"b{i}", "Count to twenty.", max_tokens=8) for i in range(8)]
    done = wait_for(client, submit(client, lines).id, ("completed", "failed"))
    assert done.status == "failed"
    assert done.errors and done.errors.data and done.errors.data[0].code == "insufficient_quota"
    counts = done.request_counts
    assert counts.completed >= 1 and counts.failed >= 1
    assert counts.completed + counts.failed == 8
    errors = output_lines(client, done.error_file_id)
    assert {e["error"]["code"] for e in errors} == {"insufficient_quota"}
    spent = sum(row[4] for row in usage_rows(srv, done.id))
    assert 0 < spent <= budget_usd * 10**12
    assert_counters_match_rows(f"sqlite:///{srv.db}")


def test_two_projects_batches_run_side_by_side(srv: Server) -> None:
    """Neither waits for the other to finish: their lines interleave in the engine."""
    a, b = client_for(srv, srv.keys["a"]), client_for(srv, srv.keys["b"])
    ids = [submit(c, [chat_line(f"{n}{i}", max_tokens=16) for i in range(6)]).id
           for n, c in (("a", a), ("b", b))]
    for client, batch_id in zip((a, b), ids, strict=True):
        assert wait_for(client, batch_id, ("completed",)).request_counts.completed == 6  # type: ignore[union-attr]
    with sqlite3.connect(srv.db) as db:
        first_a, last_a, first_b, last_b = (db.execute(
            f"SELECT {f}(finished_at) FROM batch_lines WHERE batch_id = ?", (batch_id,)
        ).fetchone()[0] for batch_id in ids for f in ("min", "max"))
    assert first_b < last_a and first_a < last_b


def test_cli_cancel_refuses_a_finished_batch(srv: Server) -> None:
    finished = submit_and_finish(client_for(srv, srv.keys["a"]))
    with pytest.raises(subprocess.CalledProcessError) as caught:
        srv.cli("batches", "cancel", finished.id)
    assert "cannot be cancelled" in caught.value.stderr




def line_states(url: str, batch_id: str) -> list[tuple[Any, ...]]:
    from sqlalchemy import create_engine, text

    from aicloud.store import db

    engine = create_engine(db.sync_url(url))
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT line, state, attempts, request_id FROM batch_lines "
                                 "WHERE batch_id = :b ORDER BY line"), {"b": batch_id}).all()
    engine.dispose()
    return [tuple(r) for r in rows]


def billed(url: str, batch_id: str) -> list[tuple[Any, ...]]:
    from sqlalchemy import create_engine, text

    from aicloud.store import db

    engine = create_engine(db.sync_url(url))
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT request_id, status, completion_tokens, cost_pico "
                                 "FROM usage WHERE request_id LIKE :b"),
                            {"b": f"{batch_id}-%"}).all()
    engine.dispose()
    return [tuple(r) for r in rows]


def test_sigkill_mid_batch_answers_and_bills_every_line_once(db_url: str,
                                                             tmp_path: Path) -> None:
    """Killed with lines running and lines done, restarted on the same home and port:
    the batch completes, each line has one answer and one usage row (the one its answer
    names), and lines cut by the kill ran again under a new attempt."""
    home = tmp_path / "home"
    env = {"AICLOUD_DATABASE_URL": db_url, "AICLOUD_BATCH_WINDOW": "3"}
    args = ("--context", "1024", "--sequences", "4")
    first = start_server(home, *args, extra_env=env)
    port = int(first.base_url.rsplit(":", 1)[1])
    try:
        with first.admin() as admin:
            assert admin.put(f"/prices/{MODEL}", json={
                "input_per_million": 0, "output_per_million": OUTPUT_USD_PER_M}
            ).status_code == 200
        key = first.new_key("crash")
        client = client_for(first, key)
        total = 15  # three at a time: most are still to run at the kill, however fast
        # lines long enough (96 tokens, greedy) that those cut by the kill have run past
        # a progress-journal tick: were lines journaled, they would be billed twice
        batch = submit(client, [chat_line(f"k{i}", f"Count from {i} to 999.", max_tokens=96)
                                for i in range(total)])
        deadline = time.monotonic() + 120
        while True:
            states = line_states(db_url, batch.id)
            done = sum(state != "pending" for _, state, _, _ in states)
            if done >= 3:
                time.sleep(1.5)
                break
            assert time.monotonic() < deadline, "the batch never got going"
            time.sleep(0.05)
        first.process.kill()
        first.process.wait(10)
    finally:
        first.stop()
    at_kill = line_states(db_url, batch.id)
    assert any(state == "pending" for _, state, _, _ in at_kill), "killed too late"

    again = start_server(home, *args, port=port, extra_env=env)
    try:
        client = client_for(again, key)
        finished = wait_for(client, batch.id, ("completed",))
        answers = output_lines(client, finished.output_file_id)
    finally:
        again.stop()
    assert finished.request_counts.completed == total  # type: ignore[union-attr]
    assert sorted(a["custom_id"] for a in answers) == sorted(f"k{i}" for i in range(total))
    rows = {request_id: rest for request_id, *rest in billed(db_url, batch.id)}
    assert len(rows) == total, "one usage row per line, however often it started"
    for answer in answers:
        status, completion, cost = rows[answer["response"]["request_id"]]
        assert status in ("completed", "length")
        assert completion == answer["response"]["body"]["usage"]["completion_tokens"]
        assert cost == completion * OUTPUT_USD_PER_M * 10**6 // 2
    final = line_states(db_url, batch.id)
    cut = [line for line, state, attempts, _ in at_kill if state == "pending" and attempts]
    assert cut, "no line was running at the kill"
    assert all(attempts >= 2 for line, _, attempts, _ in final if line in cut)
    assert_counters_match_rows(db_url)
