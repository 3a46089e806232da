"""A request's life in the cluster, as the API sees it: waiting in the model's queue,
running on a replica, or done. It is the GenerationStream the API iterates."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

from aicloud.engines.base import FinishReason, GenerationRequest, TokenEvent, Usage
from aicloud.engines.events import EventQueue


class Phase(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    DONE = 2


class ClusterStream(EventQueue):
    def __init__(self, request: GenerationRequest,
                 on_cancel: Callable[[ClusterStream], None]) -> None:
        super().__init__()
        self.request = request
        self.phase = Phase.WAITING
        self.enqueued_at = time.monotonic()
        self.replica: int | None = None
        self.delivered = 0  # events handed to the API; 0 means it may still move replicas
        self.completion_tokens = 0
        self._on_cancel = on_cancel

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def deliver(self, event: TokenEvent) -> None:
        if self.phase is Phase.DONE:
            return
        self.delivered += 1
        self.completion_tokens = event.completion_tokens
        if event.finish_reason is not None:
            self.phase = Phase.DONE
        self.put(event)

    def end(self, reason: FinishReason, text: str = "") -> None:
        """Finish from this side (cancelled while waiting, replica lost mid-stream): the
        usage is what the API saw produced."""
        prompt = len(self.request.prompt_tokens) if self.delivered else 0
        usage = Usage(prompt, self.completion_tokens)
        self.deliver(TokenEvent(text, self.completion_tokens, reason, usage))

    def cancel(self) -> None:
        if self.phase is not Phase.DONE:
            self._on_cancel(self)
