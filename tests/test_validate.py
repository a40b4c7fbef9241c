"""treg.validate (types from annotations + a ranges table) and treg.boundary (OS errors -> one line)."""

from __future__ import annotations

import dataclasses
import errno
import math

import pytest

from treg.boundary import describe
from treg.errors import TregError
from treg.validate import check_fields, check_value, in_range, matches


@pytest.mark.parametrize("value, spec, ok", [
    (0, "> 0", False), (1e-9, "> 0", True), (0, ">= 0", True), (1, "[0, 1)", False), (0, "[0, 1)", True),
    (1, "(0, 1]", True), (0, "(0, 1]", False), (-1, ">= -1", True), (5, "<= 4", False)])
def test_in_range(value, spec, ok):
    assert in_range(value, spec) is ok


@pytest.mark.parametrize("value, tp, ok", [
    (1, int, True), (True, int, False), (1.5, int, False), (1, float, True), ("1", float, False),
    ([1, 2], int, False), (None, int | None, True), (["a"], list[str], True), ([1], list[str], False),
    ({"a": 1}, dict | str, True), ("x", bool, False)])
def test_matches(value, tp, ok):
    assert matches(value, tp) is ok


def test_check_value_messages():
    with pytest.raises(TregError, match=r"field 'lr': must be a finite number, got nan"):
        check_value("lr", math.nan, float, "> 0")
    with pytest.raises(TregError, match=r"field 'n': expected int, got list"):
        check_value("n", [1, 2], int)
    with pytest.raises(TregError, match=r"field 'n': must be >= 2, got 1"):
        check_value("n", 1, int, ">= 2")


def test_check_fields_from_annotations():
    @dataclasses.dataclass
    class C:
        lr: float = 1e-3
        steps: int = 3
        name: str | None = None

    check_fields(C(), {"lr": "> 0"})
    for bad, field in ((C(lr=math.inf), "lr"), (C(steps=[1]), "steps"), (C(name=3), "name"), (C(lr=0.0), "lr")):
        with pytest.raises(TregError) as info:
            check_fields(bad, {"lr": "> 0"})
        assert info.value.field == field


def test_ranges_tables_name_real_fields_and_options():
    from treg.cli import COMMANDS
    from treg.cli.util import CLI_RANGES
    from treg.stages.config import RANGES, TRegConfig
    import importlib
    fields = {f.name for f in dataclasses.fields(TRegConfig)}
    assert set(RANGES) <= fields
    dests = set()
    for name in COMMANDS:
        module = importlib.import_module(COMMANDS[name][0])
        if hasattr(module, "build_parser"):
            parser = module.build_parser()
            subs = [a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict)]
            for p in [parser] + [s for a in subs for s in a.choices.values()]:
                dests |= {(p.prog, a.dest) for a in p._actions}
    for key in CLI_RANGES:
        prog, _, dest = key.rpartition(":")
        assert any(d == dest and (not prog or p == prog) for p, d in dests), key


@pytest.mark.parametrize("err, line", [
    (PermissionError(errno.EACCES, "Permission denied", "/x/out.json"), "/x/out.json: Permission denied"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/x/d"), "/x/d: Is a directory"),
    (OSError(errno.EFBIG, "File too large", "/x/f"), "/x/f: file too large (a file-size limit"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "accelerate"), "accelerate: No such file"),
    (FileExistsError(errno.EEXIST, "File exists", "/a", None, "/b"), "/a -> /b: File exists"),
    (TregError("bad\nvalue", file="f.yaml"), "f.yaml: bad value"),
])
def test_describe(err, line):
    text = describe(err)
    assert text.startswith(line) and "\n" not in text


def test_os_error_of_native_library_messages():
    from treg.boundary import os_error_of
    err = os_error_of(RuntimeError("Error while serializing: I/O error: File too large (os error 27)"), "/x/out")
    assert isinstance(err, OSError) and err.errno == errno.EFBIG and err.filename == "/x/out"
    assert os_error_of(ValueError("shape mismatch"), "/x") is None
