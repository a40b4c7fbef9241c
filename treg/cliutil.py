"""Small pieces every stage CLI shares: one-line argument errors and early checks of local paths."""

from __future__ import annotations

import argparse
import os

from treg.errors import TregError


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes (unknown or misspelled option, missing or invalid value) are a
    TregError: one line and exit 2 through the CLI instead of a usage dump. ``--help`` is unchanged."""

    def error(self, message):
        raise TregError(f"{message} (see {self.prog} --help)")


def check_local_path(path: str, field: str | None = None, *, what: str = "file or directory") -> None:
    """A missing path that cannot be a hub id (``./x``, ``/x``, ``~/x``, ``a/b/c``, ``x.jsonl``) is a
    one-line error at once, instead of minutes of hub retries that end in a long message."""
    p = str(path)
    looks_local = p.startswith((".", "/", "~")) or p.count("/") > 1 or p.endswith((".json", ".jsonl", ".parquet"))
    if looks_local and not os.path.exists(os.path.expanduser(p)):
        raise TregError(f"no such {what}", file=p, field=field)
