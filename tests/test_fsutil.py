"""Atomic writes: complete or absent, no temp leftovers, ordinary (umask) permissions."""

import os
import stat

import pytest

from treg.io.fsutil import atomic_directory, atomic_write_text


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_file_and_directory_get_umask_permissions_and_replace(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a" / "x.txt", "one")
        atomic_write_text(tmp_path / "a" / "x.txt", "two")
        with atomic_directory(tmp_path / "d") as tmp:
            (tmp / "f").write_text("1")
        with atomic_directory(tmp_path / "d") as tmp:
            (tmp / "g").write_text("2")
    finally:
        os.umask(old)
    assert (tmp_path / "a" / "x.txt").read_text() == "two"
    assert _mode(tmp_path / "a" / "x.txt") == 0o644 and _mode(tmp_path / "d") == 0o755
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["g"]  # replaced, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "d"] and os.listdir(tmp_path / "a") == ["x.txt"]


def test_failure_leaves_the_old_output_and_no_temp(tmp_path):
    atomic_write_text(tmp_path / "x.txt", "kept")
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "d") as tmp:
            (tmp / "f").write_text("half")
            raise RuntimeError("crash")
    from treg.io.fsutil import atomic_file
    with pytest.raises(RuntimeError):
        with atomic_file(tmp_path / "x.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert (tmp_path / "x.txt").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]
