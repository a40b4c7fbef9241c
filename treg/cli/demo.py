"""the whole method on the embedded toy world, with a report"""

from __future__ import annotations

import argparse

from treg.cli.util import OneLineParser, add_weights_argument


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from treg.toy.demo import DemoConfig
    d = DemoConfig()
    p = OneLineParser(
        prog="treg demo", description="Sample, score (proxy reward), pair, annotate (contrastive prompting), "
        "train DPO and DPO-REG (and ablations) with equal budgets on the toy world, evaluate with the exact "
        "verifier and write results.json, report.md and report.html.")
    p.add_argument("--out", default=d.out, help=f"output directory (default {d.out})")
    p.add_argument("--seeds", type=int, default=d.seeds,
                   help=f"data/training seeds; tables show mean ± std over them (default {d.seeds})")
    p.add_argument("--ablations", action="store_true",
                   help="also static weighting, DPO-SFT, DPO-reward regularizer, SimPO and SimPO-REG")
    p.add_argument("--quick", action="store_true",
                   help="a small, fast run for smoke tests (few prompts and steps; numbers are not meaningful)")
    p.add_argument("--train-prompts", type=int, default=d.train_prompts,
                   help=f"training prompts per seed (default {d.train_prompts})")
    p.add_argument("--n-samples", type=int, default=d.n_samples,
                   help=f"samples per training prompt (default {d.n_samples})")
    p.add_argument("--eval-prompts", type=int, default=d.eval_prompts,
                   help=f"held-out evaluation prompts (default {d.eval_prompts})")
    p.add_argument("--eval-samples", type=int, default=d.eval_samples,
                   help=f"samples per evaluation prompt (default {d.eval_samples})")
    p.add_argument("--temperature", type=float, default=d.temperature,
                   help=f"sampling temperature for training data and evaluation (default {d.temperature:g})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"training steps per method (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"pairs per step (default {d.batch_size})")
    p.add_argument("--lrs", type=_floats, default=d.lrs,
                   help="learning rate(s), comma-separated; with several (or several --alphas) each method "
                        "picks its best on separate tuning prompts with seed 0 (default %(default)s)")
    p.add_argument("--alphas", type=_floats, default=d.alphas,
                   help="regularizer weight(s) alpha for the *_reg methods, comma-separated (default %(default)s)")
    p.add_argument("--beta", type=float, default=d.beta, help=f"DPO beta (default {d.beta:g})")
    p.add_argument("--simpo-beta", type=float, default=d.simpo_beta, help=f"SimPO beta (default {d.simpo_beta:g})")
    p.add_argument("--simpo-gamma", type=float, default=d.simpo_gamma,
                   help=f"SimPO margin gamma (default {d.simpo_gamma:g})")
    p.add_argument("--tune-prompts", type=int, default=d.tune_prompts,
                   help=f"prompts used to pick lr/alpha when several are given (default {d.tune_prompts})")
    from treg.toy.protocol import PICK_RULES, PROTOCOLS, TUNE_SEED_OFFSET
    p.add_argument("--protocol", choices=list(PROTOCOLS), default=d.protocol,
                   help="shared: as described under --lrs (tuning on seed 0); tuned: every method gets the same "
                        "number of grid points, each run on --tune-seeds tuning seeds (own prompts, seeds "
                        f"{TUNE_SEED_OFFSET}+) and picked by --pick, then evaluated on the --seeds test seeds, "
                        "with differences to DPO paired by seed and prompt (docs/results.md) "
                        "(default %(default)s)")
    p.add_argument("--tune-seeds", type=int, default=d.tune_seeds,
                   help=f"tuning seeds per grid point with --protocol tuned (default {d.tune_seeds})")
    p.add_argument("--pick", choices=list(PICK_RULES), default=d.pick,
                   help="how --protocol tuned scores a grid point from its tuning-seed rewards: their mean, or "
                        "mean minus one sample std; the highest wins (default %(default)s)")
    p.add_argument("--model", default=None, help="toy checkpoint directory (default: the shipped one)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="print only where the report is")
    add_weights_argument(p)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from treg.toy.demo import DemoConfig, run_demo
    values = {k: v for k, v in vars(args).items() if k not in ("quick", "allow_pickle_weights")}
    if args.quick:
        values.update(train_prompts=min(args.train_prompts, 48), eval_prompts=min(args.eval_prompts, 24),
                      eval_samples=1, steps=min(args.steps, 6), batch_size=min(args.batch_size, 8),
                      tune_prompts=min(args.tune_prompts, 16))
    cfg = DemoConfig(**values)
    results = run_demo(cfg)
    rows = results["methods"]
    summary = ", ".join(f"{k} {v['eval_reward_mean']:.3f}" for k, v in rows.items())
    print(f"eval reward: {summary}")
    print(f"report: {cfg.out}/report.html (and report.md, results.json); wall {results['wall_seconds']:.0f} s")
    return 0
