"""The body of `POST /v1/responses`, checked strictly. Fields this server cannot honour are
refused by name; everything it honours is translated to a chat completion (items.py)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

MAX_ITEMS = 4096
MAX_METADATA = 16
# OpenAI fields nothing here can honour: a 400 naming the field when set
UNSUPPORTED = {
    "reasoning": "reasoning is not supported by this server's models",
    "background": "background responses are not supported by this server",
    "conversation": "conversations are not supported; use previous_response_id",
    "prompt": "prompt templates are not supported by this server",
    "max_tool_calls": "max_tool_calls is not supported by this server",
    "context_management": "context_management is not supported by this server",
    "stream_options": "stream_options is not supported on /v1/responses",
}


class InputText(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["input_text", "output_text", "text"]
    text: str


class MessageItem(BaseModel):
    """A message; `type` may be left out, as the OpenAI SDK's easy form does."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputText]
    id: str | None = None
    status: str | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionCallItem(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function_call"]
    call_id: Annotated[str, Field(min_length=1, max_length=128)]
    name: Annotated[str, Field(min_length=1, max_length=64)]
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function_call_output"]
    call_id: Annotated[str, Field(min_length=1, max_length=128)]
    output: str | list[InputText]
    id: str | None = None
    status: str | None = None

    @property
    def text(self) -> str:
        if isinstance(self.output, str):
            return self.output
        return "".join(part.text for part in self.output)


Item = MessageItem | FunctionCallItem | FunctionCallOutputItem


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(BaseModel):
    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    """`text.format`: Responses puts the json_schema fields beside `type`, chat nests them."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    name: Annotated[str, Field(max_length=64)] | None = None
    schema_: Annotated[dict[str, Any] | None, Field(alias="schema")] = None
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> TextFormat:
        if self.type == "json_schema" and (self.schema_ is None or not self.name):
            raise ValueError("a json_schema format needs a name and a schema")
        return self


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = None  # the only one a plain model can honour


class ResponseCreate(BaseModel):
    """Unknown fields are ignored (as for chat); known OpenAI fields that need what this
    server does not have (hosted tools, reasoning, background runs, conversations, prompt
    templates, truncation) are refused with a 400 that names them."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    model: Annotated[str, Field(min_length=1, max_length=256)]
    input: Annotated[str, Field(min_length=1)] | Annotated[
        list[Annotated[Item, Field(discriminator="type")] | MessageItem],
        Field(min_length=1, max_length=MAX_ITEMS)]
    instructions: str | None = None
    previous_response_id: Annotated[str, Field(max_length=64)] | None = None
    store: bool = True
    stream: bool = False
    max_output_tokens: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] | None = None
    tools: Annotated[list[FunctionTool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    metadata: dict[Annotated[str, Field(max_length=64)],
                   Annotated[str, Field(max_length=512)]] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    safety_identifier: Annotated[str, Field(max_length=256)] | None = None
    prompt_cache_key: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    service_tier: Literal["auto", "default", "flex", "priority", "scale"] | None = None
    truncation: Literal["disabled"] | None = None
    include: list[Literal["message.output_text.logprobs"]] | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    # refused when set: nothing here can honour them
    reasoning: Any = None
    background: Any = None
    conversation: Any = None
    prompt: Any = None
    max_tool_calls: Any = None
    context_management: Any = None
    stream_options: Any = None

    @field_validator("metadata")
    @classmethod
    def _few_pairs(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and len(value) > MAX_METADATA:
            raise ValueError(f"at most {MAX_METADATA} metadata pairs")
        return value

    @field_validator(*UNSUPPORTED)
    @classmethod
    def _not_honoured(cls, value: Any, info: ValidationInfo) -> None:
        if value not in (None, False, {}, []):  # null and empty values ask for nothing
            raise ValueError(UNSUPPORTED[str(info.field_name)])
        return None

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        include = info.data.get("include") or []
        if value and "message.output_text.logprobs" not in include:
            raise ValueError("top_logprobs needs include: ['message.output_text.logprobs']")
        return value

    @property
    def format(self) -> TextFormat | None:
        return self.text.format if self.text else None

    @property
    def wants_logprobs(self) -> bool:
        return bool(self.include and "message.output_text.logprobs" in self.include)
