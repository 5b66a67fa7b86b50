"""Every Redis key and channel name the hub uses is built here.

Everything about one room shares the room's hash tag (``hub:{order_123}:s``), so multi-key Lua
scripts touch one slot and the hub runs unchanged on Redis Cluster. Room names reaching this module
are already canonical (see :mod:`hub.rooms`), so a name maps to exactly one set of keys.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str = "hub:"
    db: int = 0

    # --- per room (hash tag = room name) -------------------------------------------------------
    def stream(self, room: str) -> str:
        """The room's stream: every chat message and backend event, in order."""
        return f"{self.prefix}{{{room}}}:s"

    def meta(self, room: str) -> str:
        """Hash: ``epoch`` (random, set once with the room), ``min_id`` (entries below may be trimmed)."""
        return f"{self.prefix}{{{room}}}:meta"

    def acl(self, room: str) -> str:
        """Set of user ids a backend granted access to (order/quote/support rooms)."""
        return f"{self.prefix}{{{room}}}:acl"

    def idempotency(self, room: str, sender_id: str, client_msg_id: str) -> str:
        """String: the stream id a (sender, client_msg_id) publish produced; expires."""
        return f"{self.prefix}{{{room}}}:idem:{sender_id}:{client_msg_id}"

    def typing(self, room: str, user_id: str) -> str:
        """String with a TTL: present while ``user_id`` is typing in ``room``."""
        return f"{self.prefix}{{{room}}}:typing:{user_id}"

    def room_presence(self, room: str) -> str:
        """Hash: user id -> that user's connections in the room and their status ("conn=o;conn=a")."""
        return f"{self.prefix}{{{room}}}:presence"

    def events_channel(self, room: str) -> str:
        """Pub/sub channel for the room's ephemeral events (typing), never stored."""
        return f"{self.prefix}{{{room}}}:ev"

    def read_receipts(self, room: str) -> str:
        """Hash: user id -> newest stream id that user has read in the room."""
        return f"{self.prefix}{{{room}}}:read"

    # --- per user ------------------------------------------------------------------------------
    def user_rooms(self, user_id: str) -> str:
        """Sorted set: rooms the user joined, scored by the last join time (ms)."""
        return f"{self.prefix}{{user:{user_id}}}:rooms"

    def inbox_acks(self, user_id: str) -> str:
        """Set of notification ids the user acknowledged (read) in their inbox."""
        return f"{self.prefix}{{inbox:{user_id}}}:acks"

    def reminders_due(self) -> str:
        """Sorted set of scheduled reminders (JSON) by due time (ms)."""
        return f"{self.prefix}{{reminders}}:due"

    def reminders_claimed(self) -> str:
        """Sorted set of reminders a node is delivering, by lease end (ms)."""
        return f"{self.prefix}{{reminders}}:claimed"

    def maintenance(self, job: str, period: str) -> str:
        """Lock: the one process that runs ``job`` for ``period`` holds it."""
        return f"{self.prefix}maint:{job}:{period}"

    def maintenance_result(self, job: str, period: str) -> str:
        """What ``job`` produced for ``period`` (JSON), e.g. the weekly usage report."""
        return f"{self.prefix}maint:{job}:{period}:result"

    # --- limits (one hash tag per subject, so each key is its own Cluster slot) --------------
    def rate(self, subject: str, what: str) -> str:
        """GCRA state for ``what`` (msg, typing, connect) of ``subject`` ("user:ID" or "ip:ADDR")."""
        return f"{self.prefix}rl:{{{subject}}}:{what}"

    def connection_leases(self, subject: str) -> str:
        """Sorted set of connection leases of ``subject`` ("user:ID" or "ip:ADDR")."""
        return f"{self.prefix}cc:{{{subject}}}"

    # --- credentials and audit ----------------------------------------------------------------
    def control_channel(self) -> str:
        """Pub/sub channel every node subscribes to for cluster-wide commands (token revocations)."""
        return f"{self.prefix}control"

    def revoked_token(self, jti: str) -> str:
        """String with a TTL: present while the token whose ``jti`` claim this is stays revoked."""
        return f"{self.prefix}revoked:jti:{jti}"

    def revoked_user(self, user_id: str) -> str:
        """String: a time in ms; every token of ``user_id`` issued before it is revoked."""
        return f"{self.prefix}revoked:user:{user_id}"

    def audit(self) -> str:
        """Stream of audit events (auth failures, denials, limits, revocations, admin actions), capped."""
        return f"{self.prefix}audit"

    # --- consumers ---------------------------------------------------------------------------
    def dead_letters(self, consumer: str) -> str:
        """Stream of entries ``consumer`` could not process, with the reason."""
        return f"{self.prefix}dlq:{consumer}"

    def consumer_stats(self, consumer: str) -> str:
        """Hash an archiver refreshes after each batch (batches, rows, last batch size and time); expires."""
        return f"{self.prefix}consumer:{consumer}:stats"

    def keyspace_stream_pattern(self) -> str:
        """PSUBSCRIBE pattern for every room stream's keyspace channel (the archiver wants them all)."""
        return f"__keyspace@{self.db}__:{self.prefix}{{*}}:s"

    def inbox_patterns(self) -> tuple[str, str]:
        """PSUBSCRIBE patterns for every inbox's stream wake-ups and ephemeral events: a node listens
        to all inboxes with two patterns instead of subscribing per connected user."""
        prefix = _glob_escape(self.prefix)
        return (f"__keyspace@{self.db}__:{prefix}{{inbox:*}}:s", f"{prefix}{{inbox:*}}:ev")

    def keyspace_key(self, channel: str) -> str | None:
        """The key a keyspace channel is about, or None for other channels."""
        head = f"__keyspace@{self.db}__:"
        return channel[len(head):] if channel.startswith(head) else None

    # --- per node ----------------------------------------------------------------------------
    def node(self, node_id: str) -> str:
        """Hash with the node's facts (version, started_at, connections); expires unless refreshed."""
        return f"{self.prefix}node:{node_id}"

    def node_rooms(self, node_id: str) -> str:
        """Set of rooms where this node owns a consumer group (for cleanup after it dies)."""
        return f"{self.prefix}node:{node_id}:rooms"

    def node_presence(self, node_id: str) -> str:
        """Set of "room user connection" entries this node put in room presence (for the reaper)."""
        return f"{self.prefix}node:{node_id}:presence"

    def reaper_lock(self, node_id: str) -> str:
        """Held by the one node that cleans up after a dead node."""
        return f"{self.prefix}reap:{node_id}"

    def nodes(self) -> str:
        """Set of node ids that ever registered (dead ones are pruned by maintenance)."""
        return f"{self.prefix}nodes"

    # --- keyspace notifications --------------------------------------------------------------
    def keyspace_channel(self, key: str) -> str:
        return f"__keyspace@{self.db}__:{key}"

    def room_of_key(self, key: str) -> str | None:
        """Inverse of the per-room builders: ``hub:{order_1}:s`` -> ``order_1``."""
        if not key.startswith(self.prefix + "{"):
            return None
        end = key.find("}", len(self.prefix) + 1)
        if end < 0:
            return None
        return key[len(self.prefix) + 1:end]

    def stream_pattern(self) -> str:
        """SCAN pattern matching every room stream."""
        return f"{self.prefix}{{*}}:s"


def _glob_escape(text: str) -> str:
    """``text`` matched literally in a Redis glob pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
