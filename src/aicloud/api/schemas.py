"""Request bodies of the OpenAI API, checked strictly: a bad value is a 400, never a crash.

Unknown fields are ignored (clients send vendor extensions); known fields that this server
cannot honour yet are refused by name, not silently dropped.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from aicloud.engines.base import MAX_EMBEDDING_INPUTS

Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
MaxTokens = Annotated[int, Field(ge=1, le=1_000_000)]
MAX_MESSAGES = 4096
MAX_STOPS = 4
MAX_N = 16  # choices per prompt
MAX_PROMPTS = 32  # prompts in one /v1/completions request
MAX_CHOICES = 64  # prompts x n
MAX_LOGIT_BIAS = 300  # OpenAI's bound
Bias = Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


FunctionName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


class FunctionCall(BaseModel):
    """A call as an assistant message carries it (`arguments` is JSON text)."""

    name: FunctionName
    arguments: Annotated[str, Field(max_length=1_000_000)]


class ToolCall(BaseModel):
    id: Annotated[str, Field(min_length=1, max_length=256)]
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(BaseModel):
    name: FunctionName
    description: Annotated[str, Field(max_length=16_384)] | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # every schema is enforced while generating, strict or not


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: FunctionName


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: Annotated[str, Field(max_length=64)] | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=128)] | None = None
    tool_call_id: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    function_call: FunctionCall | None = None  # legacy: an assistant's one call

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class JsonSchemaFormat(BaseModel):
    """OpenAI's `response_format.json_schema`. `strict` is accepted either way: every
    schema is enforced while the text is generated, never checked afterwards."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: Annotated[str, Field(max_length=4096)] | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema', and only then")
        return self

    @property
    def schema_document(self) -> dict[str, Any] | None:
        return self.json_schema.schema_ if self.json_schema else None


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, Field(min_length=1, max_length=256)]
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[int, Field(ge=0, le=100_000)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**64 - 1)] | None = None
    stop: str | list[str] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    logit_bias: Annotated[dict[TokenId, Bias], Field(max_length=MAX_LOGIT_BIAS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    # as vLLM's: requests share cached prompt prefixes only with the same salt (and scope)
    cache_salt: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    # OpenAI's tiers: "flex" is slower and cheaper, so it runs in the batch class here
    service_tier: Literal["auto", "default", "flex", "priority", "scale"] | None = None
    response_format: ResponseFormat | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences, got {len(stops)}")
        if any(not s or len(s) > 256 for s in stops):
            raise ValueError("stop strings must be 1 to 256 characters")
        return stops

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: StreamOptions | None,
                             info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    @property
    def stops(self) -> tuple[str, ...]:
        return tuple(self.stop or ())

    @property
    def choices(self) -> int:
        return self.n or 1

    @property
    def priority(self) -> int:
        """0 interactive, 1 batch (the scheduler's classes)."""
        return 1 if self.service_tier == "flex" else 0


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: MaxTokens | None = None
    logprobs: Annotated[bool, Field(strict=True)] | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20, strict=True)] | None = None
    tools: Annotated[list[Tool], Field(min_length=1, max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # legacy function calling, served by the same machinery as tools
    functions: Annotated[list[FunctionDefinition], Field(min_length=1, max_length=128)] | None \
        = None
    function_call: Literal["none", "auto"] | NamedFunction | None = None
    modalities: list[str] | None = None
    # OpenAI request fields this server does not honour: refused by name when set
    prediction: Any = None
    reasoning_effort: Any = None
    audio: Any = None
    web_search_options: Any = None
    verbosity: Any = None
    metadata: Any = None
    moderation: Any = None
    prompt_cache_options: Any = None
    store: bool | None = None
    # kept in memory while the server runs, which is what "in_memory" asks
    prompt_cache_retention: Literal["in_memory"] | None = None
    # accepted: identify the end user (as `user`); OpenAI's cache routing key, which here
    # partitions the project's prefix cache like `cache_salt` (Responses does the same)
    safety_identifier: Annotated[str, Field(max_length=256)] | None = None
    prompt_cache_key: Annotated[str, Field(min_length=1, max_length=1024)] | None = None

    @model_validator(mode="after")
    def _cache_key_salts(self) -> ChatCompletionRequest:
        if self.prompt_cache_key is not None and self.cache_salt is None:
            self.cache_salt = self.prompt_cache_key
        return self

    @field_validator("modalities")
    @classmethod
    def _text_out(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and value != ["text"]:
            raise ValueError('only modalities ["text"] is supported by this server')
        return value

    @field_validator("prediction", "reasoning_effort", "audio", "web_search_options",
                     "verbosity", "metadata", "moderation", "prompt_cache_options")
    @classmethod
    def _not_honoured(cls, value: Any, info: ValidationInfo) -> None:
        if value:  # null, {} or "" ask for nothing
            raise ValueError(f"{info.field_name} is not supported by this server")
        return None

    @field_validator("store")
    @classmethod
    def _not_stored(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("store is not supported by this server: completions are "
                             "not kept")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    @property
    def completion_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def top_logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


Prompt = str | list[Annotated[int, Field(ge=0)]]


class CompletionRequest(SamplingFields):
    # one prompt (text or token ids) or a list of them; always a list once parsed
    prompt: str | list[Annotated[int, Field(ge=0)]] | list[str] | list[list[
        Annotated[int, Field(ge=0)]]]
    logprobs: Annotated[int, Field(ge=0, le=5, strict=True)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1, le=MAX_N)] | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: Any) -> list[Prompt]:
        many = isinstance(value, list) and bool(value) and isinstance(value[0], str | list)
        prompts: list[Prompt] = list(value) if many else [value]
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        if any(not p for p in prompts):
            raise ValueError("the prompt is empty")
        return prompts

    @field_validator("suffix")
    @classmethod
    def _unsupported(cls, value: Any) -> Any:
        if value:
            raise ValueError("suffix is not supported by this server")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: int | None, info: ValidationInfo) -> int | None:
        """best_of > n would generate choices we do not return and pick by a score: not
        offered; best_of == n is plain n."""
        if value is not None and value != (info.data.get("n") or 1):
            raise ValueError("best_of is only supported equal to n")
        return value

    @field_validator("echo")
    @classmethod
    def _echo_without_logprobs(cls, value: bool, info: ValidationInfo) -> bool:
        """Prompt logprobs would need logits at every prompt position, which prefix reuse
        and chunked prefill do not keep: refused rather than half-filled."""
        if value and info.data.get("logprobs") is not None:
            raise ValueError("echo with logprobs (the prompt's logprobs) is not supported; "
                             "ask for one or the other")
        return value

    @property
    def prompts(self) -> list[Prompt]:
        return self.prompt  # type: ignore[return-value]  # made a list by _prompts

    @property
    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs

class EmbeddingRequest(BaseModel):
    """`input`: a string, strings, a token array or token arrays (at most 2048)."""

    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, Field(min_length=1, max_length=256)]
    input: str | list[str] | list[Annotated[int, Field(ge=0)]] | list[
        list[Annotated[int, Field(ge=0)]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None

    @field_validator("input")
    @classmethod
    def _inputs(cls, value: Any) -> Any:
        items = [value] if isinstance(value, str) else value
        if not items:
            raise ValueError("input must not be empty")
        if len(items) > MAX_EMBEDDING_INPUTS and not isinstance(items[0], int):
            raise ValueError(f"at most {MAX_EMBEDDING_INPUTS} inputs per request, got "
                             f"{len(items)}")
        if any(isinstance(item, str | list) and not item for item in items):
            raise ValueError("input must not contain an empty string or token array")
        return value

    @property
    def texts_or_tokens(self) -> list[str] | list[list[int]]:
        """One entry per input: a string to tokenize, or its token ids."""
        value = self.input
        if isinstance(value, str):
            return [value]
        # pydantic checked each alternative whole: one int means a list of ints
        if value and isinstance(value[0], int):
            return [list(value)]
        return cast("list[str] | list[list[int]]", value).copy()
