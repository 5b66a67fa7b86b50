"""Many far-apart deadlines on one timer: a heap of (when, owner) and one TimerHandle for the earliest.

Every connection has a token deadline (a warning before it, a close at it). A TimerHandle per
connection costs ~0.5 KB; a heap entry ~0.1 KB. Cancelling is lazy: an owner that no longer wants a
deadline just forgets it, and the entry is dropped when it comes due (owners check ``when``).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from typing import Protocol

log = logging.getLogger("hub.deadlines")


class DeadlineOwner(Protocol):
    def deadline_due(self, when: float) -> None:
        """Called once ``when`` (event-loop time) has passed; ignore it if it is no longer wanted."""


class Deadlines:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, DeadlineOwner]] = []
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, when: float, owner: DeadlineOwner) -> None:
        heapq.heappush(self._heap, (when, next(self._order), owner))
        if when < self._timer_at:
            self._arm()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = float("inf")
        if self._heap:
            loop = asyncio.get_running_loop()
            self._timer_at = self._heap[0][0]
            self._timer = loop.call_at(self._timer_at, self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = asyncio.get_running_loop().time()
        while self._heap and self._heap[0][0] <= now:
            when, _, owner = heapq.heappop(self._heap)
            try:
                owner.deadline_due(when)
            except Exception:  # one owner's failure must not stop the others' deadlines
                log.exception("deadline callback failed")
        self._arm()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._heap.clear()
