"""win rate of outputs over a baseline under a judge (reward model or function), with a bootstrap
95% interval and AlpacaEval 0.6.6's length-controlled win rate (method: docs/evaluation.md)."""

from __future__ import annotations

import argparse
import json

from treg.cli.util import OneLineParser, add_weights_argument


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="treg eval", description=__doc__,
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--outputs", required=True, help="model outputs (alpaca_eval JSON, arena_hard or treg JSONL)")
    p.add_argument("--baseline", default=None, help="baseline outputs, same kinds; paired by instruction "
                   "(required with --judge/--reward-fn; with --alpaca-eval, omitted = AlpacaEval 2's own reference)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--judge", help="reward model judging both (AutoModelForSequenceClassification, num_labels=1)")
    g.add_argument("--reward-fn", help="'module:function' or 'file.py:function': fn(prompt, output) -> float")
    g.add_argument("--alpaca-eval", action="store_true",
                   help="hand both files to the official alpaca_eval CLI (needs the package and OPENAI_API_KEY)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the judge's custom code")
    p.add_argument("--questions", default=None, help="Arena-Hard question.jsonl (its answers carry no prompt)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per judge forward")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the 95%% interval")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--allow-unpaired", action="store_true", help="compare the instructions both files share "
                   "(default: different instruction sets are an error)")
    p.add_argument("--lc-gamed", default=None, metavar="DF_GAMED_CSV",
                   help="AlpacaEval's df_gamed.csv (hub dataset tatsu-lab/alpaca_eval): instruction difficulty and "
                   "gamed-baseline annotations for its length_controlled_v1 LC; the --outputs file must then list "
                   "AlpacaEval's 805 instructions in its order. Without it (offline): length_controlled_minimal")
    p.add_argument("--lc-glm", default=None, choices=["length_controlled_v1", "length_controlled_noreg",
                                                       "length_controlled_minimal"],
                   help="AlpacaEval GLM for the LC win rate (default: v1 with --lc-gamed, else minimal)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar while the judge scores")
    p.add_argument("--report", default=None, help="also write the result as JSON here")
    add_weights_argument(p)
    return p


def print_report(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"treg eval: {r['outputs']} vs {r['baseline']} ({r['judge']})")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("paired prompts", str(r["n"]))
    t.add_row("wins / ties / losses", f"{r['wins']} / {r['ties']} / {r['losses']}")
    t.add_row("win rate %", f"{r['win_rate']:.1f}  [{r['ci95_low']:.1f}, {r['ci95_high']:.1f}] 95% CI")
    t.add_row("standard error %", f"{r['standard_error']:.2f}")
    if r["lc_win_rate"] is None:
        t.add_row("LC win rate %", f"n/a ({r['lc_note']})")
    else:
        t.add_row("LC win rate %", f"{r['lc_win_rate']:.1f} ± {r['lc_standard_error']:.2f} SE  ({r['lc_note']})")
    t.add_row("mean chars (outputs / baseline)", f"{r['mean_chars_a']:.0f} / {r['mean_chars_b']:.0f}")
    t.add_row("mean score (outputs / baseline)", f"{r['mean_score_a']:.4g} / {r['mean_score_b']:.4g}")
    if r["unpaired_outputs"] or r["unpaired_baseline"]:
        t.add_row("unpaired (outputs / baseline)", f"{r['unpaired_outputs']} / {r['unpaired_baseline']}")
    Console().print(t)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from treg.errors import TregError
    from treg.stages.evaluation import evaluate, run_alpaca_eval
    from treg.io.fsutil import atomic_write_text
    if args.alpaca_eval:
        return run_alpaca_eval(args.outputs, args.baseline)
    if not (args.judge or args.reward_fn):
        raise TregError("give a judge: --judge RM, --reward-fn module:function, or --alpaca-eval")
    if not args.baseline:
        raise TregError("--baseline is required with --judge / --reward-fn")
    r = evaluate(args.outputs, args.baseline, judge=args.judge, reward_fn=args.reward_fn,
                 trust_remote_code=args.trust_remote_code, questions=args.questions,
                 batch_size=args.batch_size, n_boot=args.bootstrap, seed=args.seed,
                 allow_unpaired=args.allow_unpaired, lc_gamed=args.lc_gamed, lc_glm=args.lc_glm,
                 progress=not args.no_progress)
    print_report(r)
    if args.report:
        atomic_write_text(args.report, json.dumps(r, indent=2) + "\n")
    return 0
