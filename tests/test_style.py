"""The code base stays ruff- and mypy-clean (strict), as a test so CI enforces it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.timeout(120)
def test_ruff_finds_nothing() -> None:
    """ruff check over the whole tree reports no problem."""
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True,
                            text=True, timeout=100)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(180)
def test_mypy_strict_finds_nothing() -> None:
    """mypy --strict over hub, consumers and cli reports no error."""
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, result.stdout + result.stderr
