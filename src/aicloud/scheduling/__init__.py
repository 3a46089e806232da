"""Who runs next: a per-model waiting line ordered by priority class, then by tenant-fair
virtual token counters (VTC), with back-pressure when it grows too long or too old."""

from aicloud.scheduling.fair_queue import FairQueue, Mode, Priority, SchedulingConfig

__all__ = ["FairQueue", "Mode", "Priority", "SchedulingConfig"]
