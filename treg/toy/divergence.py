"""Why does DPO-REG fall back at lr 1e-4 on some seeds? Measurements over training (issue 16, item 2).

``python -m treg.toy.divergence --seeds 1,3 --lrs 5e-5,1e-4 --out /tmp/div.json``

For each test seed (the demo's data: same prompts, pairs, token rewards as ``treg demo`` with its
defaults) and learning rate, trains ``dpo_reg`` (alpha 0.5, sequence weighting) exactly as the demo
does and, at every logging step (every 5 of 100 steps), measures on a fixed probe of the seed's
first ``--probe-pairs`` training pairs (no gradient, RNG state restored):

- ``neg_delta`` / ``pos_delta``: mean of ``log pi - log pi_ref`` over response tokens with token
  reward r < 0 / r > 0 (chosen and rejected pooled); ``neg_logp_p05``: 5th percentile of log pi on
  the r < 0 tokens; ``chosen_delta`` / ``rejected_delta``: mean per-token ``log pi - log pi_ref`` over
  all chosen / rejected tokens;
- ``param_drift``: ||theta - theta_0|| (L2 over all parameters); ``grad_norm`` from the trainer log;
- ``reg_share``: ``|alpha w L_REG| / (|L_pref| + |alpha w L_REG|)`` from the logged
  ``treg/pref_loss``, ``treg/reg_loss``, ``treg/seq_weight`` (batch means).

and finally the held-out verifier reward (the demo's evaluation). Prints one table per run; writes
every series to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile

import numpy as np


def _probe_logps(model, probe) -> list[tuple]:
    """Per probe pair and side: (policy token log-probs, ref token log-probs, token rewards)."""
    import torch
    from treg.io.schema import IDS, PROMPT, REF_TOK, REWARDS, SIDES
    out = []
    for row in probe:
        for side in SIDES:
            prompt, resp = row[PROMPT], row[IDS[side]]
            ids = torch.tensor([prompt + resp])
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
            lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(resp)[:, None])[:, 0]
            out.append((side, lp.numpy(), np.asarray(row[REF_TOK[side]]), np.asarray(row[REWARDS[side]])))
    return out


def probe_metrics(model, probe, theta0) -> dict:
    import torch
    state = torch.random.get_rng_state()
    was_training = model.training
    model.eval()
    with torch.no_grad():
        rows = _probe_logps(model, probe)
        drift = math.sqrt(sum(float(((p.detach() - theta0[n]) ** 2).sum()) for n, p in model.named_parameters()))
    model.train(was_training)
    torch.random.set_rng_state(state)
    neg = np.concatenate([lp[r < 0] for _, lp, _, r in rows])
    neg_d = np.concatenate([(lp - ref)[r < 0] for _, lp, ref, r in rows])
    pos_d = np.concatenate([(lp - ref)[r > 0] for _, lp, ref, r in rows])
    side_d = {s: np.concatenate([lp - ref for side, lp, ref, _ in rows if side == s]) for s in ("chosen", "rejected")}
    return {"neg_delta": float(neg_d.mean()), "pos_delta": float(pos_d.mean()),
            "neg_logp_p05": float(np.percentile(neg, 5)), "chosen_delta": float(side_d["chosen"].mean()),
            "rejected_delta": float(side_d["rejected"].mean()), "param_drift": drift, "n_neg_tokens": int(neg.size)}


def run(seeds: list[int], lrs: list[float], alpha: float, probe_pairs: int, threads: int | None,
        method: str = "dpo_reg") -> list[dict]:
    import torch
    from transformers import TrainerCallback
    from treg.toy import checkpoint_path, demo, pipeline
    if threads:
        torch.set_num_threads(threads)
    demo._quiet_libraries()
    cfg = demo.DemoConfig(model=checkpoint_path(), quiet=True)
    ref, tok = demo._load(cfg.model)
    eval_rows = pipeline.prompts(cfg.eval_prompts, cfg.eval_seed, prefix="eval-")  # as demo._run
    eval_queries = {pipeline.query_of(r["prompt"]) for r in eval_rows}
    tune_rows = pipeline.prompts(cfg.tune_prompts, cfg.eval_seed + 1, exclude=eval_queries, prefix="tune-")
    eval_queries |= {pipeline.query_of(r["prompt"]) for r in tune_rows}
    theta0 = {n: p.detach().clone() for n, p in ref.named_parameters()}
    results = []
    for seed in seeds:
        dataset, _ = demo.prepare_data(cfg, seed, ref, tok, eval_queries)
        probe = [dataset[i] for i in range(min(probe_pairs, len(dataset)))]
        for lr in lrs:
            series = []

            class Probe(TrainerCallback):
                def on_log(self, args, state, control, model=None, logs=None, **kw):
                    if logs and "treg/pref_loss" in logs:
                        pref, reg, w = logs["treg/pref_loss"], logs["treg/reg_loss"], logs["treg/seq_weight"]
                        a = alpha if demo.METHODS[method]["reg"] else 0.0
                        share = abs(a * w * reg) / (abs(pref) + abs(a * w * reg))
                        series.append({"step": state.global_step, "loss": logs.get("loss"), "pref_loss": pref,
                                       "reg_loss": reg, "seq_weight": w, "reg_share": share,
                                       "grad_norm": logs.get("grad_norm"), **probe_metrics(model, probe, theta0)})

            with tempfile.TemporaryDirectory() as workdir:
                model, _ = demo.train_policy(cfg, method, dataset, lr=lr, alpha=alpha, seed=seed,
                                             workdir=workdir, callbacks=[Probe()])
            recs = pipeline.evaluate(model, tok, eval_rows, n=cfg.eval_samples, seed=cfg.eval_seed)
            res = {"method": method, "seed": seed, "lr": lr, "alpha": alpha, "eval_reward": pipeline.summarize(recs)["reward"],
                   "series": series}
            results.append(res)
            print(f"{method} seed {seed} lr {lr:g}: eval reward {res['eval_reward']:.4f}", flush=True)
            print("  step   loss  pref    reg   w    share  gnorm  neg_d   pos_d   negp05  ch_d    rj_d    drift")
            for s in series[::2] + ([series[-1]] if len(series) % 2 == 0 else []):
                print(f"  {s['step']:>4} {s['loss']:6.3f} {s['pref_loss']:5.3f} {s['reg_loss']:6.3f} "
                      f"{s['seq_weight']:4.2f} {s['reg_share']:5.2f} {s['grad_norm'] or 0:6.2f} {s['neg_delta']:7.3f} "
                      f"{s['pos_delta']:7.3f} {s['neg_logp_p05']:7.2f} {s['chosen_delta']:7.3f} "
                      f"{s['rejected_delta']:7.3f} {s['param_drift']:6.3f}", flush=True)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m treg.toy.divergence", description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="1,3")
    p.add_argument("--lrs", default="5e-5,1e-4")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--method", default="dpo_reg", help="a treg demo method (default dpo_reg)")
    p.add_argument("--probe-pairs", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    res = run([int(s) for s in a.seeds.split(",")], [float(v) for v in a.lrs.split(",")], a.alpha,
              a.probe_pairs, a.threads, a.method)
    if a.out:
        from treg.io.fsutil import atomic_write_text
        atomic_write_text(a.out, json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
