"""treg/io/shards.py: atomic, resumable, multi-process-partitioned sharded output."""
import json
import os

import datasets
import pytest

from treg.errors import TregError
from treg.io.meta import read_meta
from treg.io.shards import ShardedWriter

FEATURES = datasets.Features({"i": datasets.Value("int64"), "x": datasets.Sequence(datasets.Value("float32"))})


def _rows(i):
    return [{"i": i * 10 + k, "x": [float(i), 0.5 * k]} for k in range(2)]


def _writer(out, **kw):
    kw.setdefault("settings", {"a": 1})
    return ShardedWriter(out, num_shards=4, features=FEATURES, **kw)


def test_resume_refuse_overwrite_and_finalize(tmp_path):
    out = tmp_path / "out"
    w = _writer(out)
    assert w.pending_shards() == [0, 1, 2, 3] and not w.complete
    w.write(2, _rows(2))
    w.write(0, _rows(0))
    leftover = out / ".shards" / ".shard-00001.tmp123"  # a write killed half-way
    leftover.write_text("garbage")
    w2 = _writer(out)  # same settings: resume
    assert w2.done_shards() == {0, 2} and w2.pending_shards() == [1, 3]
    assert not leftover.exists()
    with pytest.raises(TregError, match="--overwrite"):
        _writer(out, settings={"a": 2})
    for i in w2.pending_shards():
        w2.write(i, _rows(i))
    path = w2.finalize(lambda ds: {"stage": "test", "n": len(ds)})
    ds = datasets.load_from_disk(str(path))
    assert ds["i"] == [0, 1, 10, 11, 20, 21, 30, 31]  # index order, not write order
    assert ds.features == FEATURES
    meta = read_meta(path)
    assert meta["stage"] == "test" and meta["n"] == 8 and meta["fingerprint"] == w2.fingerprint
    assert not (out / ".shards").exists()
    assert _writer(out).complete and _writer(out).pending_shards() == []
    with pytest.raises(TregError, match="finished dataset"):
        _writer(out, settings={"a": 2})
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    w3 = _writer(out, settings={"a": 2}, overwrite=True)
    assert w3.pending_shards() == [0, 1, 2, 3] and not w3.complete
    w3.write(0, [{"i": -1, "x": []}, {"i": -2, "x": []}])
    # --overwrite keeps the old output byte-identical until the new one is complete...
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    w4 = _writer(out, settings={"a": 2})  # ...a rerun after a crash resumes the --overwrite run...
    assert w4.done_shards() == {0} and not w4.complete
    with pytest.raises(TregError, match=r"unfinished --overwrite run .*changed: a"):
        _writer(out, settings={"a": 3})
    for i in w4.pending_shards():
        w4.write(i, _rows(i))
    w4.finalize({"stage": "t"})  # ...and only finalize swaps it in
    assert datasets.load_from_disk(str(out))["i"][:2] == [-1, -2]
    assert read_meta(out)["fingerprint"] == w4.fingerprint and not list(tmp_path.glob(".out.*"))


def test_overwrite_with_the_same_settings_recomputes_and_a_failed_one_leaves_the_old(tmp_path):
    out = tmp_path / "out"
    w = _writer(out)
    for i in range(4):
        w.write(i, _rows(i))
    w.finalize({"stage": "t"})
    again = _writer(out, overwrite=True)
    assert not again.complete and again.pending_shards() == [0, 1, 2, 3]

    def boom(i, rows):
        raise RuntimeError("reward function failed")

    again.rows, again.shard_size = list(range(8)), 2
    with pytest.raises(RuntimeError):
        again.run(boom)
    assert datasets.load_from_disk(str(out))["i"] == [0, 1, 10, 11, 20, 21, 30, 31]
    foreign = tmp_path / "f"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    fw = _writer(foreign, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"  # still there while the new run works
    for i in range(4):
        fw.write(i, _rows(i))
    fw.finalize({"stage": "t"})
    assert not (foreign / "notes.txt").exists() and len(datasets.load_from_disk(str(foreign))) == 8


def test_world_partition_and_foreign_dir(tmp_path):
    out = tmp_path / "o"
    assert _writer(out, rank=0, world_size=2).pending_shards() == [0, 2]
    assert _writer(out, rank=1, world_size=2).pending_shards() == [1, 3]
    foreign = tmp_path / "f"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(TregError, match="not empty"):
        _writer(foreign)
    assert (foreign / "notes.txt").exists()


def test_crash_between_finalize_renames_is_repaired(tmp_path):
    out = tmp_path / "out"
    w = _writer(out)
    for i in range(4):
        w.write(i, _rows(i))
    os.replace(out, tmp_path / ".out.old-1")  # killed after the first rename of finalize
    w2 = _writer(out)
    assert w2.done_shards() == {0, 1, 2, 3}
    assert json.loads((out / ".shards" / "settings.json").read_text())["num_shards"] == 4
    assert datasets.load_from_disk(str(w2.finalize({"stage": "t"})))["i"][-1] == 31


def test_unfinished_run_without_shards_is_replaced_and_changes_are_named(tmp_path):
    """A run that finished no shard (its reward function raised on the first rows) is replaced without
    --overwrite; one with finished shards is refused naming the setting that changed."""
    out = tmp_path / "out"
    _writer(out, settings={"a": 1, "reward": "old"})  # started, nothing written
    w = _writer(out, settings={"a": 1, "reward": "fixed"})
    assert w.pending_shards() == [0, 1, 2, 3]
    w.write(0, _rows(0))
    with pytest.raises(TregError, match=r"unfinished run \(changed: reward\)"):
        _writer(out, settings={"a": 1, "reward": "again"})
    assert _writer(out, settings={"a": 1, "reward": "fixed"}).done_shards() == {0}
