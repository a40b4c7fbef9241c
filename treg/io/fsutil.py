"""Atomic file and directory writes: a stage's output is either complete or absent, never half-written.

Files and directories are built under a hidden temporary name beside their destination and renamed into
place in one step. Temporary files from ``tempfile`` are private (0600/0700); they get the usual
umask-derived permissions before the rename, so outputs are as readable as any other file the user writes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

from treg.errors import TregError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _naming(path: Path, always: bool = False) -> Iterator[None]:
    """An ``OSError`` that names no file (pyarrow's ``[Errno 27] File too large`` while a dataset is saved;
    with ``always``, any) is raised again naming ``path``, the output being written, so that the one-line
    error says where."""
    try:
        yield
    except OSError as err:
        if (err.filename is not None and not always) or err.errno is None:
            raise
        raise OSError(err.errno, err.strerror or os.strerror(err.errno), str(path)) from err


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` (parents are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _naming(path, always=True):  # a read-only directory: name the output, not the temporary name
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    os.close(fd)
    try:
        with _naming(path):
            yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``path``; on success it replaces ``path`` (an existing
    directory there is moved aside first and removed after the rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _naming(path, always=True):
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        with _naming(path):
            yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        old = path.parent / f".{path.name}.old-{time.time_ns()}"
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_writable(directory: str | os.PathLike) -> None:
    """Fail now, not at the end of hours of work, when ``directory`` (or, while it does not exist yet, the
    nearest existing directory it would be created in) refuses new files: a temporary file is created
    there and removed. The ``OSError`` names ``directory``."""
    found = Path(directory).expanduser().absolute()
    while not found.exists() and found.parent != found:
        found = found.parent
    if found.is_dir():  # a regular file in the way is reported where the directory is made
        with _naming(Path(directory), always=True), tempfile.TemporaryFile(dir=found):
            pass


def check_local_path(path: str, field: str | None = None, *, what: str = "file or directory") -> None:
    """A missing path that cannot be a hub id (``./x``, ``/x``, ``~/x``, ``a/b/c``, ``x.jsonl``) is a
    one-line error at once, instead of minutes of hub retries that end in a long message."""
    p = str(path)
    looks_local = p.startswith((".", "/", "~")) or p.count("/") > 1 or p.endswith((".json", ".jsonl", ".parquet"))
    if looks_local and not os.path.exists(os.path.expanduser(p)):
        raise TregError(f"no such {what}", file=p, field=field)
    if os.path.exists(os.path.expanduser(p)):
        from treg.io.zoo import refuse_gguf
        refuse_gguf(p, field)  # a GGUF file or a directory of GGUF: one line naming treg model convert-gguf


def read_yaml_mapping(path: str, *, what: str = "config file") -> dict:
    """A YAML file holding a mapping (``{}`` when empty); TregError on a missing file, bad YAML (with the
    line) or a top level that is not a mapping."""
    import yaml
    p = Path(path)
    if not p.is_file():
        raise TregError(f"no such {what}", file=path)
    try:
        data = yaml.safe_load(read_text_strict(p, allow_empty=True)) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise TregError(f"invalid YAML{where}", file=path) from None
    if not isinstance(data, dict):
        raise TregError("expected a mapping of option: value", file=path)
    return data


def read_text_strict(path: str | os.PathLike, *, what: str = "file", allow_empty: bool = False) -> str:
    """The text of ``path`` decoded as strict UTF-8 (a BOM is dropped). TregError naming the file, line and
    byte offset of the first invalid byte; one saying the file is empty (unless ``allow_empty``)."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise TregError(f"not valid UTF-8: byte 0x{data[err.start]:02x} at line {line}, byte offset {err.start} "
                        "(re-save the file as UTF-8)", file=str(path)) from None
    if not allow_empty and not text.strip():
        raise TregError(f"empty {what}", file=str(path))
    return text
