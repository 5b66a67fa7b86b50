"""The shared side-by-side harness (``../shared/bench``: Socket.IO on Node, python-socketio, Django Channels),
set up with this hub as a peer and run: ``hubctl bench peers``.

The harness is read-only where it is shipped, and needs two additions before it can load the hub, which
README "Performance" used to list as manual steps: a ``peers/hub`` directory (``PROTO`` = ``hub``, and a
``start.sh`` running ``hubctl serve`` with the limits lifted, as :data:`bench.target.LIFTED_LIMITS`), and
one line in ``loadgen.mjs``: the fanout and ramp publishers must join the room first (the hub only takes
messages from members; Socket.IO takes them from anyone). :func:`prepare` copies the harness into a work
directory (kept between runs, so its ``node_modules`` and ``.venv`` are installed once) and makes both;
:func:`run` then runs the harness's own ``run_peers.sh``, whose report is the result.

``--against REV`` adds a second hub peer started from a git worktree of an older commit, for before/after
figures taken side by side in one invocation (this machine drifts 10-15 % between invocations).
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.target import LIFTED_LIMITS, ROOT

# Left out of the copy: installs and results the work directory keeps.
_NOT_COPIED = {"node_modules", ".venv", "results"}
# The harness's peers that run in its Python virtualenv (installed by run_peers.sh from peers/requirements.txt).
PYTHON_PEERS = frozenset({"socketio-py", "channels", "channels-pubsub"})
# This checkout's null hub (bench/nullhub.py: websockets, no Redis, no auth, one frame encoded per publish) as a
# peer: with the harness's null-hub (the same in Node), the least work a server can do for each scenario.
PYTHON_NULL_PEER = "null-hub-py"
# loadgen.mjs: where the fanout and ramp scenarios have joined their receivers; the publisher joins after.
_JOIN_ANCHOR = "const j = await joinAll(subs.map((c) => [c, o.room])); result.join = j.stats;"
# The first comment line of the start.sh of a peer this module wrote.
_WRITTEN_HERE = "# Written by hubctl bench peers: the hub as a peer of this harness."
_PUBLISHER_JOINS = " if (o.proto === 'hub') await pub.join(o.room); // streamhub: only members publish"


def default_harness() -> Path:
    """Where the shared harness is: ``$STREAMHUB_BENCH_HARNESS``, else ``shared/bench`` beside this checkout, else
    beside the checkout this one was cloned from (a CI run's fresh clone of a local repository)."""
    named = os.environ.get("STREAMHUB_BENCH_HARNESS")
    if named:
        return Path(named)
    beside = ROOT.parent / "shared" / "bench"
    if beside.is_dir():
        return beside
    origin = subprocess.run(["git", "-C", str(ROOT), "config", "--get", "remote.origin.url"],
                            capture_output=True, text=True, check=False).stdout.strip()
    if origin and "://" not in origin and ":" not in origin.split("/", 1)[0]:  # a local path, not a URL or scp-like
        cloned_from = (ROOT / origin).resolve().parent / "shared" / "bench"
        if cloned_from.is_dir():
            return cloned_from
    return beside


class HarnessError(Exception):
    """The harness cannot be set up (missing, or changed so the hub can no longer be added)."""


@dataclass(frozen=True)
class HubPeer:
    """A hub the harness starts: ``name`` under peers/, the checkout it runs from, extra environment."""

    name: str
    checkout: Path
    env: Mapping[str, str]


def prepare(harness: Path, workdir: Path, hubs: list[HubPeer]) -> None:
    """Copy ``harness`` into ``workdir`` (installs there are kept) and add ``hubs`` as peers, and this checkout's
    null hub as peer :data:`PYTHON_NULL_PEER`."""
    if not (harness / "run_peers.sh").is_file() or not (harness / "loadgen.mjs").is_file():
        raise HarnessError(f"no harness at {harness} (run_peers.sh and loadgen.mjs expected); give --harness")
    workdir.mkdir(parents=True, exist_ok=True)
    for item in harness.iterdir():
        if item.name in _NOT_COPIED:
            continue
        target = workdir / item.name
        if item.is_dir():
            shutil.copytree(item, target, dirs_exist_ok=True)
        else:
            shutil.copy2(item, target)
    _patch_loadgen(workdir / "loadgen.mjs")
    ours = {hub.name for hub in hubs} | {PYTHON_NULL_PEER}
    for start in (workdir / "peers").glob("*/start.sh"):
        if start.parent.name not in ours and _WRITTEN_HERE in start.read_text():
            shutil.rmtree(start.parent)  # a hub peer of an earlier run (an --against worktree that is gone)
    for hub in hubs:
        _write_peer(workdir / "peers" / hub.name, hub, "cli.main serve --host 127.0.0.1")
    _write_peer(workdir / "peers" / PYTHON_NULL_PEER, HubPeer(PYTHON_NULL_PEER, ROOT, {}), "bench.nullhub")


def available_peers(workdir: Path) -> list[str]:
    """The peers a prepared work directory can start (those with a peers/NAME/start.sh)."""
    return sorted(path.parent.name for path in (workdir / "peers").glob("*/start.sh"))


def _patch_loadgen(path: Path) -> None:
    text = path.read_text()
    if _PUBLISHER_JOINS in text:
        return
    count = text.count(_JOIN_ANCHOR)
    if count != 2:  # fanout and ramp
        raise HarnessError(f"{path.name} changed: expected the receivers' join line twice, found it {count} times; "
                           "the publisher must join the room before it publishes to the hub")
    path.write_text(text.replace(_JOIN_ANCHOR, _JOIN_ANCHOR + _PUBLISHER_JOINS))


def _write_peer(directory: Path, hub: HubPeer, module_and_args: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "PROTO").write_text("hub\n")
    exports = {**LIFTED_LIMITS, **hub.env}
    lines = [
        "#!/usr/bin/env bash",
        _WRITTEN_HERE,
        'source "$(dirname "$0")/../_lib.sh"',
        f"cd {shlex.quote(str(hub.checkout))}",
        'export JWT_SECRET="$HUB_JWT_SECRET"  # the token secret the load generator signs with',
        *(f"export {key}={shlex.quote(value)}" for key, value in sorted(exports.items())),
        f'start_peer {shlex.quote(hub.name)} {shlex.quote(sys.executable)} -m {module_and_args} --port "$PORT"',
    ]
    start = directory / "start.sh"
    start.write_text("\n".join(lines) + "\n")
    start.chmod(0o755)


def skip_python_install(workdir: Path, peers: list[str]) -> None:
    """run_peers.sh installs the Python peers' packages into .venv on its first run, whichever peers run
    (minutes, and PyPI): without a Python peer, mark them installed; with one, make sure they are."""
    requirements = workdir / "peers" / "requirements.txt"
    marker = workdir / ".venv" / ".bench-req"
    if any(peer in PYTHON_PEERS for peer in peers):
        if not (workdir / ".venv" / "bin" / "pip").exists():
            marker.unlink(missing_ok=True)
        return
    if requirements.is_file() and not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        # (what run_peers.sh compares: the requirements' SHA-1, as sha1sum prints it)
        marker.write_text(hashlib.sha1(requirements.read_bytes()).hexdigest() + "\n")


@contextmanager
def worktree(rev: str, path: Path) -> Iterator[Path]:
    """A detached git worktree of ``rev`` at ``path``, removed afterwards."""
    try:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--force", "--detach", str(path), rev],
                       check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        raise HarnessError(f"cannot check out {rev}: {exc.stderr.strip()}") from None
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)],
                       check=False, capture_output=True)


def short_rev(rev: str) -> str:
    """``rev``'s abbreviated commit id (a peer's name), or HarnessError if git does not know it."""
    done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", f"{rev}^{{commit}}"],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise HarnessError(f"unknown revision {rev!r}")
    return done.stdout.strip()


def run(workdir: Path, peers: list[str], scenarios: list[str] | None, out: Path | None,
        extra_args: str | None = None) -> int:
    """Run the harness's run_peers.sh (its progress on stderr, its tables on stdout); its exit status."""
    env = {**os.environ, "PEERS": " ".join(peers)}
    if scenarios:
        env["SCENARIOS"] = " ".join(scenarios)
    if out is not None:
        env["OUT"] = str(out.resolve())
    if extra_args:
        env["EXTRA_ARGS"] = extra_args
    return subprocess.run(["./run_peers.sh"], cwd=workdir, env=env, check=False).returncode
