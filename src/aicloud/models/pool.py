"""The engines this server runs, by model id."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from aicloud.engines.base import Engine, EngineError


class UnknownModel(LookupError):
    pass


@dataclass(slots=True, frozen=True)
class ModelCard:
    id: str
    created: int
    owned_by: str = "aicloud"
    capabilities: tuple[str, ...] = ()


class ModelPool:
    def __init__(self, engines: dict[str, Engine]) -> None:
        self._engines = engines
        self._created = int(time.time())

    async def start(self) -> None:
        await asyncio.gather(*(e.start() for e in self._engines.values()))

    async def close(self) -> None:
        await asyncio.gather(*(e.close() for e in self._engines.values()))

    def get(self, model_id: str) -> Engine:
        try:
            return self._engines[model_id]
        except KeyError:
            raise UnknownModel(model_id) from None

    def cards(self) -> list[ModelCard]:
        return [ModelCard(mid, self._created, capabilities=_capabilities(engine))
                for mid, engine in self._engines.items()]

    def items(self) -> list[tuple[str, Engine]]:
        return list(self._engines.items())


def _capabilities(engine: Engine) -> tuple[str, ...]:
    """What the engine says it can do; nothing while it is not running (a Ray model whose
    replicas are all starting)."""
    try:
        return tuple(sorted(engine.info().capabilities))
    except EngineError:
        return ()
