"""Delivery accounting and latency percentiles, as the shared harness defines them.

Every published message's content is a small JSON object ``{ts, seq, pub, st, body}``: ``ts`` the
generator's ``time.perf_counter()`` when it was sent, ``seq`` the publisher's sequence number, ``pub``
the publishing connection's id, ``st`` the phase (ramp step) it belongs to, ``body`` padding. All
connections live in this one process, so latency = receive time - ``ts`` on one monotonic clock.

**expected** = for every publish, the members of the room that had joined (excluding the publisher).
**delivered** counts unique (receiver, publisher, seq); **duplicates** and **out_of_order** (a seq lower
than the highest already seen from that publisher) are counted per receiver. A publisher's own echo is
counted as ``self_echo`` and otherwise ignored. Deliveries arriving after a phase's drain ended are
``late_after_drain`` (not delivered).
"""

from __future__ import annotations

import math
import statistics
from array import array
from dataclasses import dataclass, field
from typing import Any

import orjson

from bench.client import LoadClient


class Samples:
    """A growable list of floats (milliseconds) with nearest-rank percentiles."""

    def __init__(self) -> None:
        self.values = array("d")

    def add(self, value: float) -> None:
        self.values.append(value)

    def __len__(self) -> int:
        return len(self.values)

    def summary(self) -> dict[str, float | int | None]:
        n = len(self.values)
        if n == 0:
            return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None, "mean": None}
        ordered = sorted(self.values)

        def rank(p: float) -> float:
            return round(ordered[min(n - 1, max(0, math.ceil(p / 100 * n) - 1))], 2)

        return {"n": n, "p50": rank(50), "p90": rank(90), "p99": rank(99), "max": round(ordered[-1], 2),
                "mean": round(statistics.fmean(ordered), 2)}


@dataclass
class Phase:
    """One measured stretch of publishing and draining (a whole run, or one ramp step)."""

    index: int
    rate: float = 0.0
    published: int = 0
    publish_failed: int = 0
    expected: int = 0
    delivered: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    late_after_drain: int = 0
    latency_ms: Samples = field(default_factory=Samples)
    send_lag_ms: Samples = field(default_factory=Samples)
    started_at: float | None = None  # perf_counter of the first publish
    last_delivery_at: float | None = None
    publish_s: float = 0.0
    drain_s: float = 0.0
    backlog_cutoff: bool = False  # the drain hit its time cap with deliveries still arriving
    final: bool = False  # the drain ended: later deliveries count as late_after_drain

    def result(self) -> dict[str, Any]:
        """The phase's figures (the shared harness's field names)."""
        window = max(self.publish_s,
                     (self.last_delivery_at - self.started_at)
                     if self.last_delivery_at is not None and self.started_at is not None else 0.0) or 1e-9
        lag = self.send_lag_ms.summary()
        return {
            "published": self.published, "publish_failed": self.publish_failed, "expected": self.expected,
            "delivered": self.delivered,
            "delivery_ratio": round(self.delivered / self.expected, 6) if self.expected else None,
            "lost": self.expected - self.delivered, "duplicates": self.duplicates,
            "out_of_order": self.out_of_order, "late_after_drain": self.late_after_drain,
            "latency_ms": self.latency_ms.summary(),
            "publish_rate": round(self.published / self.publish_s, 1) if self.publish_s else None,
            "deliveries_per_s": round(self.delivered / window, 1), "window_s": round(window, 2),
            "send_lag_ms": {"p99": lag["p99"], "max": lag["max"]}, "publish_s": round(self.publish_s, 2),
            "drain_s": round(self.drain_s, 2), "backlog_cutoff": self.backlog_cutoff,
        }


class Tracker:
    """The :class:`bench.client.Listener` of every connection: counts deliveries into phases."""

    def __init__(self) -> None:
        self.phases: list[Phase] = []
        self.self_echo = 0
        self.bad_payload = 0
        self.stray = 0  # a payload naming a phase this run does not have
        self.acks = 0
        self.disconnects = 0
        self.publisher_disconnects = 0
        self.close_codes: dict[str, int] = {}
        self.other_frames: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        # Called for each ack (the publish scenario measures ack latency); None elsewhere.
        self.on_ack: Any = None
        # False once the run tears its connections down: closes from then on are not disconnects.
        self.counting_closes = True

    def new_phase(self, rate: float = 0.0) -> Phase:
        phase = Phase(len(self.phases), rate)
        self.phases.append(phase)
        return phase

    def chat(self, client: LoadClient, frame: dict[str, Any], received_at: float) -> None:
        try:
            payload = orjson.loads(frame["content"])
            ts, seq, pub, st = payload["ts"], payload["seq"], payload["pub"], payload["st"]
        except (KeyError, TypeError, orjson.JSONDecodeError):
            self.bad_payload += 1
            return
        if pub == client.id:
            self.self_echo += 1
            return
        if not (isinstance(st, int) and 0 <= st < len(self.phases)):
            self.stray += 1
            return
        phase = self.phases[st]
        stream = client.streams.get(pub)
        if stream is None:
            stream = client.streams[pub] = ([-1], set())
        highest, seen = stream
        if seq in seen:
            phase.duplicates += 1
            return
        seen.add(seq)
        if seq < highest[0]:
            phase.out_of_order += 1
        else:
            highest[0] = seq
        if phase.final:
            phase.late_after_drain += 1
            return
        phase.delivered += 1
        phase.last_delivery_at = received_at
        phase.latency_ms.add((received_at - ts) * 1000.0)

    def ack(self, client: LoadClient, frame: dict[str, Any], received_at: float) -> None:
        self.acks += 1
        if self.on_ack is not None:
            self.on_ack(client, frame, received_at)

    def other(self, client: LoadClient, frame: dict[str, Any]) -> None:
        ftype = str(frame.get("type"))[:40]
        self.other_frames[ftype] = self.other_frames.get(ftype, 0) + 1
        if ftype == "error":
            key = f"{frame.get('code')}: {str(frame.get('message'))[:80]}"
            self.errors[key] = self.errors.get(key, 0) + 1

    def closed(self, client: LoadClient, code: int | None) -> None:
        if not self.counting_closes:
            return
        self.disconnects += 1
        if client.is_publisher:
            self.publisher_disconnects += 1
        key = str(code)
        self.close_codes[key] = self.close_codes.get(key, 0) + 1

    def counters(self) -> dict[str, Any]:
        return {"disconnects": self.disconnects, "publisher_disconnects": self.publisher_disconnects,
                "close_codes": self.close_codes, "self_echo": self.self_echo, "bad_payload": self.bad_payload,
                "stray": self.stray, "acks": self.acks, "other_frames": self.other_frames, "errors": self.errors}
