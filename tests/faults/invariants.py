"""The invariant checker every fault scenario ends with.

A :class:`Ledger` records what clients sent, what the hub acknowledged and, per member, every room frame as it
came off the socket (before the client's own de-duplication, so a duplicate or out-of-order delivery by the hub
is seen). :meth:`Ledger.verify` then checks, against PostgreSQL:

1. missing = acked - stored in PostgreSQL is empty (waiting, bounded, for the archiver to catch up);
2. no duplicates in PostgreSQL: each sent message (unique content) and each (room, stream id) is stored once;
3. per member and room, delivery order is stream order: ids strictly increase within an epoch and every
   delivered id is a stored one;
4. nobody received a room their token does not admit;
5. after recovery every member has every acked message published after it joined, or was told
   ``recovered: false`` (then only what was acked after that resume point is owed).

The figures (sent, acked, stored, lost, duplicated, ...) go to stdout and, when ``FAULT_SUMMARY`` names a file,
into that JSON file under the scenario's name, for the README's Reliability table.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from hub.client import ROOM_FRAME_TYPES, HubClient, HubClientError, id_key
from tests.helpers import mint

# Error codes after which a client sends the same message again (same client_msg_id), as an app would.
RETRYABLE = frozenset({"unavailable", "timeout", "closed"})


@dataclass
class MemberLog:
    user: str
    allowed: frozenset[str]
    # room -> [(epoch, id)] in arrival order, replays included.
    received: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    # room -> the epoch and last_id of the latest room_joined that started a fresh view (first join or
    # recovered false): everything acked after it is owed to this member.
    owed_from: dict[str, tuple[str, str]] = field(default_factory=dict)
    epoch: dict[str, str] = field(default_factory=dict)
    told_gap: Counter[str] = field(default_factory=Counter)  # room -> recovered:false answers
    resumed: Counter[str] = field(default_factory=Counter)  # room -> recovered:true answers after a reconnect

    def record_joined(self, frame: dict[str, Any]) -> None:
        room, epoch, last_id = str(frame.get("room")), str(frame.get("epoch")), str(frame.get("last_id"))
        first = room not in self.owed_from
        if not first and frame.get("recovered") is False:
            self.told_gap[room] += 1
        elif not first:
            self.resumed[room] += 1
        messages = [m for m in frame.get("messages") or [] if isinstance(m, dict)]
        if first or frame.get("recovered") is False:
            # A fresh view: what the replay holds counts as received, and what follows is owed.
            self.owed_from[room] = (epoch, last_id)
        self.epoch[room] = epoch
        for message in messages:
            self.record_frame(message)

    def record_frame(self, frame: dict[str, Any]) -> None:
        room = str(frame.get("room"))
        self.received.setdefault(room, []).append((self.epoch.get(room, ""), str(frame.get("id"))))


class RecordingClient(HubClient):
    """The project's Python client, recording every room frame before its own de-duplication."""

    def __init__(self, url: Any, log: MemberLog, **kwargs: Any) -> None:
        super().__init__(url, token=mint(log.user, rooms=sorted(log.allowed)), **kwargs)
        self.log = log

    def _on_message(self, raw: str | bytes) -> None:
        try:
            frame = orjson.loads(raw)
        except orjson.JSONDecodeError:
            frame = None
        if isinstance(frame, dict):
            if frame.get("type") == "room_joined":
                self.log.record_joined(frame)
            elif frame.get("type") in ROOM_FRAME_TYPES and not _internal(str(frame.get("room"))):
                self.log.record_frame(frame)
        super()._on_message(raw)


def _internal(room: str) -> bool:
    """The user's inbox, the system stream and role streams: attached by the hub itself, not joined."""
    return room == "system" or room.startswith(("inbox:", "role:"))


@dataclass
class Figures:
    scenario: str
    sent: int = 0
    acked: int = 0
    stored: int = 0
    lost: int = 0
    duplicated: int = 0
    refused: int = 0
    delivered: int = 0
    members: int = 0
    gaps_told: int = 0
    resumes: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0


class Ledger:
    def __init__(self, scenario: str) -> None:
        self.scenario = scenario
        self.started = time.monotonic()
        self.sent: dict[str, tuple[str, str]] = {}  # client_msg_id -> (room, content)
        self.acked: dict[str, tuple[str, str]] = {}  # client_msg_id -> (room, stream id)
        self.acked_at: dict[str, float] = {}  # client_msg_id -> monotonic time of the ack
        self.refused: dict[str, str] = {}  # client_msg_id -> last error code (never acked)
        self.errors: Counter[str] = Counter()  # every error answer, retried or not
        self.members: dict[str, MemberLog] = {}
        self.clients: list[RecordingClient] = []
        self._seq = itertools.count()
        self.extra: dict[str, Any] = {}

    # ------------------------------------------------------------------ recording

    def member(self, user: str, allowed: set[str] | frozenset[str]) -> MemberLog:
        log = self.members.get(user)
        if log is None:
            log = self.members[user] = MemberLog(user, frozenset(allowed))
        return log

    def client(self, url: Any, user: str, allowed: set[str] | frozenset[str], **kwargs: Any) -> RecordingClient:
        kwargs.setdefault("backoff", (0.1, 1.0, 2.0))
        kwargs.setdefault("ack_timeout_s", 10.0)
        client = RecordingClient(url, self.member(user, allowed), **kwargs)
        self.clients.append(client)
        return client

    async def send(self, client: RecordingClient, room: str, *, deadline_s: float = 30.0) -> str | None:
        """Send one unique message, retrying retryable errors with the same client_msg_id until acked or
        ``deadline_s``; returns the stream id, or None when it was finally refused."""
        cmid = f"{self.scenario[:20]}-{client.log.user}-{next(self._seq)}"
        content = f"{self.scenario} {cmid}"
        self.sent[cmid] = (room, content)
        give_up = time.monotonic() + deadline_s
        while True:
            try:
                ack = await client.send_message(room, content, client_msg_id=cmid)
            except HubClientError as exc:
                self.errors[exc.code] += 1
                self.refused[cmid] = exc.code
                if exc.code not in RETRYABLE or time.monotonic() > give_up:
                    return None
                # A client backs off before retrying: Redis or the node is coming back.
                await asyncio.sleep(0.05)  # by design; noqa: sleep-ok
                continue
            self.refused.pop(cmid, None)
            sid = str(ack["id"])
            self.acked[cmid] = (room, sid)
            self.acked_at[cmid] = time.monotonic()
            return sid

    def forget(self, client: RecordingClient) -> None:
        """A client closed for good before the end (churn, warm-up): nothing is owed to it any more."""
        if client in self.clients:
            self.clients.remove(client)
        self.members.pop(client.log.user, None)

    async def close_clients(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients), return_exceptions=True)

    # ------------------------------------------------------------------ checking

    def owed(self, log: MemberLog) -> dict[str, set[str]]:
        """room -> acked ids the member must have (acked after its fresh view of the room began)."""
        owed: dict[str, set[str]] = {}
        for room, sid in self.acked.values():
            start = log.owed_from.get(room)
            if start is not None and id_key(sid) > id_key(start[1]):
                owed.setdefault(room, set()).add(sid)
        return owed

    def undelivered(self) -> dict[str, dict[str, list[str]]]:
        """user -> room -> owed ids not received (empty when every member is complete)."""
        result: dict[str, dict[str, list[str]]] = {}
        for user, log in self.members.items():
            got = {room: {sid for _epoch, sid in items} for room, items in log.received.items()}
            for room, ids in self.owed(log).items():
                missing = sorted(ids - got.get(room, set()), key=id_key)
                if missing:
                    result.setdefault(user, {})[room] = missing
        return result

    async def wait_delivered(self, timeout_s: float = 30.0) -> None:
        """Wait (bounded) until every member has everything owed; the check itself is in verify()."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.undelivered():
                return
            await asyncio.sleep(0.05)

    async def verify(self, pg_url: str, schema: str, *, loss_allowed_before: float | None = None,
                     settle_s: float = 45.0, extra: dict[str, Any] | None = None,
                     diagnostics: Callable[[], str] | None = None) -> Figures:
        """Run every check; raises AssertionError listing what broke. ``loss_allowed_before`` (a monotonic time:
        Redis without persistence died then) excuses acked messages older than it from check 1 (they are
        counted as lost), and then every member of a room that lost acked messages must have been told
        ``recovered: false``; messages acked after it are held to every check."""
        allow_loss = loss_allowed_before is not None
        rooms = sorted({room for room, _ in self.sent.values()})
        acked_ids = {(room, sid) for room, sid in self.acked.values()}
        rows: list[asyncpg.Record] = []
        deadline = time.monotonic() + settle_s
        while True:
            rows = await _stored(pg_url, schema, rooms)
            stored_ids = {(r["room"], f"{r['stream_ms']}-{r['stream_seq']}") for r in rows}
            if acked_ids <= stored_ids or time.monotonic() > deadline:
                break
            # Bounded polling: PostgreSQL gives no event when the archiver's batch commits.
            await asyncio.sleep(0.1)  # by design; noqa: sleep-ok
        await self.wait_delivered(timeout_s=max(1.0, deadline - time.monotonic()))
        problems: list[str] = []
        lost = sorted(acked_ids - stored_ids)
        excused = {(room, sid) for cmid, (room, sid) in self.acked.items()
                   if loss_allowed_before is not None and self.acked_at[cmid] < loss_allowed_before}
        unexcused = [item for item in lost if item not in excused]
        if unexcused:
            problems.append(f"{len(unexcused)} acked messages not in PostgreSQL: {unexcused[:5]}")
        by_content = Counter((r["room"], r["content"]) for r in rows)
        by_id = Counter((r["room"], r["epoch"], r["stream_ms"], r["stream_seq"]) for r in rows)
        ours = {content for _room, content in self.sent.values()}
        duplicated = sum(n - 1 for (room, content), n in by_content.items() if n > 1 and content in ours)
        duplicated += sum(n - 1 for n in by_id.values() if n > 1)
        if duplicated:
            dups = [k for k, n in by_content.items() if n > 1][:5]
            problems.append(f"{duplicated} duplicate rows in PostgreSQL: {dups}")
        delivered = 0
        for user, log in self.members.items():
            for room, items in log.received.items():
                delivered += len(items)
                if room not in log.allowed:
                    problems.append(f"user {user} received {len(items)} frames of {room}, which it may not read")
                previous: tuple[str, str] | None = None
                for epoch, sid in items:
                    if previous is not None and previous[0] == epoch and id_key(sid) <= id_key(previous[1]):
                        problems.append(f"user {user} got {room} {sid} after {previous[1]}: not stream order")
                        break
                    previous = (epoch, sid)
                unknown = {sid for _e, sid in items} - {sid for r, sid in stored_ids if r == room}
                if unknown and not allow_loss:
                    problems.append(f"user {user} got {len(unknown)} ids of {room} that are not stored: "
                                    f"{sorted(unknown)[:3]}")
        for user, rooms_missing in self.undelivered().items():
            for room, missing in rooms_missing.items():
                problems.append(f"user {user} lacks {len(missing)} acked messages of {room} with no "
                                f"recovered: false: {missing[:3]}")
        figures = Figures(
            scenario=self.scenario, sent=len(self.sent), acked=len(self.acked), stored=len(acked_ids & stored_ids),
            lost=len(lost), duplicated=duplicated, refused=len(self.refused), delivered=delivered,
            members=len(self.members), gaps_told=sum(sum(m.told_gap.values()) for m in self.members.values()),
            resumes=sum(sum(m.resumed.values()) for m in self.members.values()), errors=dict(self.errors),
            extra={**self.extra, **(extra or {})}, duration_s=round(time.monotonic() - self.started, 1))
        report(figures)
        if problems and diagnostics is not None:
            problems.append(diagnostics())
        assert not problems, "invariants broken:\n  " + "\n  ".join(problems[:20])
        return figures


async def _stored(pg_url: str, schema: str, rooms: list[str]) -> list[asyncpg.Record]:
    """The rows of ``rooms``; empty while PostgreSQL does not answer (it may be restarting)."""
    try:
        conn = await asyncpg.connect(pg_url, timeout=3, server_settings={"search_path": schema})
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
        return []
    try:
        return list(await conn.fetch("SELECT room, epoch, stream_ms, stream_seq, content FROM messages "
                                     "WHERE room = ANY($1::text[])", rooms))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
        return []
    finally:
        conn.terminate()


def report(figures: Figures) -> None:
    """Print the figures and merge them into $FAULT_SUMMARY (JSON, one entry per scenario)."""
    data = figures.__dict__
    print(f"\nFAULT SUMMARY {json.dumps(data, sort_keys=True)}")
    path = os.environ.get("FAULT_SUMMARY")
    if not path:
        return
    target = Path(path)
    try:
        existing = json.loads(target.read_text()) if target.exists() else {}
    except (OSError, ValueError):
        existing = {}
    existing[figures.scenario] = data
    target.write_text(json.dumps(existing, indent=2, sort_keys=True) + "\n")
