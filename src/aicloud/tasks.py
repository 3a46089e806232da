"""Background tasks that must not die quietly: the housekeeping that replays spooled
usage is one, and if it stopped, usage written during an outage would never land."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


async def supervised(name: str, work: Callable[[], Awaitable[object]], *,
                     pause: float = 1.0) -> None:
    """Run `work` until cancelled: whenever it returns or raises, log that and start it
    again `pause` seconds later. Cancelling this coroutine cancels `work` with it."""
    while True:
        try:
            await work()
            log.error("%s stopped; restarting it", name)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s died; restarting it in %.0f s", name, pause)
        await asyncio.sleep(pause)
