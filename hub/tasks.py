"""Stopping background tasks reliably.

On Python 3.11, ``asyncio.wait_for`` (which redis-py wraps around socket I/O) can swallow a
cancellation that arrives just as the awaited operation completes; the task then runs on as if
never cancelled. So a task is cancelled again until it is really done.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any]], retry_s: float = 0.2) -> None:
    """Cancel ``tasks`` and wait until every one has finished, re-cancelling any that carried on."""
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=retry_s)
