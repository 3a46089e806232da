"""Behaviour every engine must show, checked the same way for each (llama.cpp, vLLM)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from aicloud.engines.base import FinishReason, TokenEvent
from aicloud.engines.llamacpp.engine import LlamaCppEngine
from aicloud.engines.llamacpp.model import ContextConfig
from aicloud.models.catalog import bundled_model
from tests.conftest import LoopThread

Generate = Callable[[str, int, tuple[str, ...]], tuple[list[TokenEvent], str]]


def check_stop_string_cuts_the_text(generate: Generate) -> None:
    """A stop string that starts inside one token and ends inside a later one ends the text
    right before it. `generate(prompt, max_tokens, stop)` runs one greedy request."""
    prompt = "Count from one to ten in words separated by commas."
    _, full = generate(prompt, 40, ())
    idx = full.index(",") if "," in full else 3
    stop = full[idx - 2 : idx + 3]
    events, text = generate(prompt, 40, (stop,))
    assert text == full[: full.index(stop)]
    assert events[-1].finish_reason is FinishReason.STOP


def running_engine(loop_thread: LoopThread, config: ContextConfig) -> Iterator[LlamaCppEngine]:
    """The bundled model on the real engine with `config`, for a module's fixture:
    `yield from running_engine(...)`."""
    spec = bundled_model()
    engine = LlamaCppEngine(spec.model_id, spec.path, config)
    loop_thread.run(engine.start())
    yield engine
    loop_thread.run(engine.close())
