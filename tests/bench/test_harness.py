"""``hubctl bench peers``: the shared side-by-side harness set up with this hub as a peer. The set-up is checked
on the real harness (../shared/bench) and on broken copies of it; one smoke run goes through the harness's own
run_peers.sh and load generator (Node) against a hub started from this checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from bench import harness
from bench.target import ROOT
from cli.main import cli

HARNESS = harness.default_harness()
needs_harness = pytest.mark.skipif(not (HARNESS / "run_peers.sh").is_file(), reason=f"no shared harness at {HARNESS}")


@needs_harness
def test_prepare_adds_the_hub_as_a_peer_and_makes_publishers_join(tmp_path: Path) -> None:
    work = tmp_path / "work"
    hub = harness.HubPeer("hub", ROOT, {"HUB_SERVER_WRITE_DELAY_MS": "25"})
    harness.prepare(HARNESS, work, [hub])
    harness.prepare(HARNESS, work, [hub])  # again: the work directory is reused

    loadgen = (work / "loadgen.mjs").read_text()
    assert loadgen.count("await pub.join(o.room)") == 2  # fanout and ramp, once each however often prepared
    assert "await pub.join(o.room)" not in (HARNESS / "loadgen.mjs").read_text()  # original kept
    assert (work / "peers" / "hub" / "PROTO").read_text().strip() == "hub"
    start = work / "peers" / "hub" / "start.sh"
    assert os.access(start, os.X_OK)
    script = start.read_text()
    assert f"cd {ROOT}\n" in script
    assert "export HUB_SERVER_WRITE_DELAY_MS=25\n" in script
    assert "export HUB_SERVER_CONNECT_BURST=1000000\n" in script  # limits lifted, as for hubctl bench
    assert script.rstrip().endswith('-m cli.main serve --host 127.0.0.1 --port "$PORT"')
    null_peer = (work / "peers" / harness.PYTHON_NULL_PEER / "start.sh").read_text()
    assert null_peer.rstrip().endswith('-m bench.nullhub --port "$PORT"')
    # A hub peer of an earlier run (an --against worktree) is gone from the next; the harness's own stay.
    harness.prepare(HARNESS, work, [hub, harness.HubPeer("hub-0123abc", tmp_path / "old", {})])
    assert harness.available_peers(work).count("hub-0123abc") == 1
    harness.prepare(HARNESS, work, [hub])
    assert "hub-0123abc" not in harness.available_peers(work)
    # The harness's own peers came along.
    assert (work / "peers" / "socketio-node" / "start.sh").is_file()


def test_prepare_refuses_a_missing_harness(tmp_path: Path) -> None:
    with pytest.raises(harness.HarnessError, match="no harness at"):
        harness.prepare(tmp_path / "nowhere", tmp_path / "work", [])


def test_prepare_refuses_a_load_generator_it_cannot_patch(tmp_path: Path) -> None:
    fake = tmp_path / "harness"
    fake.mkdir()
    (fake / "run_peers.sh").write_text("#!/bin/sh\n")
    (fake / "loadgen.mjs").write_text("// a rewritten generator whose fanout no longer looks the same\n")
    with pytest.raises(harness.HarnessError, match="publisher must join"):
        harness.prepare(fake, tmp_path / "work", [harness.HubPeer("hub", ROOT, {})])


@needs_harness
def test_python_peers_install_is_skipped_only_without_python_peers(tmp_path: Path) -> None:
    work = tmp_path / "work"
    harness.prepare(HARNESS, work, [])
    marker = work / ".venv" / ".bench-req"
    harness.skip_python_install(work, ["hub", "socketio-node"])
    expected = subprocess.run(["sha1sum", str(work / "peers" / "requirements.txt")], capture_output=True,
                              text=True, check=True).stdout[:40]
    assert marker.read_text().strip() == expected  # what run_peers.sh compares before installing
    harness.skip_python_install(work, ["hub", "socketio-py"])
    assert not marker.exists()  # no .venv yet: run_peers.sh installs it


def test_bad_hub_env_and_unknown_revision_are_clear_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["bench", "peers", "--hub-env", "NOVALUE", "--workdir", str(tmp_path)])
    assert result.exit_code == 2
    assert "is not NAME=VALUE" in result.output
    result = runner.invoke(cli, ["bench", "peers", "--against", "no-such-revision", "--harness", str(tmp_path),
                                 "--workdir", str(tmp_path / "work")])
    assert result.exit_code == 1
    assert "unknown revision 'no-such-revision'" in result.output


@needs_harness
def test_an_unknown_peer_is_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["bench", "peers", "--peers", "hub socketio-nod", "--workdir", str(tmp_path)])
    assert result.exit_code == 2
    assert "no peer socketio-nod (there are: " in result.output
    assert "socketio-node" in result.output and "null-hub-py" in result.output


def test_worktree_of_a_revision_is_removed_afterwards(tmp_path: Path) -> None:
    path = tmp_path / "old"
    with harness.worktree("HEAD", path) as checkout:
        assert (checkout / "hub" / "server.py").is_file()
    assert not path.exists()
    listed = subprocess.run(["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True, check=True)
    assert str(path) not in listed.stdout


@needs_harness
@pytest.mark.skipif(shutil.which("node") is None or shutil.which("npm") is None, reason="no Node.js")
@pytest.mark.timeout(300)
def test_smoke_run_through_the_harness(tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "bench", "peers", "--peers", "hub", "--scenarios", "smoke",
         "--workdir", str(tmp_path / "work"), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=280, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    [line] = out.read_text().splitlines()
    run = orjson.loads(line)
    assert run["label"] == "hub"
    assert run["server_alive_after"] is True
    assert run["expected"] > 0
    assert run["delivered"] == run["expected"]
    assert run["duplicates"] == 0 and run["out_of_order"] == 0
    assert run["deliveries_per_server_cpu_s"] > 0
    assert "| hub |" in result.stdout  # the harness's report table
