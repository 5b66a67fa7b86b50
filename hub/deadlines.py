"""Many far-apart deadlines on one timer: a heap of (when, owner) and one TimerHandle for the earliest.

Every connection has a token deadline (a warning before it, a close at it). A TimerHandle per
connection costs ~0.5 KB; a heap entry ~0.1 KB. Cancelling is lazy: an owner that no longer wants a
deadline forgets it and calls :meth:`Deadlines.cancelled`; the entry is dropped when it comes due
(owners check ``when``), or sooner, when cancelled entries outnumber the live ones and the heap is
rebuilt without them (a closed connection's entry would otherwise keep the session alive until its
token's expiry: a leak under connection churn).
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

    def wants_deadline(self, when: float) -> bool:
        """Whether ``when`` is still the owner's deadline (false once cancelled or replaced)."""


class Deadlines:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, DeadlineOwner]] = []
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._cancelled = 0  # entries owners no longer want, still in the heap

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, when: float, owner: DeadlineOwner) -> None:
        heapq.heappush(self._heap, (when, next(self._order), owner))
        if when < self._timer_at:
            self._arm()

    def cancelled(self) -> None:
        """An owner dropped a deadline it had added. Rebuilds the heap once such entries are half of it."""
        self._cancelled += 1
        if self._cancelled > 64 and self._cancelled * 2 > len(self._heap):
            self._heap = [entry for entry in self._heap if entry[2].wants_deadline(entry[0])]
            heapq.heapify(self._heap)
            self._cancelled = 0
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
            if not owner.wants_deadline(when):
                self._cancelled = max(0, self._cancelled - 1)
                continue
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
