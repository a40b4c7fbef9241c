"""Fingerprints of local paths hash the files' contents (treg.io.meta.path_fingerprint, re-exported by treg.stages.sampling)."""

import os

from treg.io import meta as sampling
from treg.io.meta import path_fingerprint


def _edit_keeping_stat(f, data: bytes):
    st = f.stat()
    f.write_bytes(data)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same modification time


def test_fingerprint_changes_when_a_local_file_changes(tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_bytes(b'{"prompt": "hello"}\n')
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"\0" * 4096)
    fp_f, fp_d = path_fingerprint(str(f)), path_fingerprint(str(d))
    _edit_keeping_stat(f, b'{"prompt": "jello"}\n')
    _edit_keeping_stat(d / "model.safetensors", b"\0" * 4095 + b"\1")
    assert path_fingerprint(str(f)) != fp_f and path_fingerprint(str(d)) != fp_d
    # touched but unchanged: the same fingerprint; a hub name: the name
    fp_f = path_fingerprint(str(f))
    os.utime(f, ns=(1, 1))
    assert path_fingerprint(str(f)) == fp_f
    assert path_fingerprint("org/model") == path_fingerprint("org/model") != path_fingerprint("org/other")


def test_large_files_are_sampled_not_read_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(sampling, "FULL_HASH_BYTES", 1024)
    monkeypatch.setattr(sampling, "_SAMPLE", 16)
    f = tmp_path / "w.bin"
    f.write_bytes(bytes(4096))
    fp = path_fingerprint(str(f))
    _edit_keeping_stat(f, bytes(4095) + b"\1")  # in the last sample
    assert path_fingerprint(str(f)) != fp
    fp = path_fingerprint(str(f))
    os.utime(f, ns=(5, 5))  # for a sampled file the modification time counts
    assert path_fingerprint(str(f)) != fp
