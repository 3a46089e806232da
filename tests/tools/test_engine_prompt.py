"""The llama.cpp engine's side of tools: its template's source picks the format, and a
conversation with calls and results renders and tokenizes (the bundled model's template
knows no tools, so this is the fallback)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from aicloud.engines.base import ChatMessage, ChatToolCall
from aicloud.engines.llamacpp.engine import LlamaCppEngine
from aicloud.engines.llamacpp.model import ContextConfig
from aicloud.models.catalog import bundled_model
from aicloud.tools import FALLBACK, Function, choose, for_template
from tests.conftest import LoopThread

ADD = Function("add", {"type": "object", "properties": {"a": {"type": "integer"}}})


@pytest.fixture(scope="module")
def engine(loop_thread: LoopThread) -> Iterator[LlamaCppEngine]:
    spec = bundled_model()
    eng = LlamaCppEngine(spec.model_id, spec.path,
                         ContextConfig(sequences=1, context_per_sequence=512))
    loop_thread.run(eng.start())
    yield eng
    loop_thread.run(eng.close())


def test_history_with_calls_renders_through_the_fallback(engine: LlamaCppEngine,
                                                          loop_thread: LoopThread) -> None:
    template = engine.info().chat_template
    assert template and "<|im_start|>" in template
    assert choose(template) is FALLBACK
    history = [ChatMessage("user", "Add one."),
               ChatMessage("assistant", "", tool_calls=(ChatToolCall("c1", "add", '{"a":1}'),)),
               ChatMessage("tool", "1", tool_call_id="c1")]
    messages, tools = for_template(history, [ADD], FALLBACK)
    with_tools = loop_thread.run(engine.encode_chat(messages, tools))
    plain = loop_thread.run(engine.encode_chat([ChatMessage("user", "Add one.")]))
    text = b"".join(engine.model.piece(t) for t in with_tools).decode()
    assert len(with_tools) > len(plain) + 50  # the tool description is there
    assert '"name": "add"' in text  # in the system message's <tools>
    assert '<tool_call>\n{"name":"add","arguments":{"a":1}}\n</tool_call>' in text
    assert "<tool_response>\n1\n</tool_response>" in text
