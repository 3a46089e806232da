"""The Batch API: batches and their lines in the database, and the runner that drives
them through the same path as interactive requests, in the capacity those leave idle."""

from aicloud.batches.runner import BatchRunner, LineCall, LineExecutor, LineOutcome
from aicloud.batches.store import BatchStateError, BatchStore, BatchView, Status

__all__ = ["BatchRunner", "BatchStateError", "BatchStore", "BatchView", "LineCall",
           "LineExecutor", "LineOutcome", "Status"]
