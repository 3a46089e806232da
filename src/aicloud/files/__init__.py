"""Uploaded files (the Files API): bytes on disk, rows per project, batch input checks."""

from aicloud.files.jsonl import InvalidFile
from aicloud.files.storage import FileStorage, TooLarge
from aicloud.files.store import FileStore, FileView

__all__ = ["FileStorage", "FileStore", "FileView", "InvalidFile", "TooLarge"]
