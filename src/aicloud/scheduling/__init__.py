"""Who runs next: the one admission layer in front of every engine (`Admitter`), keeping
a per-model waiting line ordered by priority class, then by tenant-fair virtual token
counters (VTC), with back-pressure when it grows too long or too old."""

from aicloud.engines.base import Priority
from aicloud.scheduling.admission import Admitter, unwrap
from aicloud.scheduling.fair_queue import FairQueue, Mode, SchedulingConfig

__all__ = ["Admitter", "FairQueue", "Mode", "Priority", "SchedulingConfig", "unwrap"]
