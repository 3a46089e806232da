"""Files per project: the rows say what each file is, `FileStorage` holds the bytes.

Every read and delete is filtered by the caller's project, so another project's file id
looks exactly like a missing one.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import PurePosixPath, PureWindowsPath
from typing import BinaryIO

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from aicloud.accounts.base import aware, now
from aicloud.files import jsonl
from aicloud.files.storage import FileStorage, is_file_id, new_file_id
from aicloud.store.tables import StoredFile

PURPOSES = ("batch",)  # what a client may upload
OUTPUT_PURPOSES = ("batch_output",)  # what this server writes
MAX_FILENAME = 255
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(slots=True, frozen=True)
class FileView:
    id: str
    project_id: str
    purpose: str
    filename: str
    bytes: int
    created_at: datetime


def clean_filename(name: str | None) -> str:
    """A client's file name is only shown back, never used as a path: its last part,
    without control characters, at most 255 characters."""
    base = PureWindowsPath(PurePosixPath(name or "").name).name
    return CONTROL.sub("", base)[:MAX_FILENAME] or "upload.jsonl"


def _view(row: StoredFile) -> FileView:
    return FileView(row.id, row.project_id, row.purpose, row.filename, row.bytes,
                    aware(row.created_at))


class FileStore:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], storage: FileStorage,
                 max_bytes: int) -> None:
        self._sessions = sessions
        self.storage = storage
        self.max_bytes = max_bytes

    async def upload(self, project_id: str, purpose: str, filename: str | None,
                     source: BinaryIO) -> FileView:
        """Copy, check (a batch file line by line: `jsonl.InvalidFile`), then record it;
        `storage.TooLarge` past `max_bytes`. The copy and the check run on a thread."""
        file_id = new_file_id()
        size = await asyncio.to_thread(self.storage.save, file_id, source, self.max_bytes,
                                       jsonl.parse if purpose == "batch" else None)
        row = StoredFile(id=file_id, project_id=project_id, purpose=purpose,
                         filename=clean_filename(filename), bytes=size, created_at=now())
        try:
            async with self._sessions.begin() as session:
                session.add(row)
        except BaseException:
            await asyncio.to_thread(self.storage.delete, file_id)
            raise
        return _view(row)

    async def get(self, project_id: str, file_id: str) -> FileView | None:
        if not is_file_id(file_id):
            return None
        async with self._sessions() as session:
            row = await session.scalar(select(StoredFile).where(
                StoredFile.id == file_id, StoredFile.project_id == project_id))
            return None if row is None else _view(row)

    async def find(self, project_id: str, purpose: str | None = None, after: str | None = None,
                   limit: int = 10_000, descending: bool = True) -> list[FileView]:
        """Newest first (or oldest with `descending=False`), after the file `after`."""
        query = select(StoredFile).where(StoredFile.project_id == project_id)
        if purpose is not None:
            query = query.where(StoredFile.purpose == purpose)
        order = (StoredFile.created_at.desc(), StoredFile.id.desc()) if descending else (
            StoredFile.created_at, StoredFile.id)
        async with self._sessions() as session:
            if after is not None and (mark := await self.get(project_id, after)) is not None:
                later = ((StoredFile.created_at < mark.created_at)
                         | ((StoredFile.created_at == mark.created_at)
                            & (StoredFile.id < mark.id))) if descending else (
                    (StoredFile.created_at > mark.created_at)
                    | ((StoredFile.created_at == mark.created_at) & (StoredFile.id > mark.id)))
                query = query.where(later)
            rows = await session.scalars(query.order_by(*order).limit(limit))
            return [_view(r) for r in rows]

    async def delete(self, project_id: str, file_id: str) -> bool:
        if not is_file_id(file_id):
            return False
        async with self._sessions.begin() as session:
            row = await session.scalar(select(StoredFile).where(
                StoredFile.id == file_id, StoredFile.project_id == project_id))
            if row is None:
                return False
            await session.execute(delete(StoredFile).where(StoredFile.id == file_id))
        await asyncio.to_thread(self.storage.delete, file_id)
        return True

    async def lines(self, project_id: str, file_id: str) -> list[bytes] | None:
        """A file's lines, or None if the project has no such file (or its bytes are gone)."""
        if await self.get(project_id, file_id) is None:
            return None
        try:
            return await asyncio.to_thread(self.storage.lines, file_id)
        except FileNotFoundError:
            return None
