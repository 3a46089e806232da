"""Request bodies of the OpenAI API, checked strictly: a bad value is a 400, never a crash.

Unknown fields are ignored (clients send vendor extensions); known fields that this server
cannot honour yet are refused by name, not silently dropped.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

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


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: Annotated[str, Field(max_length=64)] | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, Field(min_length=1, max_length=256)]
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[int, Field(ge=0, le=100_000)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**64 - 1)] | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None
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

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if any(not s or len(s) > 256 for s in stops):
            raise ValueError("stop strings must be 1 to 256 characters")
        return stops

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
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value and value.get("type") not in (None, "text"):
            raise ValueError("only response_format {'type': 'text'} is supported for now")
        return value

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list[Any] | None) -> None:
        if value:
            raise ValueError("tool calling is not supported by this server yet")
        return None

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
