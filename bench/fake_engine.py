"""An instant engine for measuring the cloud path alone, and aicloud served on it.

`FakeEngine` implements aicloud's Engine protocol (`engines/base.py`) with no model: a
prompt is one token per four characters, and `generate` answers at once with a single
final event carrying a fixed text and its usage, so whatever time a request takes is
spent in the API, auth, limits, budget hold and ledger.

Run as a script, it serves aicloud on that engine with one uvicorn worker:

    python bench/fake_engine.py --port 8001 --home /tmp/aicloud-bench \
        [--database-url postgresql://postgres@127.0.0.1:5432/aicloud_bench_x]
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aicloud.engines.base import (
    ChatMessage,
    EmbeddingRequest,
    Embeddings,
    EngineInfo,
    EngineStats,
    FinishReason,
    GenerationRequest,
    TokenEvent,
    Usage,
    not_embedding,
)

MODEL = "fake-instant"
TEXT = "Hello! I am an instant fake engine."
COMPLETION_TOKENS = 9


class InstantStream:
    """The events of one fake sequence: a single final event, ready before anyone asks."""

    def __init__(self, event: TokenEvent) -> None:
        self._event = event

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        yield self._event

    def cancel(self) -> None:
        """Nothing runs, so nothing to stop."""

    async def final(self) -> TokenEvent:
        return self._event


class FakeEngine:
    def __init__(self, model_id: str = MODEL, context_length: int = 4096) -> None:
        self._info = EngineInfo(model_id, context_length, max_sequences=1024, kind="fake")
        self.served = 0

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def encode_chat(self, messages: list[ChatMessage],
                          tools: list[dict[str, Any]] | None = None) -> list[int]:
        return await self.encode_text("".join(m.content for m in messages))

    async def encode_text(self, text: str) -> list[int]:
        return [1] * (len(text) // 4 + 1)

    async def generate(self, request: GenerationRequest) -> InstantStream:
        completion = min(COMPLETION_TOKENS, request.max_tokens or COMPLETION_TOKENS)
        reason = FinishReason.STOP if completion == COMPLETION_TOKENS else FinishReason.LENGTH
        self.served += 1
        return InstantStream(TokenEvent(TEXT, completion, reason,
                                        Usage(len(request.prompt_tokens), completion)))

    async def embed(self, request: EmbeddingRequest) -> Embeddings:
        raise not_embedding(self._info.model_id)

    def info(self) -> EngineInfo:
        return self._info

    def stats(self) -> EngineStats:
        return EngineStats(running=0, waiting=0, tokens_per_second=0.0, kv_cells_used=0,
                           kv_cells_total=0)


def serve(port: int, home: Path, database_url: str | None) -> None:
    import uvicorn

    from aicloud.api.app import create_app
    from aicloud.config import Settings
    from aicloud.models.pool import ModelPool

    settings = Settings(home=home, database_url=database_url, port=port, log_level="warning")
    app = create_app(settings, ModelPool({MODEL: FakeEngine()}))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                loop="uvloop", http="httptools")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    serve(args.port, args.home, args.database_url)


if __name__ == "__main__":
    main()
