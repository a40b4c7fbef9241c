"""Wall time of each stage of `treg demo` on the toy world (one seed, default sizes).

Usage: python benchmarks/bench_demo.py [--train-prompts 500] [--steps 100]
Prints a markdown table: stage, what it processes, seconds.
"""

from __future__ import annotations

import argparse
import tempfile
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--train-prompts", type=int, default=500, help="training prompts (default 500)")
    p.add_argument("--eval-prompts", type=int, default=300, help="held-out prompts (default 300)")
    p.add_argument("--steps", type=int, default=100, help="training steps (default 100)")
    args = p.parse_args()
    import torch
    from treg.toy.demo import DemoConfig, _quiet_libraries, train_policy
    from treg.toy import checkpoint_path, load, pipeline
    _quiet_libraries()
    cfg = DemoConfig(train_prompts=args.train_prompts, eval_prompts=args.eval_prompts, steps=args.steps,
                     model=checkpoint_path())
    ref, tok = load(cfg.model)
    rows = pipeline.prompts(cfg.train_prompts, 10_000)
    eval_rows = pipeline.prompts(cfg.eval_prompts, cfg.eval_seed, prefix="eval-")
    table = []

    def timed(stage, what, fn):
        t = time.perf_counter()
        out = fn()
        table.append((stage, what, time.perf_counter() - t))
        return out

    resp = timed("sample", f"{len(rows)} prompts x {cfg.n_samples}",
                 lambda: pipeline.sample_responses(ref, tok, rows, n=cfg.n_samples, seed=0))
    pairs, _ = timed("score + pair", f"{len(rows)} groups (proxy reward)",
                     lambda: pipeline.make_pairs(rows, resp, reward_seed=0))
    ds = timed("annotate", f"{len(pairs)} pairs (contrastive)", lambda: pipeline.annotate_pairs(ref, tok, pairs))
    with tempfile.TemporaryDirectory() as work:
        for name in ("dpo", "dpo_reg"):
            model, _ = timed(f"train {name}", f"{cfg.steps} steps x {cfg.batch_size} pairs",
                             lambda: train_policy(cfg, name, ds, lr=cfg.lrs[0], alpha=cfg.alphas[0], seed=0,
                                                  workdir=work))
        timed("evaluate", f"{len(eval_rows)} prompts x {cfg.eval_samples}",
              lambda: pipeline.evaluate(model, tok, eval_rows, n=cfg.eval_samples, seed=cfg.eval_seed))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| stage | work | seconds |\n|---|---|---|")
    for stage, what, sec in table:
        print(f"| {stage} | {what} | {sec:.1f} |")


if __name__ == "__main__":
    main()
