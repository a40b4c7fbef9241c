"""Values checked from their declared types plus a small table of ranges, at parse time.

:func:`check_fields` checks every field of a dataclass instance against its annotation (``int``,
``float``, ``bool``, ``str``, ``X | None``, ``list[X]``, ``dict``, enums, ``Literal``), rejects NaN and
infinities in float fields, and checks the fields named in a ranges table. A range is a short text:
``"> 0"``, ``">= 1"``, ``"[0, 1]"``, ``"(0, 1]"``, ``"[0, 1)"``, optionally followed by ``"; why"`` (a hint
added to the error). :func:`check_namespace` does the same
for an argparse namespace (the types there are the actions' ``type=``). Each failure is one
:class:`treg.errors.TregError` naming the field.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing

from treg.errors import TregError

_OPS = {">": lambda v, b: v > b, ">=": lambda v, b: v >= b, "<": lambda v, b: v < b, "<=": lambda v, b: v <= b}


def in_range(value, spec: str) -> bool:
    """Whether ``value`` lies in ``spec`` (see the module docstring)."""
    spec = spec.strip()
    if spec[0] in "[(":
        lo, hi = (float(x) for x in spec[1:-1].split(","))
        return (value >= lo if spec[0] == "[" else value > lo) and (value <= hi if spec[-1] == "]" else value < hi)
    op, bound = spec.split()
    return _OPS[op](value, float(bound))


def _type_name(tp) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def matches(value, tp) -> bool:
    """Whether ``value`` fits the annotation ``tp`` (unknown kinds of annotation accept anything)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if origin in (list, tuple, set):
        args = typing.get_args(tp)
        return isinstance(value, (list, tuple)) and (not args or all(matches(v, args[0]) for v in value))
    if origin is dict:
        return isinstance(value, dict)
    if tp is type(None) or tp is None:
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return isinstance(value, (tp, str))
    if tp in (list, dict):
        return isinstance(value, tp)
    return True


def check_value(name: str, value, tp=None, spec: str | None = None, *, label: str | None = None) -> None:
    """TregError (field ``label`` or ``name``) unless ``value`` fits ``tp``, is finite and lies in ``spec``."""
    label = label or name
    if tp is not None and not matches(value, tp):
        raise TregError(f"expected {_type_name(tp)}, got {type(value).__name__} {str(value)[:40]!r}", field=label)
    if isinstance(value, float) and not math.isfinite(value):
        raise TregError(f"must be a finite number, got {value}", field=label)
    bounds, _, why = (spec or "").partition(";")
    if bounds and isinstance(value, (int, float)) and not isinstance(value, bool) and not in_range(value, bounds):
        raise TregError(f"must be {bounds.strip()}, got {value!r}" + (f" ({why.strip()})" if why else ""), field=label)


def check_fields(obj, ranges: dict[str, str]) -> None:
    """Check every init field of the dataclass instance ``obj`` that differs from its default (types from its
    annotations)."""
    try:
        hints = typing.get_type_hints(type(obj))
    except Exception:  # noqa: BLE001 - an unresolvable annotation: check only the resolved ones
        hints = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None and f.name not in ranges:  # unset by a parser (HfArgumentParser's lists)
            continue
        if f.init and not (f.default is not dataclasses.MISSING and _same(value, f.default)):
            tp = hints.get(f.name, f.type if not isinstance(f.type, str) else None)
            check_value(f.name, value, tp, ranges.get(f.name))


def _same(value, default) -> bool:
    """A field left at its declared default is trusted (some libraries' defaults stray from their annotations)."""
    try:
        return value is default or (type(value) is type(default) and bool(value == default))
    except Exception:  # noqa: BLE001
        return False


def check_namespace(parser, namespace, ranges: dict[str, str]) -> None:
    """Check the values of ``parser``'s options in ``namespace``: finite floats, and ``ranges`` (keyed by
    ``dest`` or ``"<prog>:<dest>"``, the latter winning) for numbers; errors name the ``--flag``."""
    for action in parser._actions:
        value = getattr(namespace, action.dest, None)
        if action.dest in ("help", None) or value is None or not action.option_strings:
            continue
        spec = ranges.get(f"{parser.prog}:{action.dest}", ranges.get(action.dest))
        for v in value if isinstance(value, list) else [value]:
            check_value(action.option_strings[-1], v, None, spec, label=action.option_strings[-1])
