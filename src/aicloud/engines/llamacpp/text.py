"""Turning sampled tokens into safe text deltas: whole UTF-8 characters only, and stop
strings cut out even when they span several tokens."""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field


class Utf8Stream:
    """Bytes in, complete characters out; a character split across tokens waits for its
    remaining bytes instead of leaking a broken sequence into a delta."""

    __slots__ = ("_decoder",)

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        return self._decoder.decode(data, final=False)

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


@dataclass(slots=True)
class StopMatcher:
    """Holds back just enough text to tell whether a stop string is starting.

    `push` returns the text that is safe to send and whether a stop string was hit (the
    stop string itself and anything after it are never sent, as in OpenAI's API).
    """

    stops: tuple[str, ...]
    _pending: str = field(default="", init=False)

    def push(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        pending = self._pending + text
        hit = min((i for i in (pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if hit >= 0:
            self._pending = ""
            return pending[:hit], True
        keep = self._held_back(pending)
        self._pending = pending[len(pending) - keep:] if keep else ""
        return pending[: len(pending) - keep], False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out

    def _held_back(self, pending: str) -> int:
        """Length of the longest suffix of `pending` that is a proper prefix of a stop."""
        for n in range(min(len(pending), max(map(len, self.stops)) - 1), 0, -1):
            tail = pending[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
