"""A sequence's guide, without a model: what ends a constrained sequence, and how."""

from __future__ import annotations

import asyncio

import llguidance

from aicloud.engines.base import FinishReason, GenerationRequest
from aicloud.engines.llamacpp.constrain import Guide
from aicloud.engines.llamacpp.sequence import Sequence
from aicloud.structured import compile_constraint
from tests.structured.test_grammar import PERSON, ByteTokenizer

EOS = 256


def sequence(max_tokens: int = 100) -> Sequence:
    constraint = compile_constraint("json_schema", PERSON)
    assert constraint is not None
    tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(ByteTokenizer()))
    matcher = llguidance.LLMatcher(tokenizer, constraint.grammar, log_level=0)
    return Sequence(GenerationRequest("g", [1]), asyncio.new_event_loop(), lambda e: None,
                    max_tokens=max_tokens, guide=Guide(matcher))


def feed(seq: Sequence, text: str) -> list[FinishReason | None]:
    return [seq.on_token(b, bytes([b]), False).finish_reason for b in text.encode()]


def test_a_complete_instance_ends_the_sequence_without_end_of_text() -> None:
    seq = sequence()
    reasons = feed(seq, '{"name":"Al","age":7}')
    assert reasons[:-1] == [None] * (len(reasons) - 1)
    assert reasons[-1] is FinishReason.STOP


def test_a_token_the_grammar_refuses_is_an_error_not_a_stop() -> None:
    seq = sequence()
    assert feed(seq, '{"name"') == [None] * 7
    assert seq.on_token(ord("}"), b"}", False).finish_reason is FinishReason.ERROR


def test_a_failed_matcher_is_an_error_even_at_end_of_text() -> None:
    """A matcher that failed while computing its mask allows only end-of-text; that must
    not look like a finished answer."""
    seq = sequence()
    feed(seq, '{"na')
    assert seq.guide is not None
    seq.guide.matcher.consume_token(ord("}"))  # puts it in its error state
    assert seq.on_token(EOS, b"", True).finish_reason is FinishReason.ERROR


def test_max_tokens_inside_the_json_is_length() -> None:
    seq = sequence(max_tokens=5)
    assert feed(seq, '{"nam')[-1] is FinishReason.LENGTH
