"""Publish-path benchmark, kept for the commands already quoted: it now runs ``hubctl bench publish`` (same
flags: --clients, --messages, --window, --runs; see ``hubctl bench publish --help``). Not a test.

    python tests/bench/publish_bench.py --clients 20 --messages 1000 --runs 3
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cli.main import cli  # noqa: E402

if __name__ == "__main__":
    cli(["bench", "publish", *sys.argv[1:]], prog_name="hubctl")
