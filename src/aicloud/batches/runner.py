"""Running batches: each server claims the live batches no live server runs and drives
each one, a window of lines at a time, through an injected `LineExecutor` (the API's own
path for one request: limits, budget, engine, ledger).

Lines wait in the engines' queues in the batch class, so any interactive request starts
first; the windows of several tenants' batches meet in the same fair queue, which shares
the capacity left between their projects. A line refused for now (rate limits, a full
queue) is tried again after the refusal's retry-after; a line the budget no longer covers
stops the batch: lines already running finish, the rest fail with `insufficient_quota`.

Crash safety: the answer of a line is written in its usage row's transaction, under a
request id naming the attempt, and lines run outside the progress journal. A SIGKILL
leaves running lines pending and unbilled; the next owner runs them again under new
attempt ids. Output files are made from the database rows alone, with ids derived from
the batch's, so finishing twice writes the same files.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy.exc import DBAPIError

from aicloud.accounts.base import now
from aicloud.accounts.keys import Principal
from aicloud.batches.store import Answered, BatchStore, BatchView, LineState, Status, Todo
from aicloud.billing.usage import Alongside
from aicloud.files import jsonl
from aicloud.files.store import FileStore
from aicloud.store.direct import DatabaseUnavailable
from aicloud.store.tables import StoredFile

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 32  # lines of one batch in flight at once: enough to fill the engine


@dataclass(slots=True, frozen=True)
class LineCall:
    """One attempt at one line. `answer` makes the line's answer (status code, body) a
    write for the transaction of the attempt's usage row."""

    principal: Principal
    endpoint: str
    body: dict[str, Any]
    request_id: str
    answer: Callable[[int, dict[str, Any]], Alongside]


@dataclass(slots=True, frozen=True)
class LineOutcome:
    status_code: int
    body: dict[str, Any]
    recorded: bool = False  # the answer was written with the usage row
    retry_after: float | None = None  # refused for now: run it again later
    out_of_budget: bool = False  # the budget is spent: the batch stops


class LineExecutor(Protocol):
    async def __call__(self, call: LineCall) -> LineOutcome: ...


PrincipalOf = Callable[[str], Awaitable[Principal | None]]


def derived_file_id(batch_id: str, kind: str) -> str:
    return "file-" + hashlib.blake2b(f"{batch_id}:{kind}".encode(), digest_size=12).hexdigest()


def output_line(batch_id: str, answered: Answered) -> bytes:
    """OpenAI's line: `custom_id`, `response` (status_code, request_id, body) or `error`."""
    line_id = "batch_req_" + hashlib.blake2b(f"{batch_id}:{answered.line}".encode(),
                                             digest_size=12).hexdigest()
    answer = answered.answer or {}
    if answered.status_code is None:
        response, error = None, answer.get("error")
    else:
        response = {"status_code": answered.status_code, "request_id": answered.request_id,
                    "body": answer}
        error = None
    return (json.dumps({"id": line_id, "custom_id": answered.custom_id, "response": response,
                        "error": error}, ensure_ascii=False) + "\n").encode()


class BatchRunner:
    def __init__(self, store: BatchStore, files: FileStore, execute: LineExecutor,
                 principal_of: PrincipalOf, instance: str, window: int = DEFAULT_WINDOW,
                 poll: float = 1.0) -> None:
        self.store, self.files, self.execute = store, files, execute
        self.principal_of = principal_of
        self.instance, self.window, self.poll = instance, window, poll
        self._driving: dict[str, asyncio.Task[None]] = {}

    async def run(self) -> None:
        """The server's batch task: claim, drive, repeat; stops its batches when cancelled
        (their running lines are left pending, for the next start)."""
        try:
            while True:
                try:
                    claimed = await self.store.claim(self.instance)
                except (DBAPIError, DatabaseUnavailable) as exc:  # an outage: wait it out
                    log.debug("batch runner waits for the database: %s", type(exc).__name__)
                    claimed = []
                for batch_id in claimed:
                    if batch_id not in self._driving:
                        self._start(batch_id)
                await asyncio.sleep(self.poll)
        finally:
            for task in list(self._driving.values()):
                task.cancel()

    def _start(self, batch_id: str) -> None:
        task = asyncio.create_task(self._drive_safely(batch_id))
        self._driving[batch_id] = task
        task.add_done_callback(lambda _: self._driving.pop(batch_id, None))

    async def _drive_safely(self, batch_id: str) -> None:
        try:
            await self.drive(batch_id)
        except asyncio.CancelledError:
            raise
        except (DBAPIError, DatabaseUnavailable) as exc:  # an outage: the next round retries
            log.debug("batch %s waits for the database: %s", batch_id, type(exc).__name__)
            await asyncio.sleep(self.poll)
        except Exception:  # the next claim round takes it up again
            log.exception("batch %s: driving failed; retrying shortly", batch_id)
            await asyncio.sleep(self.poll)

    async def drive(self, batch_id: str) -> None:
        batch = await self.store.get(None, batch_id)
        if batch.status is Status.VALIDATING and not await self._validate(batch):
            return
        running: dict[int, asyncio.Task[LineOutcome]] = {}
        resume_at = 0.0
        stop: tuple[Status, str, str] | None = None
        try:
            while True:
                batch = await self.store.get(None, batch_id)
                stop = stop or self._stop_reason(batch)
                if stop is not None:
                    if running:
                        await asyncio.wait(running.values())
                    await self._end(batch, *stop)
                    return
                principal = await self.principal_of(batch.api_key_id)
                if principal is None:
                    stop = (Status.FAILED, "invalid_api_key",
                            "The API key that created this batch was revoked or expired.")
                    continue
                todo: list[Todo] = []
                if time.monotonic() >= resume_at:
                    todo = await self.store.pending(batch_id, set(running),
                                                    self.window - len(running))
                if not todo and not running:
                    if time.monotonic() < resume_at:
                        await asyncio.sleep(min(self.poll, resume_at - time.monotonic()))
                        continue
                    await self._end(batch, Status.COMPLETED, "", "")
                    return
                for item in todo:
                    running[item.line] = asyncio.create_task(
                        self._line(batch, principal, item))
                done, _ = await asyncio.wait(running.values(), timeout=self.poll,
                                             return_when=asyncio.FIRST_COMPLETED)
                for line, task in list(running.items()):
                    if task not in done:
                        continue
                    del running[line]
                    outcome = task.result()
                    if outcome.out_of_budget:
                        stop = (Status.FAILED, "insufficient_quota",
                                str(outcome.body.get("error", {}).get("message", "")))
                    elif outcome.retry_after is not None:
                        resume_at = max(resume_at, time.monotonic() + outcome.retry_after)
        finally:
            for task in running.values():
                task.cancel()

    def _stop_reason(self, batch: BatchView) -> tuple[Status, str, str] | None:
        if batch.status is Status.CANCELLING:
            return (Status.CANCELLED, "batch_cancelled", "The batch was cancelled before "
                    "this request ran.")
        if batch.expires_at is not None and now() >= batch.expires_at:
            return (Status.EXPIRED, "batch_expired", "The batch's completion window ended "
                    "before this request ran.")
        return None

    async def _line(self, batch: BatchView, principal: Principal, item: Todo) -> LineOutcome:
        attempt = await self.store.next_attempt(batch.id, item.line)
        request_id = f"{batch.id}-{item.line}-{attempt}"

        def answer(status_code: int, body: dict[str, Any]) -> Alongside:
            return self.store.answer_job(batch.id, item.line, request_id, status_code, body)

        try:
            outcome = await self.execute(LineCall(principal, batch.endpoint, item.request,
                                                  request_id, answer))
        except Exception:
            log.exception("batch %s line %d failed", batch.id, item.line)
            outcome = LineOutcome(500, {"error": {"message": "internal server error",
                                                  "type": "server_error", "param": None,
                                                  "code": None}})
        if outcome.retry_after is None and not outcome.out_of_budget and not outcome.recorded:
            await self.store.answer(batch.id, item.line, request_id, outcome.status_code,
                                    outcome.body)
        return outcome

    async def _validate(self, batch: BatchView) -> bool:
        """Read the input file into lines (`in_progress`), or fail the batch naming the
        first line that cannot run on its endpoint."""
        lines = await self.files.lines(batch.project_id, batch.input_file_id)
        if lines is None:
            await self._fail(batch, "file_not_found", "The input file no longer exists.")
            return False
        try:
            requests = await asyncio.to_thread(jsonl.parse, lines)
        except jsonl.InvalidFile as exc:
            await self._fail(batch, "invalid_file", str(exc), exc.line)
            return False
        wrong = next((r for r in requests if r.url != batch.endpoint), None)
        if wrong is not None:
            await self._fail(batch, "mismatched_endpoint", f"The url {wrong.url} does not "
                             f"match the batch's endpoint {batch.endpoint}.", wrong.line)
            return False
        await self.store.start(batch.id, requests)
        return (await self.store.get(None, batch.id)).status is Status.IN_PROGRESS

    async def _fail(self, batch: BatchView, code: str, message: str,
                    line: int | None = None) -> None:
        await self.store.set_status(batch.id, Status.FAILED, [
            {"code": code, "message": message, "param": "input_file_id", "line": line}])

    async def _end(self, batch: BatchView, status: Status, code: str, message: str) -> None:
        """Fail what never ran (with `code`), write the output and error files from the
        rows, and give the batch its last status."""
        if code:
            await self.store.fail_rest(batch.id, code, message)
        if status is Status.COMPLETED:
            await self.store.set_status(batch.id, Status.FINALIZING)
        answers = await self.store.answers(batch.id)
        files: list[StoredFile] = []
        ids: dict[str, str | None] = {}
        for kind, wanted in (("output", LineState.COMPLETED), ("error", LineState.FAILED)):
            chosen = [a for a in answers if a.state is wanted]
            if not chosen:
                ids[kind] = None
                continue
            file_id = derived_file_id(batch.id, kind)
            data = b"".join(output_line(batch.id, a) for a in chosen)
            size = await asyncio.to_thread(self.files.storage.write, file_id, data)
            files.append(StoredFile(id=file_id, project_id=batch.project_id,
                                    purpose="batch_output", filename=f"{batch.id}_{kind}.jsonl",
                                    bytes=size, created_at=now()))
            ids[kind] = file_id
        errors = [{"code": code, "message": message, "param": None, "line": None}] \
            if status is Status.FAILED else None
        await self.store.finish(batch.id, status, files, ids["output"], ids["error"], errors)
        log.info("batch %s %s: %d lines", batch.id, status.value, len(answers))
