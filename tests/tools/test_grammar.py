"""The tool grammars against the bundled model's own tokenizer: what each choice lets the
model write, and what it refuses, token by token."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import llama_cpp
import llguidance
import llguidance.llamacpp
import pytest

from aicloud.models.catalog import bundled_model
from aicloud.tools import (
    FALLBACK,
    LLAMA3_JSON,
    MISTRAL,
    CallFormat,
    Function,
    Mode,
    ToolChoice,
    ToolError,
    ToolSpec,
    check_functions,
    constraint,
)

WEATHER = Function("get_weather", {"type": "object", "properties": {
    "city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}, "required": ["city"]})
ADD = Function("add", {"type": "object", "properties": {
    "a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]})
FUNCTIONS = (WEATHER, ADD)
CALL = '<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris","unit":"c"}}\n</tool_call>'
ADD_CALL = '<tool_call>\n{"name":"add","arguments":{"a":1,"b":2}}\n</tool_call>'


@pytest.fixture(scope="module")
def tokenizer() -> Iterator[llguidance.LLTokenizer]:
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(bundled_model().path).encode(), params)
    try:
        with warnings.catch_warnings():  # llguidance calls a deprecated llama.cpp alias
            warnings.simplefilter("ignore", DeprecationWarning)
            vocab = llama_cpp.llama_model_get_vocab(model)
            tokenizer = llguidance.llamacpp.lltokenizer_from_vocab(vocab)
        yield tokenizer
    finally:
        llama_cpp.llama_model_free(model)


def accepts(tokenizer: llguidance.LLTokenizer, spec: ToolSpec, text: str,
            fmt: CallFormat = FALLBACK) -> bool:
    """Whether the model may write `text` and then end (end-of-text only when the grammar
    accepts), as the batcher applies the constraint."""
    found = constraint(spec, fmt)
    assert found is not None
    matcher = llguidance.LLMatcher(tokenizer, found.grammar)
    assert not matcher.is_error(), matcher.get_error()
    tokens = tokenizer.tokenize_str(text)
    if matcher.validate_tokens(tokens) != len(tokens):
        return False
    assert matcher.consume_tokens(tokens)
    return matcher.is_accepting()


def spec(mode: Mode, name: str | None = None, parallel: bool = True) -> ToolSpec:
    return ToolSpec(FUNCTIONS, ToolChoice(mode, name), parallel)


def test_required_forces_a_call_from_the_first_token(tokenizer: llguidance.LLTokenizer) -> None:
    required = spec(Mode.REQUIRED)
    assert accepts(tokenizer, required, CALL)
    assert not accepts(tokenizer, required, "Hello")
    assert not accepts(tokenizer, required, "Sure. " + CALL)
    found = constraint(required, FALLBACK)
    assert found is not None
    matcher = llguidance.LLMatcher(tokenizer, found.grammar)
    assert matcher.compute_ff_bytes() == b'<tool_call>\n{"name":"'


def test_arguments_must_match_the_schema(tokenizer: llguidance.LLTokenizer) -> None:
    required = spec(Mode.REQUIRED)
    bad = [
        CALL.replace('"Paris"', "3"),  # wrong type
        CALL.replace('"c"', '"k"'),  # outside the enum
        CALL.replace('"city":"Paris",', ""),  # a required field missing
        CALL.replace("get_weather", "get_time"),  # an undeclared function
        ADD_CALL.replace('"a":1', '"a":"1"'),
    ]
    for text in bad:
        assert not accepts(tokenizer, required, text), text
    assert not accepts(tokenizer, required, CALL[:-5])  # cannot end inside a call
    # undeclared arguments only where the schema asks for them
    extra = CALL.replace('"unit":"c"', '"unit":"c","extra":1')
    assert not accepts(tokenizer, required, extra)
    open_ = Function(WEATHER.name, {**WEATHER.parameters, "additionalProperties": True})
    assert accepts(tokenizer, ToolSpec((open_,), ToolChoice(Mode.REQUIRED)), extra)


def test_named_choice_allows_only_that_function(tokenizer: llguidance.LLTokenizer) -> None:
    named = spec(Mode.NAMED, "add")
    assert accepts(tokenizer, named, ADD_CALL)
    assert not accepts(tokenizer, named, CALL)
    assert not accepts(tokenizer, named, ADD_CALL + "\n" + ADD_CALL)


def test_parallel_calls_only_when_allowed(tokenizer: llguidance.LLTokenizer) -> None:
    assert accepts(tokenizer, spec(Mode.REQUIRED), CALL + "\n" + ADD_CALL)
    assert not accepts(tokenizer, spec(Mode.REQUIRED, parallel=False), CALL + "\n" + ADD_CALL)
    assert accepts(tokenizer, spec(Mode.REQUIRED, parallel=False), ADD_CALL)


def test_auto_allows_text_or_a_call_that_is_then_forced(
        tokenizer: llguidance.LLTokenizer) -> None:
    auto = spec(Mode.AUTO)
    assert accepts(tokenizer, auto, "The weather in Paris is mild.")
    assert accepts(tokenizer, auto, "")
    assert accepts(tokenizer, auto, CALL)
    assert accepts(tokenizer, auto, "Let me check.\n" + CALL + "\n" + ADD_CALL)
    assert not accepts(tokenizer, auto, 'Let me check. <tool_call>\n{"name":"nope"')
    assert not accepts(tokenizer, auto, "<tool_call>\nnot json")
    assert not accepts(tokenizer, auto, CALL + " and some text after")


def test_other_formats(tokenizer: llguidance.LLTokenizer) -> None:
    auto = spec(Mode.AUTO)
    llama = '{"name":"add","parameters":{"a":1,"b":2}}'
    assert accepts(tokenizer, auto, "Plain text.", LLAMA3_JSON)
    assert accepts(tokenizer, auto, f"{llama}; {llama}", LLAMA3_JSON)
    assert not accepts(tokenizer, auto, '{"answer": 1}', LLAMA3_JSON)
    mistral = '[TOOL_CALLS][{"name":"add","arguments":{"a":1,"b":2}}]'
    assert accepts(tokenizer, spec(Mode.REQUIRED), mistral, MISTRAL)
    assert not accepts(tokenizer, spec(Mode.REQUIRED), mistral.replace("1", '"x"'), MISTRAL)


def test_none_has_no_grammar() -> None:
    assert constraint(spec(Mode.NONE), FALLBACK) is None


@pytest.mark.parametrize("parameters", [
    {"type": "object", "properties": {"x": {"type": "nonsense"}}},
    {"type": "string"},
    {"type": "object", "properties": {"x": {"$ref": "#/missing"}}},
])
def test_a_bad_schema_is_named_by_its_index(parameters: dict) -> None:
    bad = ToolSpec((WEATHER, Function("broken", parameters)))
    with pytest.raises(ToolError) as caught:
        check_functions(bad)
    assert caught.value.param == "tools[1].function.parameters"
    legacy = ToolSpec((WEATHER, Function("broken", parameters)), legacy=True, parallel=False)
    with pytest.raises(ToolError) as caught:
        check_functions(legacy)
    assert caught.value.param == "functions[1].parameters"


def test_choice_and_names_are_checked() -> None:
    with pytest.raises(ToolError) as caught:
        ToolSpec(FUNCTIONS, ToolChoice(Mode.NAMED, "missing"))
    assert caught.value.param == "tool_choice"
    with pytest.raises(ToolError) as caught:
        ToolSpec((ADD, ADD))
    assert caught.value.param == "tools"
