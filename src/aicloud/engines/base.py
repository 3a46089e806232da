"""The Engine protocol: the one seam between the cloud layer and whatever produces tokens.

The API layer only sees these types, so an engine can run in-process, in another process
or behind a Ray actor handle without the routes knowing.
"""

from __future__ import annotations

import enum
import math
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable


class FinishReason(enum.StrEnum):
    """Why a sequence ended; the first two are OpenAI's finish reasons."""

    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    ERROR = "error"
    OVERLOADED = "overloaded"  # shed from the queue, nobody's fault in particular (503)
    THROTTLED = "throttled"  # shed from the queue, its tenant floods it (429)

    @property
    def refused(self) -> bool:
        """Never ran: the API answers with an error instead of a completion."""
        return self in (FinishReason.OVERLOADED, FinishReason.THROTTLED)

    @property
    def openai(self) -> str:
        return "length" if self is FinishReason.LENGTH else "stop"


class Priority(enum.IntEnum):
    """Classes, lowest first: any waiting interactive request is admitted before any batch
    one, and an engine that can pause a sequence (`EngineInfo.preempts`) also lets its
    batch sequences yield their steps, and their slots, to interactive ones."""

    INTERACTIVE = 0
    BATCH = 1


class EngineError(Exception):
    """Raised by an engine for a request it cannot run; `param` names the culprit field."""

    code: str = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class ContextLengthExceeded(EngineError):
    code = "context_length_exceeded"


class EngineOverloaded(EngineError):
    """Refused at the door by back-pressure. `everyone`: the model is saturated by many
    tenants (503); otherwise the caller's tenant is the one flooding it (429)."""

    code = "overloaded"

    def __init__(self, message: str, *, retry_after: float, everyone: bool) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.everyone = everyone


class EngineUnavailable(Exception):
    """Nothing can take the request right now (every replica of the model is down or
    still loading). Not the request's fault, so not an EngineError: the API answers 503
    with `retry_after`, the same on every route."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


def completion_limit(request: GenerationRequest, window: int, vocab: int | None = None) -> int:
    """Every engine refuses the same requests the same way: an empty prompt, token ids the
    model does not have (when `vocab` is known), or more tokens than a sequence holds.
    Returns how many tokens the request may generate."""
    n = len(request.prompt_tokens)
    if n == 0:
        raise EngineError("the prompt is empty", param="prompt")
    if vocab is not None and any(not 0 <= t < vocab for t in request.prompt_tokens):
        raise EngineError("the prompt contains token ids outside the vocabulary",
                          param="prompt")
    if n >= window:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {window} tokens, "
            f"but the prompt has {n} tokens.", param="messages")
    if request.max_tokens is not None and n + request.max_tokens > window:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {window} tokens. However, you "
            f"requested {n + request.max_tokens} tokens ({n} in the prompt, "
            f"{request.max_tokens} for the completion).", param="max_tokens")
    if request.logit_bias and vocab is not None and any(
            not 0 <= t < vocab for t in request.logit_bias):
        raise EngineError("logit_bias names token ids outside the vocabulary",
                          param="logit_bias")
    return min(request.max_tokens or window, window - n)


MAX_TOP_LOGPROBS = 20  # OpenAI's bound on alternatives per token


@dataclass(slots=True, frozen=True)
class ChatToolCall:
    """A function call an assistant made earlier in the conversation; `arguments` is the
    JSON text exactly as the client sent it back."""

    id: str
    name: str
    arguments: str


@dataclass(slots=True, frozen=True)
class ChatMessage:
    role: str
    content: str
    name: str | None = None
    tool_calls: tuple[ChatToolCall, ...] = ()
    tool_call_id: str | None = None  # on a `tool` message: the call it answers


@dataclass(slots=True)
class SamplingParams:
    """Per-request sampling; checked here so every engine gets sane values."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        floats = (self.temperature, self.top_p, self.min_p, self.presence_penalty,
                  self.frequency_penalty, self.repetition_penalty)
        if not all(math.isfinite(v) for v in floats):
            raise EngineError("sampling parameters must be finite numbers")
        if not 0.0 <= self.temperature <= 2.0:
            raise EngineError("temperature must be between 0 and 2", param="temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise EngineError("top_p must be in (0, 1]", param="top_p")
        if not 0.0 <= self.min_p <= 1.0:
            raise EngineError("min_p must be in [0, 1]", param="min_p")
        if self.top_k < 0:
            raise EngineError("top_k must be >= 0", param="top_k")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise EngineError(f"{name} must be between -2 and 2", param=name)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def for_choice(self, index: int) -> SamplingParams:
        """Choice `index` of a request samples on its own: a seeded request gives different
        but reproducible choices (seed, seed + 1, ...)."""
        if self.seed is None or index == 0:
            return self
        return replace(self, seed=(self.seed + index) % 2**64)


@dataclass(slots=True, frozen=True)
class Constraint:
    """The output must match this llguidance grammar (the JSON text that
    `llguidance.LLMatcher.grammar_from_json_schema` / `grammar_from_lark` return), compiled
    and checked before the request is queued."""

    grammar: str


# llguidance's parser limits (`llguidance.LLParserLimits(**GRAMMAR_LIMITS)`), tighter than its
# defaults (lexer fuel 1M/200k per step, grammar size 500k): the API checks a grammar with
# them and engines compile it with them, so what passed the check compiles, and every
# step's mask stays bounded. A 5,000-item enum compiles in ~20 ms; a 50,000-item one is
# refused in ~0.2 s. Errors never echo the grammar (`verbose_errors`).
GRAMMAR_LIMITS: dict[str, int | bool] = {
    "max_items_in_row": 2_000, "initial_lexer_fuel": 400_000, "step_lexer_fuel": 100_000,
    "step_max_items": 20_000, "max_lexer_states": 50_000, "max_grammar_size": 200_000,
    "verbose_errors": False,
}


@dataclass(slots=True, frozen=True)
class RelayBody:
    """The caller's OpenAI request, for an engine that relays it to another
    OpenAI-compatible service (capability RELAY) instead of running token ids: such a
    request carries messages, never tokens, since a remote provider is never tokenized
    for here. `prompt_estimate` (about four characters a token) is billed only when the
    provider reports no usage."""

    endpoint: str  # "chat/completions", "completions" or "embeddings"
    fields: Mapping[str, Any]
    prompt_estimate: int


@dataclass(slots=True)
class GenerationRequest:
    """One generation. `prompt_tokens` come from `Engine.encode`, so the caller knows the
    prompt size (for limits and budgets) before anything runs."""

    request_id: str
    prompt_tokens: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    tenant: str = ""  # whose share this is (opaque to engines)
    priority: int = Priority.INTERACTIVE  # lower runs first
    weight: float = 1.0  # the tenant's share relative to others
    cache_scope: str = ""  # prompt-prefix caches are shared only within one scope (opaque)
    constraint: Constraint | None = None
    logprobs: int | None = None  # None: none; k: the chosen token's and k alternatives
    logit_bias: dict[int, float] = field(default_factory=dict)  # added to the raw logits
    relay: RelayBody | None = None  # set (and prompt_tokens empty) for RELAY engines
    # time.monotonic() by which the caller needs the last token (None: no deadline); the
    # admission layer answers a 503 instead of starting what could only finish after it
    deadline: float | None = None
    # the admission layer's per-tenant counters, for an engine that picks which sequences
    # decode each step (never sent to another process: a replica set drops it)
    shares: TenantShares | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise EngineError(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}",
                              param="top_logprobs")
        if any(not math.isfinite(b) or abs(b) > 100 for b in self.logit_bias.values()):
            raise EngineError("logit_bias values must be between -100 and 100",
                              param="logit_bias")


@dataclass(slots=True, frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    estimated: bool = False  # a provider sent no counts: these are estimates

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True, frozen=True)
class Logprob:
    """One token's log-probability under the model's raw distribution (log-softmax of the
    logits, before any sampling filter), as OpenAI reports it."""

    token: str
    raw: bytes  # the token's bytes (a piece of a UTF-8 character is not valid text alone)
    logprob: float


@dataclass(slots=True, frozen=True)
class TokenLogprobs:
    """The sampled token and the most likely alternatives at its position, best first."""

    chosen: Logprob
    top: tuple[Logprob, ...] = ()


@dataclass(slots=True, frozen=True)
class TokenEvent:
    """A step of one sequence: new text (maybe empty while bytes are incomplete) and,
    on the last event, why it finished and the exact usage. `logprobs` holds one entry
    per token the event accounts for, when the request asked for them (the text of those
    tokens may arrive in a later event: incomplete bytes and stop strings are held back)."""

    text: str
    completion_tokens: int
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    logprobs: tuple[TokenLogprobs, ...] = ()
    # from a RELAY engine: the provider's choice of this chunk, relayed as it came
    # (delta, tool_calls, finish_reason, logprobs); on the final event, who served it
    upstream: Mapping[str, Any] | None = None
    provider: str | None = None


GENERATE = "generate"
EMBED = "embed"
# relays callers' OpenAI requests (GenerationRequest.relay) and the provider's chunks
# (TokenEvent.upstream): the API skips tokenizing, tools and formats for it
RELAY = "relay"
# More inputs than this in one embeddings request are refused (OpenAI's own limit).
MAX_EMBEDDING_INPUTS = 2048


@dataclass(slots=True, frozen=True)
class EngineInfo:
    """What an engine serves. Callers ask `capabilities` ("generate", "embed") instead of
    testing an engine's class, so a Ray replica set or a remote provider says the same."""

    model_id: str
    context_length: int
    max_sequences: int
    kind: str
    capabilities: frozenset[str] = frozenset({GENERATE})
    chat_template: str | None = None  # the template's source, to pick a tool-call format
    # it makes room for a newcomer by pausing a running sequence of a tenant above its share,
    # so the admission layer may hand it more requests than `max_sequences`
    preempts: bool = False

    def can(self, capability: str) -> bool:
        return capability in self.capabilities


@dataclass(slots=True, frozen=True)
class EngineStats:
    running: int
    waiting: int
    tokens_per_second: float
    kv_cells_used: int
    kv_cells_total: int


@dataclass(slots=True)
class EmbeddingRequest:
    """Inputs as token ids (from `Engine.encode_text`, or sent as ids), so their size is
    known before admission; one vector comes back per input, in order."""

    request_id: str
    inputs: list[list[int]]
    tenant: str = ""
    relay: RelayBody | None = None  # for RELAY engines: the caller's request (no inputs)


@dataclass(slots=True, frozen=True)
class Embeddings:
    """L2-normalised vectors (float32 values), one per input, and the tokens read."""

    vectors: list[list[float]]
    usage: Usage
    provider: str | None = None  # the upstream provider that made them


def check_embedding_inputs(request: EmbeddingRequest, window: int,
                           vocab: int | None = None) -> None:
    """Every engine refuses the same embedding inputs the same way: none, too many, an
    empty one, ids outside the vocabulary (when known), or one longer than the model reads."""
    if not request.inputs:
        raise EngineError("input must not be empty", param="input")
    if len(request.inputs) > MAX_EMBEDDING_INPUTS:
        raise EngineError(f"at most {MAX_EMBEDDING_INPUTS} inputs per request, got "
                          f"{len(request.inputs)}", param="input")
    for i, tokens in enumerate(request.inputs):
        if not tokens:
            raise EngineError(f"input[{i}] is empty", param="input")
        if vocab is not None and any(not 0 <= t < vocab for t in tokens):
            raise EngineError(f"input[{i}] contains token ids outside the vocabulary",
                              param="input")
        if len(tokens) > window:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {window} tokens, but input[{i}] "
                f"has {len(tokens)} tokens.", param="input")


def not_embedding(model_id: str) -> EngineError:
    return EngineError(f"model {model_id} does not support embeddings", param="model")


class GenerationStream(Protocol):
    """What `Engine.generate` returns: the events of one sequence, cancellable."""

    def __aiter__(self) -> AsyncIterator[TokenEvent]: ...

    def cancel(self) -> None:
        """Stop the sequence; the engine still sends a final event with the usage so far."""

    async def final(self) -> TokenEvent:
        """Wait for the final event (after a cancel, or to drain)."""


@dataclass(slots=True, frozen=True)
class TenantLoad:
    tenant: str
    waiting: int
    running: int
    served_input_tokens: int
    served_output_tokens: int
    counter: float
    weight: float


class TenantShares(Protocol):
    """The admission layer's per-tenant virtual token counters (`scheduling.FairQueue`),
    read by an engine that decides which of its sequences decode each step, so one set of
    counters orders both admission and tokens. Read from the engine's thread without a
    lock: a stale value only reorders one step."""

    def standing(self, tenant: str) -> float:
        """The tenant's counter: who has the smallest is served first."""

    def token_cost(self, tenant: str) -> float:
        """What one more output token adds to the tenant's counter."""


@runtime_checkable
class Engine(Protocol):
    async def start(self) -> None:
        """Load weights and start decoding; called once before the first request."""

    async def close(self) -> None: ...

    async def encode_chat(self, messages: list[ChatMessage],
                          tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Render the model's own chat template and tokenize the result; `tools` (OpenAI's
        `tools` entries) are handed to templates that take them."""

    async def encode_text(self, text: str) -> list[int]: ...

    async def generate(self, request: GenerationRequest) -> GenerationStream:
        """Validate and enqueue; raise `EngineError` before anything is produced."""

    async def embed(self, request: EmbeddingRequest) -> Embeddings:
        """One vector per input; `EngineError` for bad inputs or an engine without the
        "embed" capability."""

    def info(self) -> EngineInfo: ...

    def stats(self) -> EngineStats: ...
