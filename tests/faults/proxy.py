"""A small TCP fault proxy for tests: sits between the hub (or the archiver) and Redis or PostgreSQL.

Faults, each switchable at any time:

- ``latency_s``: every chunk is delivered that much later, in order, in both directions;
- :meth:`FaultProxy.black_hole`: connections stay open but nothing is forwarded; bytes in both directions are
  read and dropped, and new connections are accepted into the same hole. A connection that was black-holed has
  lost bytes mid-stream and keeps dropping after :meth:`FaultProxy.heal` (like a peer that vanished): only its
  owner's timeout gets it back, on a new connection;
- :meth:`FaultProxy.reset_all`: every open connection is aborted with a TCP RST on both sides;
- :meth:`FaultProxy.refuse_new`: the listening socket is closed (connects are refused) until
  :meth:`FaultProxy.accept_new` opens it again on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field

CHUNK = 65536


@dataclass(eq=False)
class _Link:
    """One proxied connection: the client side, the upstream side, and its pump tasks."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    black_holed: bool = False  # bytes were dropped: the byte stream is broken for good


class FaultProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.port = 0
        self.latency_s = 0.0
        self._black_hole = False
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        # Figures for tests and reports.
        self.accepted = 0
        self.resets = 0
        self.bytes_forwarded = 0
        self.bytes_dropped = 0

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> FaultProxy:
        await self._listen()
        return self

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        await self.reset_all()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def url(self, scheme: str = "redis", path: str = "/0", user: str = "") -> str:
        return f"{scheme}://{user + '@' if user else ''}127.0.0.1:{self.port}{path}"

    @property
    def connections(self) -> int:
        return len(self._links)

    # ------------------------------------------------------------------ faults

    def black_hole(self) -> None:
        """Forward nothing from now on; open connections are broken for good (see the module doc)."""
        self._black_hole = True
        for link in self._links:
            link.black_holed = True

    def heal(self) -> None:
        """New connections forward again (black-holed ones stay broken; latency is kept)."""
        self._black_hole = False

    async def reset_all(self) -> int:
        """Abort every open connection with an RST on both sides; returns how many."""
        links = list(self._links)
        for link in links:
            for writer in (link.client, link.upstream):
                _abort_with_rst(writer)
            self._links.discard(link)
        self.resets += len(links)
        for link in links:
            for task in link.tasks:
                task.cancel()
            await asyncio.gather(*link.tasks, return_exceptions=True)
        return len(links)

    async def refuse_new(self) -> None:
        """Close the listening socket: new connections are refused; open ones are untouched."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def accept_new(self) -> None:
        """Listen again on the same port."""
        if self._server is None:
            await self._listen()

    # ------------------------------------------------------------------ forwarding

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            self.accepted += 1
            try:
                up_reader, up_writer = await asyncio.open_connection(self.upstream_host, self.upstream_port)
            except OSError:
                _abort_with_rst(writer)  # upstream down: the client sees a reset, like a dead server
                return
            link = _Link(writer, up_writer, black_holed=self._black_hole)
            self._links.add(link)
            link.tasks = [asyncio.ensure_future(self._pump(link, reader, up_writer)),
                          asyncio.ensure_future(self._pump(link, up_reader, writer))]
            await asyncio.gather(*link.tasks, return_exceptions=True)
            self._links.discard(link)
            for side in (writer, up_writer):
                side.close()
        finally:
            self._handlers.discard(task)

    async def _pump(self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy one direction; delayed chunks go through a queue so they keep their order. A clean end
        of input is passed on as a half-close; an error, or the end of a black-holed connection, ends
        both directions."""
        delayed: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        sender = asyncio.ensure_future(self._send_delayed(delayed, writer))
        loop = asyncio.get_running_loop()
        clean = False
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                if link.black_holed or self._black_hole:
                    link.black_holed = True
                    self.bytes_dropped += len(data)
                    continue
                self.bytes_forwarded += len(data)
                if self.latency_s > 0 or not delayed.empty():
                    delayed.put_nowait((loop.time() + self.latency_s, data))
                else:
                    writer.write(data)
                    await writer.drain()
            await delayed.join()
            if not link.black_holed and writer.can_write_eof():
                writer.write_eof()
                clean = True
        except (ConnectionError, OSError):
            pass
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            if not clean:
                for task in link.tasks:
                    if task is not asyncio.current_task():
                        task.cancel()

    @staticmethod
    async def _send_delayed(delayed: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        broken = False
        while True:
            due, data = await delayed.get()
            try:
                wait_s = due - loop.time()
                if wait_s > 0:
                    # The injected latency itself.
                    await asyncio.sleep(wait_s)  # by design; noqa: sleep-ok
                if not broken:
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                broken = True  # the rest of the queue is dropped (still marked done, so join() returns)
                writer.transport.abort()
            finally:
                delayed.task_done()


def _abort_with_rst(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
