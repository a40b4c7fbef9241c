"""Stage metadata: ``treg_meta.json`` beside every dataset a stage writes.

Every stage output is a ``datasets`` directory (``save_to_disk``) plus ``treg_meta.json``:
``{"stage": ..., "treg_version": ..., "fingerprint": ..., ...stage fields}``. The fingerprint
identifies what produced the data (tokenizer, templates, settings), so a later stage can refuse
data made for another tokenizer and the pipeline can skip stages whose output is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from treg.errors import TregError
from treg.io.fsutil import atomic_directory, atomic_write_text

META_FILE = "treg_meta.json"


def stable_hash(obj: Any) -> str:
    """sha256 (first 16 hex digits) of a JSON-serialisable object, key order independent."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides token ids: vocab/merges/normalizer, specials, chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        core = backend.to_str()
    else:  # slow tokenizers: the vocabulary is what decides the ids
        core = json.dumps(sorted(tokenizer.get_vocab().items()))
    return stable_hash({
        "core": hashlib.sha256(core.encode()).hexdigest(),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": getattr(tokenizer, "chat_template", None),
    })


def write_meta(directory: str | os.PathLike, meta: dict) -> None:
    """Write ``treg_meta.json`` atomically (temp file + rename)."""
    from treg import __version__
    payload = {"treg_version": __version__, **meta}
    atomic_write_text(Path(directory) / META_FILE, json.dumps(payload, indent=2, sort_keys=True, default=str))


def read_meta(directory: str | os.PathLike, *, required: bool = True) -> dict:
    path = Path(directory) / META_FILE
    if not path.exists():
        if required:
            raise TregError(f"no {META_FILE} here; was this directory written by a treg stage?",
                            file=str(directory))
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise TregError(f"unreadable JSON ({err.msg} at line {err.lineno})", file=str(path)) from None


def save_dataset_atomic(dataset, directory: str | os.PathLike, meta: dict) -> None:
    """``dataset.save_to_disk`` + meta into a temp dir, then one rename: never half-written."""
    with atomic_directory(directory) as tmp:
        dataset.save_to_disk(str(tmp))
        write_meta(tmp, meta)


FULL_HASH_BYTES = 256 << 20  # files up to this size are hashed whole; larger ones by size, mtime and samples
_SAMPLE = 1 << 20


def file_digest(f) -> str:
    """Content hash of one file (blake2b): the whole file up to :data:`FULL_HASH_BYTES`; a larger one
    (model weights) by its size, modification time and 1 MiB at its start, middle and end, so that a
    fingerprint of a 10 GB checkpoint costs milliseconds, not a full read."""
    st = f.stat()
    h = hashlib.blake2b(digest_size=16)
    with open(f, "rb") as fh:
        if st.st_size <= FULL_HASH_BYTES:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        else:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            for at in (0, st.st_size // 2, st.st_size - _SAMPLE):
                fh.seek(at)
                h.update(fh.read(_SAMPLE))
    return h.hexdigest()


def path_fingerprint(path: str) -> str:
    """Identity of a model / data file / directory for stage fingerprints. A local path: the relative
    names and content hashes (:func:`file_digest`) of its files, so a file edited in place changes
    it, even with its size and modification time kept, and a touched but unchanged file does not.
    Anything else (a hub name): the name."""
    p = Path(path)
    if not p.exists():
        return stable_hash({"name": str(path)})
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and ".shards" not in f.parts)
    return stable_hash([(str(f.relative_to(p)) if f != p else f.name, file_digest(f))
                        for f in files if not f.name.startswith(".")] or [os.fspath(p)])
