"""A private PostgreSQL cluster for tests that stop and restart PostgreSQL.

``initdb`` (trust auth) in a fresh temp directory, listening only on 127.0.0.1 on a free port, its unix
socket inside the temp directory, fsync off (synchronous_commit stays on). ``stop(mode="immediate")``
and ``start()`` again reuse the same port and data directory; ``destroy()`` stops whatever runs and
removes the directory.

PostgreSQL refuses to run as root: when the tests run as root, every binary runs as the ``postgres``
OS user (``runuser``) and the temp directory belongs to it. The methods block; from async code call
them through ``asyncio.to_thread`` (or use :func:`private_cluster`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

_CANDIDATE_BIN_DIRS = ("/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/14/bin",
                       "/usr/local/pgsql/bin")


def find_bin_dir() -> Path | None:
    """The directory holding initdb and pg_ctl: $PG_BIN, a Debian-style path, or the PATH."""
    candidates = [os.environ.get("PG_BIN", ""), *_CANDIDATE_BIN_DIRS]
    for candidate in candidates:
        if candidate and (Path(candidate) / "pg_ctl").is_file() and (Path(candidate) / "initdb").is_file():
            return Path(candidate)
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).parent
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgClusterError(RuntimeError):
    pass


class PgCluster:
    """One private cluster. ``start()`` the first time runs initdb; later calls restart the same data."""

    def __init__(self, bin_dir: Path | None = None, user: str = "postgres", start_timeout_s: int = 30) -> None:
        found = bin_dir or find_bin_dir()
        if found is None:
            raise PgClusterError("PostgreSQL binaries (initdb, pg_ctl) not found; set PG_BIN")
        self.bin_dir = found
        self.start_timeout_s = start_timeout_s
        # As root, run everything as ``user``; otherwise as ourselves.
        self._run_as: str | None = user if os.geteuid() == 0 else None
        self.base: Path | None = None
        self.port = 0
        self._initialised = False

    # ------------------------------------------------------------------ paths and URLs

    @property
    def data_dir(self) -> Path:
        assert self.base is not None, "cluster not created"
        return self.base / "data"

    @property
    def socket_dir(self) -> Path:
        assert self.base is not None, "cluster not created"
        return self.base / "sock"

    @property
    def log_path(self) -> Path:
        assert self.base is not None, "cluster not created"
        return self.base / "postgres.log"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # ------------------------------------------------------------------ commands

    def _cmd(self, *args: str) -> list[str]:
        argv = [str(self.bin_dir / args[0]), *args[1:]]
        if self._run_as is not None:
            return ["runuser", "-u", self._run_as, "--", *argv]
        return argv

    def _run(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(self._cmd(*args), capture_output=True, text=True, timeout=timeout_s, cwd="/",
                                stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise PgClusterError(f"{' '.join(args[:2])} failed ({result.returncode}): {result.stderr.strip()}\n"
                                 f"{result.stdout.strip()}\nlog: {self.log_tail()}")
        return result

    def _create(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="hub-pg-"))
        if self._run_as is not None:
            entry = pwd.getpwnam(self._run_as)
            os.chown(self.base, entry.pw_uid, entry.pw_gid)
        self.base.chmod(0o700)
        self.socket_dir.mkdir()
        if self._run_as is not None:
            os.chown(self.socket_dir, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.data_dir), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--no-locale", "--no-sync", "--no-instructions", timeout_s=120)
        self._initialised = True

    def _write_port(self) -> None:
        # postgresql.auto.conf is read last: the settings here win over postgresql.conf.
        settings = {
            "port": str(self.port),
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.socket_dir}'",
            # fsync off is safe here: an immediate stop kills processes, not the OS, so written WAL
            # survives in the page cache. synchronous_commit must stay on: with it off, a commit is
            # acknowledged before its WAL is written and an immediate stop loses it.
            "fsync": "off",
            "full_page_writes": "off",
            "max_connections": "50",
            "shared_buffers": "'32MB'",
            "logging_collector": "off",
        }
        text = "".join(f"{k} = {v}\n" for k, v in settings.items())
        auto = self.data_dir / "postgresql.auto.conf"
        if self._run_as is not None:
            # Written by root into the postgres-owned directory: keep the owner.
            auto.write_text(text)
            entry = pwd.getpwnam(self._run_as)
            os.chown(auto, entry.pw_uid, entry.pw_gid)
        else:
            auto.write_text(text)

    def start(self) -> str:
        """Start the cluster (initdb on first use; same port and data afterwards). Returns its URL."""
        if not self._initialised:
            self._create()
            last: Exception | None = None
            for _ in range(3):  # a free port can be taken by someone else before we bind it: retry
                self.port = _free_port()
                self._write_port()
                try:
                    self._pg_ctl_start()
                    return self.url()
                except PgClusterError as exc:
                    last = exc
                    self.kill()
            raise PgClusterError(f"cannot start PostgreSQL: {last}")
        self._pg_ctl_start()
        return self.url()

    def _pg_ctl_start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_path), "-w",
                  "-t", str(self.start_timeout_s), "start", timeout_s=self.start_timeout_s + 15)
        self._wait_accepting(self.start_timeout_s)

    def _wait_accepting(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise PgClusterError(f"PostgreSQL not listening on {self.port}: {exc}") from exc
                time.sleep(0.05)

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m mode`` (smart, fast or immediate), waiting until it is down."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"unknown stop mode {mode!r}")
        if not self.running():
            return
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "-t", "30", "stop", timeout_s=45)

    def postmaster_pid(self) -> int | None:
        """The postmaster's pid from postmaster.pid, or None when it is not running."""
        if self.base is None:
            return None
        try:
            first = (self.data_dir / "postmaster.pid").read_text().splitlines()[0]
            pid = int(first.strip())
        except (OSError, IndexError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        return pid

    def running(self) -> bool:
        return self.postmaster_pid() is not None

    def kill(self) -> None:
        """Last resort: SIGKILL the postmaster by its pid (its children exit when it is gone)."""
        pid = self.postmaster_pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self.postmaster_pid() == pid and time.monotonic() < deadline:
            time.sleep(0.05)

    def destroy(self) -> None:
        """Stop the cluster (immediate; SIGKILL if that fails) and remove its directory."""
        if self.base is None:
            return
        try:
            self.stop("immediate")
        except (PgClusterError, subprocess.TimeoutExpired):
            self.kill()
        finally:
            if self.running():
                self.kill()
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None
            self._initialised = False

    # ------------------------------------------------------------------ async helpers

    async def astart(self) -> str:
        return await asyncio.to_thread(self.start)

    async def astop(self, mode: str = "fast") -> None:
        await asyncio.to_thread(self.stop, mode)

    async def adestroy(self) -> None:
        await asyncio.to_thread(self.destroy)


@contextlib.asynccontextmanager
async def private_cluster() -> AsyncIterator[PgCluster]:
    """A started private cluster, destroyed on exit even when the body raises."""
    cluster = PgCluster()
    try:
        await cluster.astart()
        yield cluster
    finally:
        await cluster.adestroy()
