"""The JavaScript client's own test suite (clients/js, node's test runner against real hub processes), run
from pytest so CI runs it with everything else."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest

from tests.conftest import ROOT

JS_DIR = ROOT / "clients" / "js"
TIMEOUT_S = 300


def _run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in clients/js in its own process group, so a timeout also ends the node test
    processes and the hubs they started (not only npm)."""
    proc = subprocess.Popen(command, cwd=JS_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(command)} did not finish in {TIMEOUT_S} s:\n{out[-20000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, out, None)


@pytest.mark.timeout(400)
def test_js_client_suite() -> None:
    """npm test in clients/js exits 0: reconnect/resume without gap or duplicate, offline queue, acks,
    backoff with jitter, auth errors, heartbeat, React hooks, TypeScript declarations."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node/npm are not installed: the JavaScript client's tests need Node.js 18 or newer")
    # The hubs the JS tests start run under this interpreter (it has the hub's dependencies).
    env = {**os.environ, "PYTHON": sys.executable}
    if not (JS_DIR / "node_modules").is_dir():
        installed = _run(["npm", "ci", "--no-audit", "--no-fund"], env)
        assert installed.returncode == 0, installed.stdout[-20000:]
    result = _run(["npm", "test"], env)
    assert result.returncode == 0, result.stdout[-20000:]
