"""Files' bytes on disk: one file per id under one folder, written to a temporary name
and renamed, so a reader never sees half a file and a crash leaves no file with an id.

Paths are made from ids this server generated (and checks the shape of), never from a
client's file name.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")
CHUNK = 1 << 20


class TooLarge(ValueError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the file exceeds the {limit} byte limit")
        self.limit = limit


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


def is_file_id(text: str) -> bool:
    return bool(FILE_ID.match(text))


class FileStorage:
    """Blocking calls: the server runs them on worker threads."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, file_id: str) -> Path:
        if not is_file_id(file_id):
            raise ValueError("not a file id")
        return self.root / file_id

    def save(self, file_id: str, source: BinaryIO, limit: int,
             check: Callable[[Iterator[bytes]], object] | None = None) -> int:
        """Copy `source` in, at most `limit` bytes, then run `check` over its lines
        (it raises to refuse the file); returns the size. Nothing stays on refusal."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        target = self.path(file_id)
        tmp = target.with_name(f".{file_id}.part")
        try:
            with tmp.open("wb") as out:
                size = _copy(source, out, limit)
                out.flush()
                os.fsync(out.fileno())
            if check is not None:
                with tmp.open("rb") as lines:
                    check(iter(lines))
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return size

    def write(self, file_id: str, data: bytes) -> int:
        """A file this server made (a batch's output): same id, same bytes, every time."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        target = self.path(file_id)
        tmp = target.with_name(f".{file_id}.part")
        with tmp.open("wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
        return len(data)

    def lines(self, file_id: str) -> list[bytes]:
        with self.path(file_id).open("rb") as source:
            return source.readlines()

    def delete(self, file_id: str) -> None:
        self.path(file_id).unlink(missing_ok=True)


def _copy(source: BinaryIO, out: BinaryIO, limit: int) -> int:
    size = 0
    while chunk := source.read(CHUNK):
        size += len(chunk)
        if size > limit:
            raise TooLarge(limit)
        out.write(chunk)
    return size


__all__ = ["FileStorage", "TooLarge", "is_file_id", "new_file_id"]
