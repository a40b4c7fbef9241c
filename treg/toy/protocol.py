"""Tuning protocols of ``treg demo`` (``--protocol``) and the paired statistics of the report.

``shared`` (the default, the demo's original behaviour): with one ``--lrs`` x ``--alphas`` point every
method trains with it; with several, each method picks its point on the tuning prompts with seed-0
data and training (one tuning split) — :func:`treg.toy.demo.tune`.

``tuned`` (the fair protocol, docs/results.md "Tuned protocol"):

- **equal grids**: every method gets ``len(lrs) * len(alphas)`` grid points. Regularized methods get
  ``lrs x alphas``; unregularized ones (alpha has no effect) get as many learning rates instead, spaced
  geometrically over ``[min(lrs), max(lrs)]`` (:func:`padded_lrs`), so no method gets more draws to
  pick from;
- **tuning seeds** ``TUNE_SEED_OFFSET + k`` for ``k < tune_seeds`` (data seed = training seed, as for
  test seeds), each with its own training prompts and its own ``tune_prompts`` tuning-evaluation
  prompts (disjoint from each other and from the held-out test prompts), sampled with its own seed;
- **pick rule** (``--pick``, :data:`PICK_RULES`): ``mean`` (default) of the tuning rewards over the
  tuning seeds, or ``mean-minus-std`` (mean - one sample std); the same rule for every method; ties go
  to the first grid point (lowest lr, then lowest alpha);
- the picks are trained and evaluated on the test seeds ``0 .. seeds-1`` exactly as in ``shared``.

:func:`paired_vs` gives each method's difference to DPO paired by test seed and prompt with a
bootstrap 95% interval (:func:`paired_bootstrap`).
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np

TUNE_SEED_OFFSET = 1000  # tuning seeds are 1000, 1001, ...; test seeds 0 .. seeds-1 (< 1000: checked)
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0


def _mean(rewards) -> float:
    return float(np.mean(rewards))


def _mean_minus_std(rewards) -> float:
    v = np.asarray(rewards, dtype=np.float64)
    return float(v.mean() - (v.std(ddof=1) if v.size > 1 else 0.0))


# --pick: score of a grid point from its per-tuning-seed rewards; the highest score is picked
PICK_RULES: dict[str, Callable] = {"mean": _mean, "mean-minus-std": _mean_minus_std}


def padded_lrs(lrs: list[float], n: int) -> list[float]:
    """``n`` learning rates for a method without alpha: geometric over [min, max] of ``lrs`` (or
    ``lrs`` itself when it already has ``n``); with one lr, geometric over [lr/2, 2 lr]."""
    lrs = sorted(lrs)
    if len(lrs) == n:
        return lrs
    lo, hi = (lrs[0], lrs[-1]) if len(lrs) > 1 else (lrs[0] / 2, lrs[0] * 2)
    if n == 1:
        return [float(math.sqrt(lo * hi))]
    return [float(v) for v in np.geomspace(lo, hi, n)]


def grid_for(regularized: bool, lrs: list[float], alphas: list[float]) -> list[tuple[float, float]]:
    """The (lr, alpha) grid of one method under ``tuned``: always ``len(lrs) * len(alphas)`` points."""
    if regularized:
        return [(float(lr), float(a)) for lr in sorted(lrs) for a in sorted(alphas)]
    return [(lr, 0.0) for lr in padded_lrs(lrs, len(lrs) * len(alphas))]


def pick(trials: list[dict], rule: str) -> dict:
    """The trial with the highest ``PICK_RULES[rule](trial["rewards"])`` (first one on ties); each trial
    gets its ``score``."""
    for t in trials:
        t["score"] = PICK_RULES[rule](t["rewards"])
    best = trials[0]
    for t in trials[1:]:
        if t["score"] > best["score"]:
            best = t
    return best


def paired_bootstrap(diffs, *, n_boot: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> dict:
    """Mean of a [seeds, prompts] array of paired differences and its percentile bootstrap 95% interval.

    Each bootstrap sample draws seeds and prompts with replacement, independently (crossed design:
    every seed was evaluated on the same prompts), and takes the mean of the selected cells.
    """
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 2 or d.size == 0:
        raise ValueError("paired differences must be a non-empty [seeds, prompts] array")
    rng = np.random.default_rng(seed)
    n_s, n_p = d.shape
    means = np.empty(n_boot)
    for b in range(n_boot):
        rows = rng.integers(0, n_s, n_s)
        cols = rng.integers(0, n_p, n_p)
        means[b] = d[np.ix_(rows, cols)].mean()
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": float(d.mean()), "ci95": [float(lo), float(hi)], "n_seeds": n_s, "n_prompts": n_p,
            "per_seed": [float(v) for v in d.mean(axis=1)], "seeds_better": int((d.mean(axis=1) > 0).sum()),
            "bootstrap": {"samples": n_boot, "seed": seed, "resample": "seeds x prompts"}}


def per_prompt_rewards(records: list[dict]) -> dict[str, float]:
    """Mean verifier reward per prompt_id (over that prompt's samples)."""
    acc: dict[str, list[float]] = {}
    for r in records:
        acc.setdefault(r["prompt_id"], []).append(r["reward"])
    return {k: float(np.mean(v)) for k, v in acc.items()}


def paired_vs(per_method: dict[str, dict[int, list[dict]]], baseline: str = "dpo") -> dict:
    """``{method: paired_bootstrap(method - baseline)}`` over the seeds and prompts both have."""
    if baseline not in per_method:
        return {}
    base = per_method[baseline]
    out = {}
    for name, seeds in per_method.items():
        if name == baseline:
            continue
        common = sorted(set(seeds) & set(base))
        if not common:
            continue
        rows = []
        for s in common:
            a, b = per_prompt_rewards(seeds[s]), per_prompt_rewards(base[s])
            prompts = sorted(set(a) & set(b))
            rows.append([a[p] - b[p] for p in prompts])
        if len({len(r) for r in rows}) != 1:
            raise RuntimeError(f"{name}: seeds were evaluated on different prompts")
        out[name] = {"baseline": baseline, "seeds": common, **paired_bootstrap(rows)}
    return out


def tune_all(cfg, methods: list[str], ref, tok, eval_queries: set[str], workdir: str, log) -> tuple[dict, dict]:
    """Run every method's grid on every tuning seed; returns (chosen, protocol record).

    ``chosen`` is ``{method: {"lr", "alpha", "score", "trials"}}`` for :func:`treg.toy.demo._run`; the
    record holds the seeds, grids, per-seed tuning rewards and picks (results.json ``protocol``).
    """
    from treg.toy import demo, pipeline
    from treg.io.schema import IDS, REWARD_COLUMNS
    from treg.method.token_rewards import DPO_IMPLICIT, TOKEN_REWARD_SOURCES

    def needs_policy(m):  # the method's token rewards come from the trained DPO policy
        return bool(demo.METHODS[m]["reg"]) and TOKEN_REWARD_SOURCES[demo.METHODS[m]["reg"]].needs_model
    tune_seeds = [TUNE_SEED_OFFSET + k for k in range(cfg.tune_seeds)]
    seen = set(eval_queries)
    tune_rows = {}
    for s in tune_seeds:  # each tuning seed's own tuning-evaluation prompts, disjoint from all others
        tune_rows[s] = pipeline.prompts(cfg.tune_prompts, cfg.eval_seed + 1 + s, exclude=seen, prefix=f"tune{s}-")
        seen |= {pipeline.query_of(r["prompt"]) for r in tune_rows[s]}
    eval_queries |= seen  # training prompts of every seed avoid them too
    data = {}
    for s in tune_seeds:
        t0 = time.time()
        data[s], stats = demo.prepare_data(cfg, s, ref, tok, eval_queries)
        log(f"tuning seed {s}: {stats['pairs_kept']} pairs ({time.time() - t0:.0f} s)")
    needs_dpo_policy = any(needs_policy(m) for m in methods)
    dpo_rewards: dict[tuple, object] = {}  # (seed, lr, alpha) -> DPO-implicit rewards of that DPO run
    chosen, grids, tuning = {}, {}, {}
    order = [demo.DPO_REWARD_POLICY] + [m for m in methods if m != demo.DPO_REWARD_POLICY]
    for name in order:
        spec = demo.METHODS[name]
        grids[name] = grid_for(spec["reg"] is not None, cfg.lrs, cfg.alphas)
        trials = []
        for lr, alpha in grids[name]:
            rewards = []
            for s in tune_seeds:
                policy_rewards = None
                if needs_policy(name):
                    d = chosen[demo.DPO_REWARD_POLICY]
                    policy_rewards = dpo_rewards[(s, d["lr"], d["alpha"])]
                ds = demo._with_rewards(data[s], spec["reg"], policy_rewards)
                model, _ = demo.train_policy(cfg, name, ds, lr=lr, alpha=alpha, seed=s, workdir=workdir)
                recs = pipeline.evaluate(model, tok, tune_rows[s], n=1, seed=cfg.eval_seed + 1 + s)
                rewards.append(pipeline.summarize(recs)["reward"])
                if name == demo.DPO_REWARD_POLICY and needs_dpo_policy:
                    ann = pipeline.annotate_pairs(ref, tok, [demo._pair_row(r) for r in data[s]],
                                                  source=DPO_IMPLICIT, dpo_model=model, beta=cfg.beta)
                    if ann[IDS["chosen"]] != data[s][IDS["chosen"]]:
                        raise RuntimeError("DPO re-annotation does not align with the training pairs")
                    dpo_rewards[(s, lr, alpha)] = ann.select_columns(REWARD_COLUMNS)
                del model
            trials.append({"lr": lr, "alpha": alpha, "rewards": rewards})
            log(f"  tune {name}: lr {lr:g} alpha {alpha:g} -> "
                + " / ".join(f"{r:.3f}" for r in rewards))
        best = pick(trials, cfg.pick)
        chosen[name] = {"lr": best["lr"], "alpha": best["alpha"], "score": best["score"], "trials": trials}
        tuning[name] = trials
        log(f"  picked {name}: lr {best['lr']:g} alpha {best['alpha']:g} ({cfg.pick} {best['score']:.4f})")
    record = {"name": "tuned", "pick_rule": cfg.pick, "tune_seeds": tune_seeds,
              "test_seeds": list(range(cfg.seeds)), "grid_size": {m: len(g) for m, g in grids.items()},
              "grid": {m: [list(p) for p in g] for m, g in grids.items()}, "tuning": tuning,
              "picks": {m: {k: v for k, v in c.items() if k != "trials"} for m, c in chosen.items()},
              "tune_prompts": {str(s): [pipeline.query_of(r["prompt"]) for r in rows]
                               for s, rows in tune_rows.items()}}
    return chosen, record


def shared_tuning(cfg, methods, ref, tok, eval_queries, workdir, log) -> tuple[dict, dict | None]:
    """``shared``: nothing before the seed loop (treg.toy.demo.tune picks on seed 0 when the grid has
    more than one point)."""
    return {}, None


# --protocol: what runs before the test seeds; returns (chosen hyperparameters, protocol record)
PROTOCOLS: dict[str, Callable] = {"shared": shared_tuning, "tuned": tune_all}
