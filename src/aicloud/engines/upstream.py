"""The upstream engine: a catalog model (engine `upstream`) served by an OpenAI-compatible
provider, behind the same Engine protocol as our own models, so limits, budgets, the
ledger and the routes treat it like any other.

It relays instead of generating (capability RELAY): the caller's OpenAI request
(`GenerationRequest.relay`) goes to the provider with the provider's model id,
`stream: true` and `stream_options.include_usage` always, so the provider's own counts
are what is billed; its chunks come back as `TokenEvent.upstream`, one event per chunk,
nothing buffered. Nothing is tokenized here.

Failures before the first chunk (connection errors, timeouts, 5xx, a stall, a 429) are
retried with backoff (a 429 after its Retry-After) while the provider's breaker allows;
after that `generate` raises `EngineUnavailable`, which the API turns into a fallback
model or a 503. A request the provider refuses as bad (400, 422...) is the caller's
error, with the provider's message scrubbed of our key and its URL. After the first
chunk nothing is retried: a stream cut mid-way ends with an ERROR event whose usage is
the provider's if it came, else an estimate (`Usage.estimated`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import email.utils
import json
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

import httpx
import numpy as np

from aicloud.accounts.base import NotFound
from aicloud.engines.base import (
    GENERATE,
    RELAY,
    ChatMessage,
    EmbeddingRequest,
    Embeddings,
    Engine,
    EngineError,
    EngineInfo,
    EngineStats,
    EngineUnavailable,
    FinishReason,
    GenerationRequest,
    RelayBody,
    TokenEvent,
    Usage,
)
from aicloud.engines.events import EventQueue
from aicloud.engines.upstream_count import TOKENIZER, TokenCounter, count_relay, counter_for
from aicloud.models.catalog import CatalogEntry
from aicloud.providers.link import ProviderLink, ProviderLinks
from aicloud.providers.secrets import SecretError
from aicloud.providers.store import ProviderSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

# what an upstream model reads unless its catalog options say `context`
DEFAULT_CONTEXT = 8192
# fields of our request schema that are ours, not OpenAI's
OURS = ("cache_salt",)
BACKOFF_BASE, BACKOFF_CAP = 0.1, 2.0
# a Retry-After longer than this is not waited for: the caller gets it (or a fallback)
MAX_RETRY_WAIT = 10.0
MAX_ERROR_BYTES = 64 << 10
CHARS_PER_TOKEN = 4  # for estimates when a provider reports no usage
DRAIN_SECONDS = 1.0  # waited for the end of a body after [DONE]
# an embeddings answer bigger than this is refused (2048 inputs of 3072 floats as JSON
# text take about 140 MiB); above INLINE_PARSE_BYTES it is parsed on a worker thread
MAX_EMBEDDINGS_BYTES = 512 << 20
INLINE_PARSE_BYTES = 256 << 10


class Retryable(Exception):
    """A failure before the first chunk that another attempt may not meet."""

    def __init__(self, kind: str, message: str, pause: float | None = None) -> None:
        super().__init__(message)
        self.kind, self.message, self.pause = kind, message, pause


class StreamBroken(Exception):
    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def make_upstream_engine(entry: CatalogEntry, providers: ProviderLinks) -> Engine:
    """The factory the pool uses for catalog entries of kind `upstream`."""
    return UpstreamEngine(entry, providers)


def retry_after(value: str | None) -> float | None:
    """Retry-After as seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = (when - datetime.now(UTC)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def backoff(attempt: int) -> float:
    """Full jitter: anywhere up to base * 2^attempt, capped."""
    return random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** attempt))


def estimate_tokens(chars: int) -> int:
    return -(-chars // CHARS_PER_TOKEN)


async def _error_detail(response: httpx.Response) -> tuple[str, str | None]:
    """The provider's error message and param, read within MAX_ERROR_BYTES."""
    raw = b""
    async for piece in response.aiter_bytes():
        raw += piece
        if len(raw) > MAX_ERROR_BYTES:
            break
    try:
        error = json.loads(raw).get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        param = error.get("param")
        return error["message"][:1000], param if isinstance(param, str) else None
    return f"the provider answered HTTP {response.status_code}", None


class UpstreamEngine:
    def __init__(self, entry: CatalogEntry, providers: ProviderLinks) -> None:
        if entry.provider is None or entry.upstream_model is None:
            raise EngineError(f"model {entry.id} has no provider", param="model")
        self._entry = entry
        self._provider = entry.provider
        self._upstream_model = entry.upstream_model
        self._providers = providers
        self._running = 0
        self._waiting = 0

    async def start(self) -> None:
        """Nothing to load; the provider's link is made on the first request."""

    async def close(self) -> None:
        """The links belong to the ProviderLinks, which the server closes."""

    async def encode_chat(self, messages: list[ChatMessage],
                          tools: list[dict[str, Any]] | None = None) -> list[int]:
        raise self._not_local()

    async def encode_text(self, text: str) -> list[int]:
        raise self._not_local()

    async def embed(self, request: EmbeddingRequest) -> Embeddings:
        """The caller's embeddings request relayed (`request.relay`), the provider's
        vectors and usage back; retried like a stream before its first chunk, since
        nothing reached the caller until the whole answer came."""
        relay = request.relay
        if relay is None:
            raise EngineError(f"model {self._entry.id} is served by a provider: it needs the "
                              "request's input, not token ids", param="model")
        link = await self._link()
        await self._place(link, request.tenant, 0, 1.0)
        usage = Usage(0, 0)
        try:
            vectors, reported = await self._call(
                link, relay.endpoint, self.body(relay, stream=False),
                partial(_embeddings, inputs=len(_inputs(relay.fields))))
            link.metrics.requests["ok"] += 1
            usage = reported or await self._count_inputs(relay)
            return Embeddings(vectors, usage, provider=link.name)
        finally:
            link.gate.leave(request.tenant, usage.prompt_tokens)

    async def _count_inputs(self, relay: RelayBody) -> Usage:
        """An embeddings request's tokens when the provider said none: token arrays as
        sent, strings with the model's tokenizer, else estimated."""
        inputs = _inputs(relay.fields)
        arrays = sum(len(i) for i in inputs if isinstance(i, list))
        texts = [i for i in inputs if isinstance(i, str)]
        counted = await self._counted(lambda c: sum(c.prompt(t) for t in texts)) \
            if texts else 0
        if counted is not None:
            return Usage(arrays + counted, 0)
        return Usage(arrays + sum(estimate_tokens(len(t)) for t in texts), 0, estimated=True)

    async def _counted(self, count: Callable[[TokenCounter], T]) -> T | None:
        """`count` run with the model's tokenizer (off the loop); None without one, or
        when it fails (logged)."""
        path = self._entry.options.get(TOKENIZER)
        if not isinstance(path, str):
            return None
        try:
            return await asyncio.to_thread(lambda: count(counter_for(path)))
        except Exception as exc:  # a tokenizer that fails only makes it an estimate
            log.warning("model %s: its tokenizer could not count a request (%s: %s); the "
                        "usage is estimated", self._entry.id, type(exc).__name__, exc)
            return None

    def info(self) -> EngineInfo:
        """`max_sequences`: the provider's concurrency cap, what an admission layer in
        front of this engine may have in flight."""
        context = int(self._entry.options.get("context", DEFAULT_CONTEXT))
        links = self.links()
        slots = (links[0].config.settings if links else ProviderSettings()).max_concurrency
        return EngineInfo(self._entry.id, context, slots, "upstream",
                          frozenset({GENERATE, RELAY}))

    def stats(self) -> EngineStats:
        return EngineStats(self._running, self._waiting, 0.0, 0, 0)

    def links(self) -> list[ProviderLink]:
        """The provider links this engine uses, for /metrics."""
        return [link for link in self._providers.all() if link.name == self._provider]

    def _not_local(self) -> EngineError:
        return EngineError(f"model {self._entry.id} is served by a provider and is not "
                           "tokenized here", param="model")

    async def _link(self) -> ProviderLink:
        try:
            return await self._providers.link(self._provider)
        except NotFound:
            raise EngineUnavailable(f"model {self._entry.id}: its provider is not configured",
                                    retry_after=30) from None
        except SecretError as exc:
            log.error("provider %s: %s", self._provider, exc)
            raise EngineUnavailable(f"model {self._entry.id}: its provider cannot be used",
                                    retry_after=30) from None

    def body(self, relay: RelayBody, stream: bool = True) -> dict[str, Any]:
        """The caller's request as the provider gets it."""
        fields = {k: v for k, v in relay.fields.items() if k not in OURS}
        if not stream:
            return {**fields, "model": self._upstream_model}
        return {**fields, "model": self._upstream_model, "stream": True,
                "stream_options": {"include_usage": True}}

    async def generate(self, request: GenerationRequest) -> UpstreamStream:
        """Returns once the provider's first chunk came (retrying until then)."""
        if request.relay is None:
            raise EngineError(f"model {self._entry.id} is served by a provider: it needs the "
                              "request's messages, not token ids", param="model")
        relay = request.relay
        link = await self._link()
        tenant = request.tenant
        await self._place(link, tenant, request.priority, request.weight)
        try:
            response, lines, first = await self._open(link, relay.endpoint, self.body(relay))
        except BaseException:
            link.gate.leave(tenant)
            raise
        self._running += 1
        link.metrics.in_flight += 1

        def done(usage: Usage) -> None:
            self._running -= 1
            link.metrics.in_flight -= 1
            link.gate.leave(tenant, usage.prompt_tokens, usage.completion_tokens)

        async def count(answer: str | None, estimate: int) -> Usage | None:
            return await self._counted(
                lambda c: count_relay(c, relay, answer, estimate, request.max_tokens))

        return UpstreamStream(link, response, lines, first, relay.prompt_estimate, done, count)

    async def _place(self, link: ProviderLink, tenant: str, priority: int,
                     weight: float) -> None:
        """A place among the provider's `max_concurrency`, in tenant-fair order, waited
        for up to the provider's timeout."""
        self._waiting += 1
        try:
            await link.gate.enter(tenant, priority, weight, link.config.settings.timeout)
        except EngineUnavailable:
            link.metrics.requests["busy"] += 1
            raise
        finally:
            self._waiting -= 1

    async def _open(self, link: ProviderLink, endpoint: str, body: dict[str, Any]
                    ) -> tuple[httpx.Response, AsyncIterator[bytes], bytes]:
        """The stream, once its first chunk came."""
        return await self._call(link, endpoint, body, _first_chunk)

    async def _call(self, link: ProviderLink, endpoint: str, body: dict[str, Any],
                    read: Callable[[httpx.Response], Awaitable[T]]) -> T:
        """POST `body`, retrying while `read` (what a 200 is good for) has not succeeded."""
        attempts = link.config.settings.retries + 1
        started = time.perf_counter()
        failure = Retryable("unreachable", "")
        for attempt in range(attempts):
            if not link.breaker.can_send():
                link.metrics.requests["breaker_open"] += 1
                raise EngineUnavailable(
                    f"the provider of {self._entry.id} is failing; requests pause for a while",
                    retry_after=max(1.0, link.breaker.retry_after()))
            link.breaker.send()
            if attempt:
                link.metrics.retries += 1
            try:
                done = await self._attempt(link, endpoint, body, read)
            except Retryable as exc:
                link.metrics.requests[exc.kind] += 1
                link.breaker.failed(exc.pause)
                failure = exc
                delay = exc.pause if exc.pause is not None else backoff(attempt)
                if attempt + 1 == attempts or delay > MAX_RETRY_WAIT:
                    break
                await asyncio.sleep(delay)
                continue
            link.breaker.succeeded()
            link.metrics.first_byte(time.perf_counter() - started)
            return done
        raise EngineUnavailable(f"the provider of {self._entry.id} {failure.message}",
                                retry_after=max(1.0, failure.pause or 1.0))

    async def _attempt(self, link: ProviderLink, endpoint: str, body: dict[str, Any],
                       read: Callable[[httpx.Response], Awaitable[T]]) -> T:
        request = link.client.build_request("POST", link.url(endpoint), json=body,
                                            headers=link.headers)
        try:
            response = await link.client.send(request, stream=True)
        except httpx.TimeoutException:
            raise Retryable("timeout", "did not answer in time") from None
        except httpx.HTTPError:
            raise Retryable("connect", "could not be reached") from None
        if response.status_code != 200:
            await self._refused(link, response)
        return await read(response)

    async def _refused(self, link: ProviderLink, response: httpx.Response) -> None:
        """A non-200: retry (429, 5xx), give up on the provider (401/403/404: our
        configuration), or blame the request (other 4xx), always raising."""
        status = response.status_code
        try:
            message, param = await _error_detail(response)
        except httpx.HTTPError:
            message, param = f"the provider answered HTTP {status}", None
        finally:
            await response.aclose()
        if status == 429:
            raise Retryable("status_429", "is rate limiting us",
                            retry_after(response.headers.get("retry-after")) or 1.0)
        if status >= 500 or status == 408:
            raise Retryable("status_5xx", f"failed (HTTP {status})")
        link.metrics.requests["status_4xx"] += 1
        if status in (401, 403, 404):
            log.warning("provider %s refused a request with HTTP %d: check its key and the "
                        "model id of %s", link.name, status, self._entry.id)
            raise EngineUnavailable(f"the provider of {self._entry.id} refused the request "
                                    f"(HTTP {status})", retry_after=30)
        raise EngineError(link.scrub(message), param=param)


async def _first_chunk(response: httpx.Response
                       ) -> tuple[httpx.Response, AsyncIterator[bytes], bytes]:
    lines = sse_lines(response)
    try:
        first = await _next_data(lines)
    except httpx.TimeoutException:
        await response.aclose()
        raise Retryable("stall", "sent nothing in time") from None
    except (httpx.HTTPError, StreamBroken):
        await response.aclose()
        raise Retryable("cut", "closed the stream before the first chunk") from None
    return response, lines, first


async def sse_lines(response: httpx.Response) -> AsyncIterator[bytes]:
    """The lines of an SSE body as bytes. httpx's `aiter_lines` decodes each piece to text
    and splits it again; the payloads here go to `json.loads`, which takes bytes, and
    the layers it skips were a tenth of the relay's CPU time (bench/profile_relay.py).
    Lines end in LF or CRLF (what providers send; a lone CR is not read as an end)."""
    pieces = response.aiter_bytes() if "content-encoding" in response.headers \
        else response.aiter_raw()
    rest = b""
    async for piece in pieces:
        *lines, rest = (rest + piece).split(b"\n")
        for line in lines:
            yield line[:-1] if line.endswith(b"\r") else line
    if rest:
        yield rest


async def _next_data(lines: AsyncIterator[bytes]) -> bytes:
    """The next `data:` payload of an SSE stream (comments and other fields skipped)."""
    async for line in lines:
        if line.startswith(b"data:"):
            return line[5:].strip()
        if line and not line.startswith((b":", b"event:", b"id:", b"retry:")):
            raise StreamBroken("protocol")
    raise StreamBroken("cut")


# counts a relayed request with the model's tokenizer: (the answer's text, or None when it
# cannot be counted exactly; the estimate of its tokens) -> usage, or None without one
Count = Callable[[str | None, int], Awaitable[Usage | None]]


class UpstreamStream:
    """One relayed stream: a task reads the provider's chunks into an EventQueue (so a
    cancel, or the client leaving, closes the upstream request at once, and `final()`
    answers without anyone iterating)."""

    def __init__(self, link: ProviderLink, response: httpx.Response,
                 lines: AsyncIterator[bytes], first: bytes, prompt_estimate: int,
                 done: Callable[[Usage], None], count: Count | None = None) -> None:
        self._link = link
        self._response = response
        self._lines = lines
        self._prompt_estimate = prompt_estimate
        self._done = done
        self._count = count
        self._text: list[str] = []  # kept for `count`: the answer as it came
        self._calls = False  # tool calls came: the answer cannot be counted exactly
        self._queue = EventQueue()
        self._usage: Usage | None = None
        self._finish: str | None = None
        self._chunks = 0
        self._chars = 0
        self._cancelled = False
        self._task = asyncio.get_running_loop().create_task(self._pump(first))

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self._queue.__aiter__()

    def cancel(self) -> None:
        """Once: a second cancel would interrupt the task's own closing of the upstream
        response (callers cancel, then cancel again while stopping)."""
        if not self._cancelled and not self._task.done():
            self._cancelled = True
            self._task.cancel()

    async def final(self) -> TokenEvent:
        return await self._queue.final()

    async def _pump(self, first: bytes) -> None:
        outcome = "ok"
        reason = FinishReason.STOP
        try:
            data = first
            while data != b"[DONE]":
                self._take(data)
                data = await _next_data(self._lines)
            reason = FinishReason.LENGTH if self._finish == "length" else FinishReason.STOP
        except asyncio.CancelledError:
            outcome, reason = "cancelled", FinishReason.CANCELLED
        except (StreamBroken, httpx.HTTPError) as exc:
            if self._finish is not None and self._usage is None:
                # the answer was whole; only the usage chunk went missing
                outcome, reason = "ok", FinishReason.STOP
            else:
                outcome = exc.kind if isinstance(exc, StreamBroken) else (
                    "timeout" if isinstance(exc, httpx.TimeoutException) else "cut")
                reason = FinishReason.ERROR
        finally:
            self._link.metrics.requests[outcome] += 1
            final = await self._final(reason)
            self._queue.put(final)
            self._done(final.usage or Usage(0, 0))
            await asyncio.shield(self._close(drain=outcome == "ok"))

    async def _close(self, drain: bool) -> None:
        """After [DONE], read the body's end (briefly) so the connection goes back to the
        pool: closing a response not read to its end closes its connection, and a new
        connection per request cost more than the rest of the relay (measured)."""
        if drain:
            with contextlib.suppress(httpx.HTTPError, TimeoutError):
                async with asyncio.timeout(DRAIN_SECONDS):
                    async for _ in self._lines:
                        pass
        await self._response.aclose()

    def _take(self, data: bytes) -> None:
        try:
            chunk = json.loads(data)
        except ValueError:
            raise StreamBroken("protocol") from None
        if not isinstance(chunk, dict) or "error" in chunk:
            raise StreamBroken("upstream_error")
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._usage = _usage(usage)
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                raise StreamBroken("protocol")
            self._finish = choice.get("finish_reason") or self._finish
            text = _text(choice)
            calls = _tool_chars(choice)
            self._chunks += 1
            self._chars += len(text) + calls
            self._calls = self._calls or calls > 0
            if self._count is not None:
                self._text.append(text)
            self._queue.put(TokenEvent(text, self._estimate(), upstream=choice))

    def _estimate(self) -> int:
        return max(self._chunks, estimate_tokens(self._chars))

    async def _final(self, reason: FinishReason) -> TokenEvent:
        """The last event: the provider's usage; else the model's tokenizer counts (off the
        loop, never interrupted: a second cancel during it bills the estimate); else the
        estimate."""
        usage = self._usage
        if usage is None and self._count is not None:
            answer = None if self._calls else "".join(self._text)
            with contextlib.suppress(asyncio.CancelledError):
                usage = await asyncio.shield(self._count(answer, self._estimate()))
        if usage is None:
            usage = Usage(self._prompt_estimate, self._estimate(), 0, estimated=True)
        return TokenEvent("", usage.completion_tokens, reason, usage, provider=self._link.name)


def _text(choice: Mapping[str, Any]) -> str:
    delta = choice.get("delta")
    if isinstance(delta, dict):
        content = delta.get("content")
        return content if isinstance(content, str) else ""
    text = choice.get("text")  # /v1/completions
    return text if isinstance(text, str) else ""


def _tool_chars(choice: Mapping[str, Any]) -> int:
    delta = choice.get("delta")
    calls = delta.get("tool_calls") if isinstance(delta, dict) else None
    return len(json.dumps(calls)) if calls else 0


def _usage(data: Mapping[str, Any]) -> Usage:
    def count(value: Any) -> int:
        return value if isinstance(value, int) and value >= 0 else 0

    details = data.get("prompt_tokens_details")
    cached = count(details.get("cached_tokens")) if isinstance(details, dict) else 0
    return Usage(count(data.get("prompt_tokens")), count(data.get("completion_tokens")), cached)


def _inputs(fields: Mapping[str, Any]) -> list[str] | list[list[int]]:
    """An embeddings request's `input` as one entry per input."""
    value = fields.get("input")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and isinstance(value[0], int):
        return [value]
    return value if isinstance(value, list) else []


async def _embeddings(response: httpx.Response, inputs: int
                      ) -> tuple[list[list[float]], Usage | None]:
    """A 200 to an embeddings request: the vectors in input order and the provider's
    usage (None if it sent none). Anything else is a failure that another try may not
    meet (a cut, a stall, a malformed answer)."""
    raw = bytearray()
    try:
        async for piece in response.aiter_bytes():
            raw += piece
            if len(raw) > MAX_EMBEDDINGS_BYTES:
                raise Retryable("protocol", "answered with more than "
                                f"{MAX_EMBEDDINGS_BYTES >> 20} MiB of embeddings")
    except httpx.TimeoutException:
        raise Retryable("stall", "did not finish its answer in time") from None
    except httpx.HTTPError:
        raise Retryable("cut", "closed the connection before its answer was whole") from None
    finally:
        await response.aclose()
    if len(raw) > INLINE_PARSE_BYTES:  # the event loop never parses megabytes
        return await asyncio.to_thread(_parse_embeddings, bytes(raw), inputs)
    return _parse_embeddings(bytes(raw), inputs)


def _parse_embeddings(raw: bytes, inputs: int) -> tuple[list[list[float]], Usage | None]:
    malformed = Retryable("protocol", "answered with a malformed embeddings list")
    try:
        answer = json.loads(raw)
        items = sorted(answer["data"], key=lambda item: int(item["index"]))
        vectors = [_vector(item["embedding"]) for item in items]
    except (ValueError, TypeError, KeyError, AttributeError, binascii.Error):
        raise malformed from None
    if len(vectors) != inputs:
        raise malformed
    usage = answer.get("usage")
    tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
        return vectors, None
    return vectors, Usage(tokens, 0)


def _vector(value: Any) -> list[float]:
    """A vector as floats (OpenAI's base64 form is little-endian float32)."""
    if isinstance(value, str):
        vector: list[float] = np.frombuffer(base64.b64decode(value, validate=True),
                                            dtype="<f4").tolist()
        return vector
    if not isinstance(value, list) or not all(
            isinstance(x, float | int) and not isinstance(x, bool) for x in value):
        raise TypeError("not a vector")
    return value
