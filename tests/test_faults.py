"""Faults (issue 13): a file-size limit (RLIMIT_FSIZE) reached by the settings, a shard or the final write of
the sharded stages. Each run is a subprocess (the limit is per process); the other faults (read-only
directory, the file-size limit on eval's report) are in tests/test_bad_inputs.py, train's in
tests/test_train_cli.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from test_bad_inputs import S, SC, files, fill, models  # noqa: E402,F401  (models: the fixture)


@pytest.mark.parametrize("command, limit", [("score", 64), ("score", 1000), ("score", 1600), ("sample", 64),
                                            ("sample", 1600)])
def test_file_size_limit_in_sharded_stages(tmp_path, models, command, limit):
    """RLIMIT_FSIZE hit by a shard, settings or final write of sample/score: one line, exit 2, no temp
    file or directory left (finished shards may stay: they are the resumable part of the run)."""
    for name, content in files(tmp_path).items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (%d, %d)); "
            "from treg.cli import main; sys.exit(main(sys.argv[1:]))" % (limit, limit))
    argv = fill({"score": SC, "sample": S + " --max-new-tokens 4 --n 2"}[command], tmp_path, models).split()
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith(f"treg {command}: error:")]
    assert len(lines) == 1 and "file too large" in lines[0] and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


def test_score_rerun_after_fixing_a_failing_reward_function(tmp_path, capsys):
    """The reward function raised on the first rows; after fixing it the same command simply runs."""
    from treg.cli import main
    for name, content in files(tmp_path).items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    (tmp_path / "fn.py").write_text("def f(prompt, output):\n    raise ValueError('broken')\n")
    argv = fill(SC, tmp_path, {}).split()
    assert main(argv) == 2
    assert "the reward function raised ValueError: broken" in capsys.readouterr().err
    (tmp_path / "fn.py").write_text("def f(prompt, output):\n    return float(len(output))\n")
    assert main(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "pairs" / "treg_meta.json").is_file()
