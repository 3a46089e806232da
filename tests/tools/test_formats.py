"""Formats chosen from templates, and what the template renders with tools in the history."""

from __future__ import annotations

import json

import pytest

from aicloud.engines.base import ChatMessage, ChatToolCall
from aicloud.engines.llamacpp.chat import CHATML, ChatTemplate
from aicloud.tools import (
    FALLBACK,
    HERMES,
    LLAMA3_JSON,
    MISTRAL,
    Function,
    ToolError,
    check_history,
    choose,
    for_template,
)

# The tool parts of Qwen2.5's template, which writes Hermes tags
QWEN_LIKE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools><|im_end|>\n"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant"
    "{%- for tool_call in message.tool_calls %}\n<tool_call>\n"
    '{"name": "{{ tool_call.function.name }}", "arguments": '
    "{{ tool_call.function.arguments | tojson }}}\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n"
    "{{ message.content }}\n</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
LLAMA_LIKE = ('<|start_header_id|>{% if tools %}Respond with {"name": function name, '
              '"parameters": dictionary of argument name and its value}{% endif %}')
MISTRAL_LIKE = "{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}{% endif %}[TOOL_CALLS]"
ADD = Function("add", {"type": "object", "properties": {"a": {"type": "integer"}}},
               "Add numbers")
CALL = ChatToolCall("call_1", "add", '{"a": 1}')
HISTORY = [
    ChatMessage("user", "What is 1 plus nothing?"),
    ChatMessage("assistant", "", tool_calls=(CALL,)),
    ChatMessage("tool", "1", tool_call_id="call_1"),
]


def test_formats_come_from_the_template_text() -> None:
    assert choose(None) is FALLBACK
    assert choose(CHATML) is FALLBACK
    assert choose(QWEN_LIKE) is HERMES
    assert choose(LLAMA_LIKE) is LLAMA3_JSON
    assert choose(MISTRAL_LIKE) is MISTRAL
    assert choose("{% if tools %}{{ tools }}{% endif %}") is FALLBACK


def test_a_template_that_knows_tools_renders_them_and_the_history() -> None:
    messages, tools = for_template(HISTORY, [ADD], HERMES)
    assert tools == [ADD.as_tool()]
    text = ChatTemplate(QWEN_LIKE).render(messages, tools=tools)
    assert '"name": "add"' in text and '"description": "Add numbers"' in text
    # the arguments reach the template as a mapping, so `tojson` writes them once
    assert '{"name": "add", "arguments": {"a": 1}}' in text
    assert "<tool_response>\n1\n</tool_response>" in text


def test_the_fallback_describes_tools_in_the_system_message() -> None:
    messages, tools = for_template([ChatMessage("system", "Be brief."), *HISTORY], [ADD],
                                   FALLBACK)
    assert tools is None
    assert messages[0].role == "system" and messages[0].content.startswith("Be brief.\n\n")
    described = messages[0].content.split("<tools>\n")[1].split("\n</tools>")[0]
    assert json.loads(described) == ADD.as_tool()
    assert messages[2] == ChatMessage(
        "assistant", '<tool_call>\n{"name":"add","arguments":{"a": 1}}\n</tool_call>')
    assert messages[3] == ChatMessage("user", "<tool_response>\n1\n</tool_response>")
    text = ChatTemplate(None).render(messages)  # ChatML: the bundled model's family
    assert "<|im_start|>system\nBe brief." in text and "<|im_start|>tool" not in text


def test_the_fallback_without_offered_tools_still_renders_the_history() -> None:
    messages, _ = for_template(HISTORY, [], FALLBACK)
    assert [m.role for m in messages] == ["user", "assistant", "user"]


def test_a_tool_message_must_answer_an_earlier_call() -> None:
    check_history(HISTORY)
    for bad, param in [
        ([ChatMessage("tool", "1", tool_call_id="call_1")], "messages[0].tool_call_id"),
        ([*HISTORY, ChatMessage("tool", "2", tool_call_id="call_9")],
         "messages[3].tool_call_id"),
        ([*HISTORY[:2], ChatMessage("tool", "1")], "messages[2].tool_call_id"),
    ]:
        with pytest.raises(ToolError) as caught:
            check_history(bad)
        assert caught.value.param == param
