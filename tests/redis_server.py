"""A private redis-server on a free loopback port in a temp dir, for tests that stop and restart it."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_version() -> tuple[int, ...]:
    """The version of the ``redis-server`` on the PATH (the one PrivateRedis runs)."""
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, timeout=10).stdout
    match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(part) for part in match.groups()) if match else (0,)


def debug_command_args() -> tuple[str, ...]:
    """Arguments that allow DEBUG (SLEEP) on this server: Redis 7 refuses it unless enabled."""
    return ("--enable-debug-command", "yes") if server_version() >= (7,) else ()


class PrivateRedis:
    def __init__(self, *, appendonly: bool = False, fsync: str = "everysec", extra_args: tuple[str, ...] = ()) -> None:
        self.port = _free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="hub-redis-"))
        self.args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                     "--save", "", "--appendonly", "yes" if appendonly else "no", "--appendfsync", fsync,
                     "--logfile", str(self.dir / "redis.log"), *extra_args]
        # The server process; None while stopped.
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        self.process = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        try:
            while True:
                try:
                    if client.ping():
                        return
                except (redis.RedisError, OSError):
                    pass
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"private redis-server did not start; see {self.dir / 'redis.log'}")
                time.sleep(0.02)
        finally:
            client.close()

    def kill(self) -> None:
        """Stop abruptly (SIGKILL): nothing is saved that AOF did not already write."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def destroy(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
