"""token-reward heat maps of an annotated dataset (terminal / HTML)."""

from __future__ import annotations

import argparse
from pathlib import Path

from treg.cli.util import OneLineParser
from treg.errors import TregError
from treg.io.fsutil import atomic_write_text


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="treg show",
                                description="Summary statistics and per-token r_hat heat maps of a dataset "
                                            "written by 'treg annotate'.")
    p.add_argument("path", help="annotated dataset directory (output of treg annotate)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--index", type=int, default=None, help="show this pair (0-based row; default 0)")
    which.add_argument("--worst", type=int, default=None, metavar="K",
                       help="show the K pairs with the lowest mean r_hat(chosen) - mean r_hat(rejected)")
    p.add_argument("--html", default=None, help="also write the shown pairs as one self-contained HTML page")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer to decode tokens (default: the model recorded in treg_meta.json)")
    p.add_argument("--top", type=int, default=10, help="how many most-negative tokens to list (default 10)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from rich.console import Console

    from treg.io.data import load_annotated
    from treg.io.meta import read_meta
    from treg.stages.show import print_summary, render_html, render_terminal, summary, worst_indices

    path = Path(args.path)
    if not path.is_dir():
        raise TregError("no such dataset directory", file=str(path))
    name = args.tokenizer or read_meta(path).get("model")
    if not name:
        raise TregError("no model recorded in treg_meta.json; pass --tokenizer", file=str(path))
    from treg.io.loading import load_tokenizer
    tokenizer = load_tokenizer(name, field="tokenizer", model_weights=False)
    # the data contract: stage, fingerprint of THIS tokenizer (else tokens decode to garbage), non-empty,
    # one reward per token, finite values
    ds = load_annotated(path, tokenizer).dataset
    if args.worst is not None:
        if args.worst < 1:
            raise TregError("must be >= 1", field="worst")
        indices = worst_indices(ds, args.worst)
    else:
        index = args.index or 0
        if not 0 <= index < len(ds):
            raise TregError(f"out of range (the dataset has {len(ds)} pairs)", field="index")
        indices = [index]
    rows = [ds[i] for i in indices]
    console = Console()
    print_summary(summary(ds, tokenizer, top=args.top), console)
    render_terminal(rows, tokenizer, console, indices=indices)
    if args.html:
        out = Path(args.html)
        atomic_write_text(out, render_html(rows, tokenizer, title=f"T-REG token rewards: {path.name}",
                                           indices=indices))
        console.print(f"wrote {out}")
    return 0
