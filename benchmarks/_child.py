"""The child-process protocol of the benchmarks that compare runs (bench_trainer.py, bench_dropin.py): each
variant runs as ``python <script> <argv> --child <variant>`` in a process of its own, so that its peak memory
is its own, and prints one ``RESULT <json>`` line that the parent reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "RESULT "


def report(result: dict) -> None:
    """In the child: hand ``result`` to the parent."""
    print(PREFIX + json.dumps(result), flush=True)


def run_child(script: str, argv: list[str]) -> tuple[dict | None, str]:
    """In the parent: run ``script`` with ``argv`` from the repository root; ``(result, "")``, or ``(None,
    last stderr line)`` when the child failed or reported nothing."""
    proc = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    lines = [x for x in proc.stdout.splitlines() if x.startswith(PREFIX)]
    if proc.returncode or not lines:
        return None, (proc.stderr.strip().splitlines() or ["?"])[-1]
    return json.loads(lines[-1][len(PREFIX):]), ""
