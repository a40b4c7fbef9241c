"""Resumable, atomic, sharded stage output: ``ShardedWriter`` (generic; used by annotate/sample/score).

Layout while running::

    OUT/.shards/settings.json        {"fingerprint", "num_shards", "settings"}  (written first)
    OUT/.shards/shard-00003.parquet  rows of shard 3, written to a temp file + os.replace

``--overwrite`` of a finished output (or of a directory treg did not write) keeps it in place until
the new one is complete: the new run's shards go to the sibling ``.OUT.overwrite/`` (a rerun after a
crash resumes there), and ``finalize`` swaps the new dataset in and removes the sibling.

When every shard exists, ``finalize(meta)`` concatenates the shards in index order into one
``datasets`` directory + ``treg_meta.json`` (``meta`` plus ``fingerprint``), built in a sibling temp
dir and swapped into ``OUT`` by renames (a crash in between is repaired on the next start), and the
shard files go away with the old ``OUT``.

Contract for callers:

* ``settings`` must capture everything that decides the output (inputs' hash, model, options,
  shard size); its ``stable_hash`` is the ``fingerprint``. Rerunning with the same settings resumes
  (``done_shards()`` are skipped); with different settings it is refused unless ``overwrite``.
* Shard ``i`` must always contain the same rows for the same settings, so that a resumed or
  multi-process run produces exactly the same dataset as an uninterrupted one-process run.
* Multi-process: process ``rank`` of ``world_size`` handles shards with ``i % world_size == rank``
  (``pending_shards()``). ``barrier`` (e.g. ``accelerator.wait_for_everyone``) is called after
  rank 0 prepares the directory and in ``finalize`` before rank 0 merges.
* If ``complete`` is true after construction, the final dataset with this fingerprint is already
  there: nothing to do.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

from treg.errors import TregError
from treg.io.fsutil import atomic_directory, atomic_file, atomic_write_text
from treg.io.meta import META_FILE, stable_hash, write_meta

SHARD_DIR = ".shards"
STAGING = "overwrite"  # OUT/../.OUT.overwrite: the shards of an --overwrite run while the old OUT stays
SETTINGS_FILE = "settings.json"
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.parquet$")


def changed_settings(new: dict, old) -> list[str]:
    """Sorted names of the settings whose values differ between ``new`` and ``old`` (a recorded settings
    dict, compared as JSON as it was written; anything but a dict counts as empty)."""
    new = json.loads(json.dumps(new, sort_keys=True, default=str))
    old = old if isinstance(old, dict) else {}
    return sorted(k for k in set(new) | set(old) if new.get(k) != old.get(k))


class ShardedWriter:
    """Rows -> ``OUT/.shards/shard-%05d.parquet`` (atomic), then ``finalize`` -> a Dataset dir."""

    def __init__(self, out_dir: str | os.PathLike, *, settings: dict, num_shards: int,
                 features=None, overwrite: bool = False, rank: int = 0, world_size: int = 1,
                 barrier: Callable[[], None] | None = None):
        """``features``: optional ``datasets.Features`` fixing the schema of every shard."""
        if num_shards < 1:
            raise TregError("nothing to write (0 rows)", file=str(out_dir))
        self.out = Path(out_dir)
        self.shard_dir = self.out / SHARD_DIR
        self.settings = settings
        self.fingerprint = stable_hash(settings)
        self.num_shards = num_shards
        self.features = features
        self.rank, self.world_size = rank, world_size
        self._barrier = barrier or (lambda: None)
        if rank == 0:
            self._prepare(overwrite)
        self._barrier()
        if self._settings_at(self._staging()).get("fingerprint") == self.fingerprint:
            self.shard_dir = self._staging()  # an --overwrite run: the old output stays until finalize
        self.complete = self.shard_dir != self._staging() and self._final_fingerprint() == self.fingerprint
        if not self.complete and rank != 0:
            self._check_settings()

    # ------------------------------------------------------------------------------ preparation
    def _siblings(self, kind: str) -> list[Path]:
        return sorted(self.out.parent.glob(f".{self.out.name}.{kind}-*"))

    def _final_fingerprint(self) -> str | None:
        meta = self.out / META_FILE
        if not meta.exists():
            return None
        try:
            return json.loads(meta.read_text()).get("fingerprint")
        except (json.JSONDecodeError, OSError):
            return None

    def _staging(self) -> Path:
        return self.out.parent / f".{self.out.name}.{STAGING}"

    @staticmethod
    def _settings_at(shard_dir: Path) -> dict:
        try:
            found = json.loads((shard_dir / SETTINGS_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            return {}
        return found if isinstance(found, dict) else {}

    def _shard_settings(self) -> dict | None:
        return self._settings_at(self.shard_dir) or None

    @staticmethod
    def _has_shards(shard_dir: Path) -> bool:
        return shard_dir.is_dir() and any(_SHARD_RE.match(p.name) for p in shard_dir.iterdir())

    def _changed(self, old) -> list[str]:
        """Names of the settings that differ from ``old`` (as recorded in settings.json)."""
        return changed_settings(self.settings, old) or ["shard layout"]

    def _refuse(self, what: str):
        raise TregError(f"{what} with different settings; pass --overwrite to replace it, or choose "
                        "another output", file=str(self.out))

    def _prepare(self, overwrite: bool) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        old = self._siblings("old")
        if not self.out.exists() and old:  # a crash between the two renames of finalize
            os.replace(old[-1], self.out)
        for leftover in self._siblings("tmp") + self._siblings("old"):
            shutil.rmtree(leftover, ignore_errors=True)
        staging = self._staging()
        if staging.exists():  # an earlier --overwrite run that did not finish
            staged = self._settings_at(staging)
            if staged.get("fingerprint") == self.fingerprint:
                return self._open(staging)  # resume it
            if not overwrite and self._has_shards(staging):
                self._refuse(f"an unfinished --overwrite run of this output (in {staging}; changed: "
                             f"{', '.join(self._changed(staged.get('settings')))}) was made")
            shutil.rmtree(staging)
        if self.out.exists() and not self.out.is_dir():
            raise TregError("output exists and is not a directory", file=str(self.out))
        if self.out.exists():
            final_fp = self._final_fingerprint()
            shard_settings = self._shard_settings()
            if final_fp is not None:
                if final_fp == self.fingerprint and not overwrite:
                    return  # complete already
                if not overwrite:
                    self._refuse("the output holds a finished dataset made")
                return self._open(staging)  # the finished output stays until the new one is complete
            elif shard_settings is not None:
                if shard_settings.get("fingerprint") != self.fingerprint:
                    # a run that finished no shard (e.g. its reward function raised on the first rows) is
                    # simply replaced; one with finished shards is refused, naming what changed
                    if not overwrite and self._has_shards(self.shard_dir):
                        self._refuse(f"the output holds an unfinished run (changed: "
                                     f"{', '.join(self._changed(shard_settings.get('settings')))})")
                    shutil.rmtree(self.out)
                elif overwrite:
                    shutil.rmtree(self.out)
            elif any(self.out.iterdir()):
                if not overwrite:
                    raise TregError("output directory is not empty and was not written by treg; pass "
                                    "--overwrite to replace it", file=str(self.out))
                return self._open(staging)  # replaced only once the new output is complete
        self._open(self.shard_dir)

    def _open(self, shard_dir: Path) -> None:
        """Use ``shard_dir`` for this run's shards: create it, drop killed writes, record the settings."""
        self.shard_dir = shard_dir
        shard_dir.mkdir(parents=True, exist_ok=True)
        for tmp in shard_dir.glob(".*.tmp*"):
            tmp.unlink(missing_ok=True)
        if self._shard_settings() is None:
            atomic_write_text(shard_dir / SETTINGS_FILE, json.dumps(
                {"fingerprint": self.fingerprint, "num_shards": self.num_shards,
                 "settings": self.settings}, indent=2, sort_keys=True, default=str))

    def _check_settings(self) -> None:
        found = self._shard_settings()
        if found is None or found.get("fingerprint") != self.fingerprint:
            raise RuntimeError(f"{self.shard_dir}: settings differ between processes "
                               "(were all processes given the same arguments?)")

    # ----------------------------------------------------------------------------------- shards
    def shard_path(self, i: int) -> Path:
        return self.shard_dir / f"shard-{i:05d}.parquet"

    def done_shards(self) -> set[int]:
        """Indices of shards already written (complete files only)."""
        if not self.shard_dir.exists():
            return set()
        found = (_SHARD_RE.match(p.name) for p in self.shard_dir.iterdir())
        return {int(m.group(1)) for m in found if m and int(m.group(1)) < self.num_shards}

    def pending_shards(self) -> list[int]:
        """This process's shards (``i % world_size == rank``) that are not written yet, in order."""
        if self.complete:
            return []
        done = self.done_shards()
        return [i for i in range(self.rank, self.num_shards, self.world_size) if i not in done]

    @classmethod
    def for_rows(cls, out_dir, rows: list, *, shard_size: int, settings: dict, state=None, features=None,
                 overwrite: bool = False) -> "ShardedWriter":
        """The writer of a stage over ``rows`` in shards of ``shard_size`` (the plan every stage shares).

        ``state``: anything with ``process_index``, ``num_processes`` and ``wait_for_everyone`` (e.g.
        ``accelerate.PartialState()``); None = one process.
        """
        writer = cls(out_dir, settings=settings, num_shards=-(-len(rows) // shard_size), features=features,
                     overwrite=overwrite, rank=getattr(state, "process_index", 0),
                     world_size=getattr(state, "num_processes", 1),
                     barrier=getattr(state, "wait_for_everyone", None))
        writer.rows, writer.shard_size = rows, shard_size
        return writer

    def shard_rows(self, i: int) -> list:
        """The input rows of shard ``i`` (a writer made by :meth:`for_rows`)."""
        return self.rows[i * self.shard_size:(i + 1) * self.shard_size]

    def pending_rows(self) -> int:
        """How many input rows this process still has to do (for progress bars)."""
        return sum(len(self.shard_rows(i)) for i in self.pending_shards())

    def run(self, work: Callable[[int, list], list[dict]], *, after_shard: Callable[[int], None] | None = None) -> None:
        """For each pending shard ``i`` in order: ``write(i, work(i, shard_rows(i)))``, then ``after_shard(i)``
        (progress updates; tests simulate crashes there)."""
        for i in self.pending_shards():
            self.write(i, work(i, self.shard_rows(i)))
            if after_shard is not None:
                after_shard(i)

    def write(self, i: int, rows: list[dict]) -> None:
        """Write shard ``i`` atomically (temp file in the shard dir + os.replace)."""
        import pyarrow as pa
        import pyarrow.parquet as pq
        if not 0 <= i < self.num_shards:
            raise IndexError(f"shard {i} out of range 0..{self.num_shards - 1}")
        schema = self.features.arrow_schema if self.features is not None else None
        table = pa.Table.from_pylist(rows, schema=schema)
        with atomic_file(self.shard_path(i)) as tmp:
            pq.write_table(table, tmp)

    # --------------------------------------------------------------------------------- finalize
    def finalize(self, meta: dict | Callable[[object], dict]) -> Path:
        """Barrier, then rank 0 merges all shards into ``OUT`` (datasets dir + treg_meta.json).

        ``meta``: a dict, or a function of the merged ``datasets.Dataset`` returning one (for counts
        and length statistics). ``fingerprint`` is added. Returns ``OUT`` on every rank.
        """
        self._barrier()
        if self.rank == 0 and not self.complete:
            missing = sorted(set(range(self.num_shards)) - self.done_shards())
            if missing:
                raise RuntimeError(f"{self.shard_dir}: shards {missing[:5]} missing at finalize")
            self._merge(meta)
        self._barrier()
        self.complete = True
        return self.out

    def load_shards(self):
        """All shards concatenated in index order as a ``datasets.Dataset`` (in memory)."""
        import datasets
        import pyarrow as pa
        import pyarrow.parquet as pq
        from datasets.table import InMemoryTable
        tables = [pq.read_table(self.shard_path(i)) for i in range(self.num_shards)]
        table = pa.concat_tables(tables)
        features = self.features or datasets.Features.from_arrow_schema(table.schema)
        return datasets.Dataset(InMemoryTable(table), info=datasets.DatasetInfo(features=features))

    def _merge(self, meta) -> None:
        dataset = self.load_shards()
        self.save_final(dataset, meta(dataset) if callable(meta) else meta)

    def save_final(self, dataset, meta: dict) -> None:
        """Swap ``dataset`` + ``meta`` (``fingerprint`` added) in as ``OUT`` (rank 0): what ``finalize`` does
        with the merged shards, for a stage whose output is made from them (score's pairs)."""
        meta = {**meta, "fingerprint": self.fingerprint}
        with atomic_directory(self.out) as tmp:  # a crash between its two renames is repaired by _prepare
            dataset.save_to_disk(str(tmp))
            write_meta(tmp, meta)
        if self.shard_dir == self._staging():  # an --overwrite run: the old output is gone now, so are its shards
            shutil.rmtree(self.shard_dir, ignore_errors=True)
