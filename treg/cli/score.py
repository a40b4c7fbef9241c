"""score samples with a reward model or function; best/worst preference pairs (METHOD.md §6)."""

from __future__ import annotations

import argparse

from treg.cli.util import OneLineParser, add_weights_argument, process_state


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="treg score", description=__doc__,
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--samples", required=True, help="samples dataset written by `treg sample` (or JSONL/Parquet "
                   "with prompt + responses)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--reward-model", help="AutoModelForSequenceClassification with num_labels=1 (dir or hub name)")
    g.add_argument("--reward-fn", help="'module:function' or 'file.py:function', called as fn(prompt, response) "
                   "-> float")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a reward model's custom code (e.g. ArmoRM); off by default, review the code first")
    p.add_argument("--output", required=True, help="output preference dataset (TRL format, for `treg annotate`)")
    p.add_argument("--min-margin", type=float, default=0.0,
                   help="drop prompts whose best-worst score difference is below this (ties are always dropped)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per reward-model forward")
    p.add_argument("--shard-size", type=int, default=64, help="prompts per resumable shard")
    p.add_argument("--overwrite", action="store_true", help="replace an output made with other settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_weights_argument(p)
    return p


def print_summary(stats: dict, output: str) -> None:
    """The score summary as a rich table on stdout."""
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"treg score -> {output}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for key in ("prompts", "pairs_kept", "dropped_ties", "dropped_below_margin", "mean_score_chosen",
                "mean_score_rejected", "mean_chars_chosen", "mean_chars_rejected"):
        v = stats.get(key)
        t.add_row(key, "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v)))
    Console().print(t)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    state = process_state()
    from treg.stages.scoring import score
    meta, _ = score(args.samples, args.output, reward_model=args.reward_model, reward_fn=args.reward_fn,
                    trust_remote_code=args.trust_remote_code, min_margin=args.min_margin,
                    batch_size=args.batch_size, shard_size=args.shard_size, overwrite=args.overwrite,
                    progress=not args.no_progress)
    if state.is_main_process:
        print_summary(meta, args.output)
        if state.num_processes > 1:
            print(f"treg score: on {state.num_processes} processes")
    return 0
