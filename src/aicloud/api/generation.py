"""Running one generation for a caller: start it, stream or collect it, and bill it.

A request is one or more choices (`n`, and on /v1/completions several prompts), each its
own sequence in the engine. The first choice of each prompt starts at once; the others
start when it has produced its first token, so the engine finds the prompt in its cache
and shares it instead of computing it again (the llama.cpp slot table copies it from the
busy slot). Usage counts each prompt once, as OpenAI does, and every choice's tokens.

Usage is written before the last byte of the response leaves (so a 200 always has its
row); a client that goes away cancels every choice, and the tokens they already produced
are billed by a background task once the engine confirms the final counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import time
from collections import defaultdict
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from starlette.requests import Request

from aicloud.accounts.keys import Principal
from aicloud.api.admission import Admission, admit, withdraw
from aicloud.api.errors import APIError, error_body, invalid
from aicloud.api.schemas import MAX_CHOICES, SamplingFields
from aicloud.api.telemetry import Telemetry
from aicloud.billing.journal import InFlight
from aicloud.billing.usage import Alongside, UsageEntry
from aicloud.engines.base import (
    Constraint,
    Engine,
    EngineError,
    EngineOverloaded,
    FinishReason,
    GenerationRequest,
    GenerationStream,
    Priority,
    SamplingParams,
    TokenEvent,
    TokenLogprobs,
    Usage,
)
from aicloud.limits.policy import Ticket
from aicloud.services import Cloud

log = logging.getLogger(__name__)
T = TypeVar("T")

# a request's status is its choices' worst outcome, in this order
OUTCOMES = (FinishReason.ERROR, FinishReason.OVERLOADED, FinishReason.THROTTLED,
            FinishReason.CANCELLED, FinishReason.LENGTH, FinishReason.STOP)
STATUS = {
    FinishReason.STOP: "completed",
    FinishReason.LENGTH: "length",
    FinishReason.CANCELLED: "cancelled",
    FinishReason.ERROR: "error",
    FinishReason.OVERLOADED: "overloaded",
    FinishReason.THROTTLED: "throttled",
}


@dataclass(slots=True, frozen=True)
class Serving:
    """What running a generation needs from the server, whoever asks for it (an HTTP
    request, a batch line): built once by the app's lifespan."""

    cloud: Cloud
    background: set[asyncio.Task[Any]]  # work that outlives its request (billing)
    telemetry: Telemetry
    fair_share_by: str
    prefix_cache_scope: str


def serving(request: Request) -> Serving:
    found: Serving = request.app.state.serving  # set by create_app; Starlette's state is untyped
    return found


def refusal(reason: FinishReason, retry_after: float = 1.0) -> APIError:
    """A request the scheduler shed before it ran: 429 if its tenant floods the model,
    503 if the model is saturated for everyone."""
    seconds = str(max(1, round(retry_after)))
    if reason is FinishReason.THROTTLED or reason is None:
        return APIError(429, "Too many of your requests are waiting for this model; "
                        "retry later or send fewer at once.", code="rate_limit_exceeded",
                        headers={"retry-after": seconds})
    return APIError(503, "The model is overloaded; retry shortly.", code="model_overloaded",
                    headers={"retry-after": seconds})


def tenant_of(principal: Principal, share_by: str) -> str:
    return {"key": principal.api_key_id,
            "organization": principal.organization_id}.get(share_by, principal.project_id)


def cache_scope_of(principal: Principal, scope_by: str, salt: str | None) -> str:
    """Who may reuse whose cached prompt prefixes: the engines compare it as an opaque
    string, so it is hashed (no tenant id or salt travels to replicas or vLLM)."""
    material = f"{scope_by}\x1f{tenant_of(principal, scope_by)}\x1f{salt or ''}"
    return hashlib.blake2b(material.encode(), digest_size=16).hexdigest()


def sampling_from(body: SamplingFields) -> SamplingParams:
    try:
        return SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            min_p=body.min_p or 0.0,
            seed=body.seed,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
        )
    except EngineError as exc:
        raise invalid(exc.message, exc.param) from None


def failed(event: TokenEvent) -> bool:
    """A choice that ended without an answer: the whole request fails with it."""
    reason = event.finish_reason
    return reason is not None and (reason.refused or reason is FinishReason.ERROR)


def usage_json(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


@dataclass(slots=True)
class Choice:
    """One choice of a request: its own sequence in the engine."""

    index: int  # prompt index * n + sample index, as OpenAI numbers them
    stream: GenerationStream
    events: AsyncIterator[TokenEvent]
    head: TokenEvent | None = None  # the first event, read before the response began


@dataclass(slots=True)
class Completed:
    """A finished choice, for a whole (non-streamed) response."""

    index: int
    text: str
    finish: str
    logprobs: list[TokenLogprobs]


# a batch line's answer (the response body from a run's choices and usage), written by
# the transaction that writes the run's usage row
Answer = Callable[[list[Completed], Usage], Alongside]


@dataclass(slots=True)
class Run:
    request_id: str
    model: str
    admission: Admission
    engine: Engine
    n: int  # choices per prompt
    cloud: Cloud
    background: set[asyncio.Task[None]]
    telemetry: Telemetry
    choices: list[Choice] = field(default_factory=list)  # started, by index
    siblings: list[tuple[int, GenerationRequest]] = field(default_factory=list)  # not yet
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    created: int = field(default_factory=lambda: int(time.time()))
    recorded: bool = False
    progress: InFlight | None = None  # its entry in the progress journal
    answer: Answer | None = None  # a batch line's: written with the usage row
    cold_since: float | None = None  # when it began waiting for its model's load
    _clock: float = field(default_factory=time.perf_counter)
    _tokens: int = 0
    _made: dict[int, int] = field(default_factory=dict)  # completion tokens by choice

    def observe(self, index: int, event: TokenEvent) -> None:
        """Feed the progress journal every choice's count, and the latency histograms
        the first choice's: the first token, then the gaps between tokens."""
        if self.progress is not None:
            self._made[index] = event.completion_tokens
            self.progress.completion_tokens = sum(self._made.values())
        if index != 0:
            return
        made = event.completion_tokens - self._tokens
        if made <= 0:
            return
        now = time.perf_counter()
        elapsed = now - self._clock
        if self._tokens == 0:  # any others that came with the first token took no time
            self.telemetry.first_token(self.model, elapsed)
            if self.cold_since is not None:
                self.telemetry.cold_first_token(self.model, now - self.cold_since)
            made, elapsed = made - 1, 0.0
        self.telemetry.next_tokens(self.model, elapsed, made)
        self._clock, self._tokens = now, event.completion_tokens

    def usage(self, finals: list[TokenEvent]) -> Usage:
        """Each prompt once (with its first choice, which computed it), every choice's
        completion tokens. `finals` are in the order of `choices`."""
        prompt = cached = completion = 0
        for choice, final in zip(self.choices, finals, strict=True):
            usage = final.usage or Usage(0, final.completion_tokens)
            completion += usage.completion_tokens
            if choice.index % self.n == 0:
                prompt += usage.prompt_tokens
                cached += usage.cached_tokens
        return Usage(prompt, completion, cached)

    async def record(self, finals: list[TokenEvent],
                     completed: list[Completed] | None = None) -> None:
        """Write the usage row and settle the hold in one transaction (with a batch line's
        answer, when `completed` carries one), then return the rate-limit tokens the
        request did not use."""
        usage = self.usage(finals)
        alongside = None
        if self.answer is not None and completed is not None:
            alongside = self.answer(completed, usage)
        reasons = {final.finish_reason or FinishReason.ERROR for final in finals}
        outcome = next(r for r in OUTCOMES if r in reasons)
        principal = self.admission.principal
        await self.cloud.ledger.record(UsageEntry(
            request_id=self.request_id, organization_id=principal.organization_id,
            api_key_id=principal.api_key_id, project_id=principal.project_id, model=self.model,
            prompt_tokens=usage.prompt_tokens, cached_tokens=usage.cached_tokens,
            completion_tokens=usage.completion_tokens, cost_pico=self.admission.cost(usage),
            status=STATUS[outcome], started_at=self.started_at, finished_at=datetime.now(UTC),
            provider=next((f.provider for f in finals if f.provider), None),
            estimated=any(f.usage is not None and f.usage.estimated for f in finals),
        ), self.admission.hold, alongside)
        self.recorded = True
        if self.progress is not None:
            self.cloud.journal.finish(self.progress)
        await self.cloud.limits.settle(self.admission.ticket, usage.total_tokens)

    def cancel(self) -> None:
        """Cancel every choice (a no-op for finished ones) and start no more."""
        self.siblings.clear()
        for choice in self.choices:
            choice.stream.cancel()

    async def stop(self) -> list[TokenEvent]:
        """Cancel every choice; return their final events, in the order of `choices`."""
        self.cancel()
        return list(await asyncio.gather(*(c.stream.final() for c in self.choices)))

    def abandon(self) -> None:
        """The client left: stop every choice and bill what they produced, off this task."""
        if self.recorded:
            return
        self.cancel()
        task = asyncio.get_running_loop().create_task(self._record_when_final())
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _record_when_final(self) -> None:
        try:
            await self.record(await self.stop())
        except Exception:
            log.exception("could not record usage of abandoned request %s", self.request_id)

    async def start(self, index: int, request: GenerationRequest) -> None:
        """Start one choice; the engine's refusal propagates."""
        stream = await self.engine.generate(request)
        self.choices.append(Choice(index, stream, aiter(stream)))
        self.choices.sort(key=lambda c: c.index)

    async def events(self) -> AsyncGenerator[tuple[int, TokenEvent]]:
        """Every choice's events as they come, each choice's head first."""
        if len(self.choices) == 1:
            async for event in _replay(self.choices[0]):
                yield 0, event
            return
        queue: asyncio.Queue[tuple[int, TokenEvent]] = asyncio.Queue()

        async def pump(choice: Choice) -> None:
            try:
                async for event in _replay(choice):
                    queue.put_nowait((choice.index, event))
            except Exception:  # the choice still ends, so the response does
                log.exception("choice %d of %s failed", choice.index, self.request_id)
                queue.put_nowait((choice.index, TokenEvent("", 0, FinishReason.ERROR)))

        pumps = [asyncio.ensure_future(pump(c)) for c in self.choices]
        try:
            for _ in range(len(pumps)):
                while True:
                    index, event = await queue.get()
                    yield index, event
                    if event.finish_reason is not None:
                        break
        finally:
            for task in pumps:
                task.cancel()


def choice_id(request_id: str, index: int) -> str:
    """Each choice is its own request in the engine (vLLM and Ray key on the id)."""
    return request_id if index == 0 else f"{request_id}-{index}"


async def _replay(choice: Choice) -> AsyncIterator[TokenEvent]:
    if choice.head is not None:
        yield choice.head
        if choice.head.finish_reason is not None:
            return
    async for event in choice.events:
        yield event
        if event.finish_reason is not None:
            return


async def open_run(serving: Serving, engine: Engine, principal: Principal, model: str,
                   prompts: list[list[int]], body: SamplingFields, max_tokens: int | None,
                   prefix: str, logprobs: int | None = None,
                   requests: Ticket | None = None,
                   constraint: Constraint | None = None,
                   batch_line: str | None = None, cold_since: float | None = None,
                   deadline: float | None = None) -> Run:
    """Admit the request (its hold covers every choice's max_tokens) and start the first
    choice of each prompt; `begin` starts the others. `requests`: the RPM already taken
    by `admit_request` before tokenizing; `constraint`: the grammar every choice follows.

    `batch_line`: the request id of a Batch API line's attempt. It runs in the batch
    class at the batch price, and outside the progress journal: a line cut by a crash
    is not billed as interrupted but runs again (one usage row per answered line).

    `deadline` (time.monotonic(), from `X-Request-Timeout`): the admission layer sheds a
    choice with a 503 if its turn comes too late to finish by then."""
    cloud = serving.cloud
    sampling = sampling_from(body)
    n = body.choices
    if n * len(prompts) > MAX_CHOICES:
        raise invalid(f"at most {MAX_CHOICES} choices (prompts x n) per request", "n")
    request_id = batch_line or f"{prefix}-{secrets.token_hex(12)}"
    window = engine.info().context_length
    most = sum(max(max_tokens if max_tokens is not None else window - len(p), 0)
               for p in prompts)
    prompt_tokens = sum(len(p) for p in prompts)
    admission = await admit(cloud, principal, model, request_id, prompt_tokens, most * n,
                            requests, batch=batch_line is not None)
    run = Run(request_id, model, admission, engine, n, cloud, serving.background,
              serving.telemetry, cold_since=cold_since)
    scope = cache_scope_of(principal, serving.prefix_cache_scope, body.cache_salt)
    priority = Priority.BATCH if batch_line is not None else body.priority
    try:
        generations = [GenerationRequest(
            request_id=choice_id(request_id, k), prompt_tokens=prompts[k // n],
            sampling=sampling.for_choice(k % n), max_tokens=max_tokens,
            stop=body.stops, tenant=tenant_of(principal, serving.fair_share_by),
            priority=priority, weight=principal.weight, logprobs=logprobs,
            logit_bias=dict(body.logit_bias or {}), cache_scope=scope, constraint=constraint,
            deadline=deadline,
        ) for k in range(n * len(prompts))]
        run.siblings = [(k, g) for k, g in enumerate(generations) if k % n]
        for k in range(0, len(generations), n):
            await run.start(k, generations[k])
    except BaseException as exc:
        await _unwind(run)
        if isinstance(exc, EngineError):
            raise refused(exc) from None
        raise
    if batch_line is None:
        run.progress = cloud.journal.track(request_id, principal, model, prompt_tokens,
                                           admission.rates, admission.hold, run.started_at)
    return run


def refused(exc: EngineError, code: str | None = None) -> APIError:
    """An engine's refusal of a request it never started, as the API answers it:
    back-pressure as a 503 or 429 with Retry-After, anything else as a 400 (`code`, or
    the engine's own)."""
    if isinstance(exc, EngineOverloaded):
        return refusal(FinishReason.OVERLOADED if exc.everyone else FinishReason.THROTTLED,
                       exc.retry_after)
    return invalid(exc.message, exc.param, code or exc.code)


async def _unwind(run: Run) -> None:
    """Opening failed part way: stop what started; bill what it made, if anything."""
    finals = await run.stop()
    if any(f.completion_tokens or (f.usage and f.usage.prompt_tokens) for f in finals):
        await run.record(finals)
    else:
        await withdraw(run.cloud, run.admission)


async def begin(run: Run, request: Request | None) -> None:
    """Wait for each prompt's first event before answering, so a request shed from the
    queue still gets a real 429/503 instead of a 200 with an error inside; then start
    the other choices, whose prompt the engine now holds."""
    leaders = list(run.choices)
    heads = await until_disconnect(run, request, asyncio.gather(
        *(anext(c.events) for c in leaders)))
    for choice, head in zip(leaders, heads, strict=True):
        choice.head = head
    bad = next((head for head in heads if failed(head)), None)
    if bad is not None:
        raise await fail(run, bad.finish_reason or FinishReason.ERROR)
    try:
        while run.siblings:
            await run.start(*run.siblings.pop(0))
    except EngineOverloaded as exc:
        raise await fail(run, FinishReason.OVERLOADED if exc.everyone
                         else FinishReason.THROTTLED, exc.retry_after) from None
    except EngineError as exc:
        raise await fail(run, FinishReason.ERROR, message=exc.message) from None


async def fail(run: Run, reason: FinishReason, retry_after: float = 1.0,
               message: str = "the engine failed while generating") -> APIError:
    """A choice ended without an answer: stop the others, bill what was produced (a
    request shed before it ran costs nothing), and say why: 429/503 for a refusal."""
    await run.record(await run.stop())
    if reason.refused:
        run.telemetry.refused[(run.model, reason.value)] += 1
        return refusal(reason, retry_after)
    return APIError(500, message)


class Format(Protocol):
    """How chat and text completions differ: only the JSON they wrap text in."""

    def chunk(self, run: Run, index: int, text: str, finish: str | None, first: bool,
              logprobs: list[TokenLogprobs]) -> dict[str, Any]: ...

    def whole(self, run: Run, choices: list[Completed], usage: Usage) -> dict[str, Any]: ...


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


async def until_disconnect(run: Run, request: Request | None, work: Awaitable[T]) -> T:
    """Await `work` unless the client goes first: then stop every choice, bill what they
    made, and answer 499. No request (a batch line): no client to leave."""
    if request is None:
        return await work

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        run.abandon()
        raise APIError(499, "client closed the request")
    return task.result()


async def stream_events(run: Run, fmt: Format, include_usage: bool) -> AsyncIterator[bytes]:
    """SSE body, after `begin`. Each choice's first chunk comes even when empty (the chat
    role); logprobs of tokens whose text is still held back wait for the next chunk. If
    this generator is cancelled (client gone), the run is abandoned."""
    finals: dict[int, TokenEvent] = {}
    waiting: dict[int, list[TokenLogprobs]] = defaultdict(list)
    opened: set[int] = set()

    def chunk(index: int, text: str) -> bytes:
        first = index not in opened
        opened.add(index)
        logprobs, waiting[index] = waiting[index], []
        return sse(fmt.chunk(run, index, text, None, first, logprobs))

    try:
        async with contextlib.aclosing(run.events()) as events:
            async for index, event in events:
                run.observe(index, event)
                waiting[index].extend(event.logprobs)
                if event.finish_reason is None:
                    if event.text or index not in opened:
                        yield chunk(index, event.text)
                    continue
                finals[index] = event
                if failed(event):
                    await run.record(await run.stop())
                    yield sse(error_body(500, "the engine failed while generating"))
                    return
                if len(finals) == len(run.choices):  # the last byte waits for the row
                    await run.record([finals[c.index] for c in run.choices])
                if event.text or waiting[index] or index not in opened:
                    yield chunk(index, event.text)
                yield sse(fmt.chunk(run, index, "", event.finish_reason.openai, False, []))
        if include_usage:
            usage = run.usage([finals[c.index] for c in run.choices])
            yield sse({**fmt.chunk(run, 0, "", None, False, []), "choices": [],
                       "usage": usage_json(usage)})
        yield sse("[DONE]")
    finally:
        run.abandon()


async def collect(run: Run, request: Request | None) -> tuple[list[Completed], Usage]:
    """Gather every choice's whole text (after `begin`), cancelling them all if the
    client disconnects first."""
    texts: dict[int, list[str]] = defaultdict(list)
    logprobs: dict[int, list[TokenLogprobs]] = defaultdict(list)
    finals: dict[int, TokenEvent] = {}

    async def drain() -> TokenEvent | None:
        async with contextlib.aclosing(run.events()) as events:
            async for index, event in events:
                run.observe(index, event)
                texts[index].append(event.text)
                logprobs[index].extend(event.logprobs)
                if event.finish_reason is not None:
                    finals[index] = event
                    if failed(event):
                        return event
        return None

    bad = await until_disconnect(run, request, drain())
    if bad is not None:
        raise await fail(run, bad.finish_reason or FinishReason.ERROR)
    ordered = [finals[c.index] for c in run.choices]
    completed = [Completed(c.index, "".join(texts[c.index]),
                           (finals[c.index].finish_reason or FinishReason.ERROR).openai,
                           logprobs[c.index]) for c in run.choices]
    await run.record(ordered, completed)
    return completed, run.usage(ordered)
