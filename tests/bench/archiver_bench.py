"""Archiver throughput benchmark, kept for the commands already quoted: it now runs ``hubctl bench archive``
(same flags: --rows, --runs, --rooms, --batch, --archiver-batch; see ``hubctl bench archive --help``).
Not a test.

    python tests/bench/archiver_bench.py --rows 50000 --runs 3
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cli.main import cli  # noqa: E402

if __name__ == "__main__":
    cli(["bench", "archive", *sys.argv[1:]], prog_name="hubctl")
