"""One node-wide keepalive instead of websockets' keepalive task per connection.

websockets pings every connection from a task of its own (about 1.5 KB per connection, and a wake-up
per connection per interval). Here one sweep does it for the whole node: a connection that sent
nothing for ``ping_interval_s`` gets a ping frame, and one that still sent nothing
``ping_timeout_s`` later is closed with 1011, as websockets would. Any data from the peer counts as
a sign of life (the connection stamps ``last_data_at`` on every read), so a busy connection is never
pinged at all.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from websockets.frames import CloseCode as WsCloseCode
from websockets.protocol import State

if TYPE_CHECKING:
    from hub.session import Session

log = logging.getLogger("hub.keepalive")


class Keepalive:
    def __init__(self, sessions: Callable[[], Iterable[Session]], interval_s: float, timeout_s: float,
                 close_grace_s: float) -> None:
        self._sessions = sessions
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._close_grace_s = close_grace_s
        self.pings_sent = 0
        self.timeouts = 0

    @property
    def period_s(self) -> float:
        """How often the sweep runs: a ping or a timeout is at most this late."""
        return min(max(min(self._interval_s, self._timeout_s) / 4, 0.05), 5.0)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.period_s)
            self.sweep(loop.time())

    def sweep(self, now: float) -> None:
        for session in list(self._sessions()):
            conn = session.connection
            if session.closing or conn.protocol.state is not State.OPEN:
                continue
            quiet_since = conn.last_data_at
            if now - quiet_since >= self._interval_s + self._timeout_s and conn.pinged_at > quiet_since:
                self.timeouts += 1
                log.info("closing %s (user %s): no answer to the keepalive ping", session.id, session.user_id)
                session.close(WsCloseCode.INTERNAL_ERROR, "keepalive ping timeout", self._close_grace_s)
                # The peer is gone: do not wait for its half of the close handshake (websockets does not
                # either). close() still flushes the close frame first.
                conn.transport.close()
            elif now - quiet_since >= self._interval_s and conn.pinged_at <= quiet_since:
                conn.pinged_at = now
                conn.protocol.send_ping(b"")
                try:
                    conn.send_data()
                except Exception:  # the transport is already gone; the read loop ends the session
                    continue
                self.pings_sent += 1
