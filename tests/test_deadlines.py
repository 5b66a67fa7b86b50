"""hub/deadlines.py: many deadlines on one timer, in time order, with lazy cancellation."""

from __future__ import annotations

import asyncio

from hub.deadlines import Deadlines


class Owner:
    def __init__(self, name: str, fired: list[str], done: asyncio.Event | None = None) -> None:
        self.name = name
        self.fired = fired
        self.done = done
        self.wanted: float | None = None

    def wants_deadline(self, when: float) -> bool:
        return when == self.wanted

    def deadline_due(self, when: float) -> None:
        if when != self.wanted:
            return  # forgotten: lazily cancelled
        self.fired.append(self.name)
        if self.done is not None:
            self.done.set()


async def test_deadlines_fire_in_time_order_and_forgotten_ones_do_not() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines()
    fired: list[str] = []
    last = asyncio.Event()
    now = loop.time()
    owners = {name: Owner(name, fired, last if name == "c" else None) for name in "abcx"}
    for name, offset in (("c", 0.15), ("a", 0.05), ("x", 0.08), ("b", 0.1)):
        owners[name].wanted = now + offset
        deadlines.add(now + offset, owners[name])
    owners["x"].wanted = None  # cancelled before it came due
    await asyncio.wait_for(last.wait(), 5)
    assert fired == ["a", "b", "c"]
    assert len(deadlines) == 0


async def test_an_owner_may_add_its_next_deadline_from_the_callback() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines()
    fired: list[str] = []
    done = asyncio.Event()

    class Chained(Owner):
        def wants_deadline(self, when: float) -> bool:
            return True

        def deadline_due(self, when: float) -> None:
            fired.append(f"step{len(fired)}")
            if len(fired) < 3:
                deadlines.add(loop.time() + 0.01, self)
            else:
                done.set()

    deadlines.add(loop.time(), Chained("chain", fired))
    await asyncio.wait_for(done.wait(), 5)
    assert fired == ["step0", "step1", "step2"]
    deadlines.close()


async def test_cancelled_deadlines_do_not_pile_up_under_churn() -> None:
    """Connections come and go long before their tokens expire: their cancelled entries are dropped
    once they outnumber the live ones, so the heap (and what it keeps alive) stays about as big as the
    live set, not as big as every connection since the last expiry."""
    loop = asyncio.get_running_loop()
    deadlines = Deadlines()
    fired: list[str] = []
    live = []
    for i in range(5000):
        owner = Owner(f"c{i}", fired)
        owner.wanted = loop.time() + 3600
        deadlines.add(owner.wanted, owner)
        if i % 10 == 0:
            live.append(owner)  # one in ten stays connected
        else:
            owner.wanted = None  # closed: cancelled
            deadlines.cancelled()
    assert len(deadlines) <= 2 * len(live) + 64
    deadlines.close()
