"""``treg demo``: the whole method on the embedded toy world, with a report.

Per data seed ``s``: sample 5 responses per training prompt from the toy checkpoint (plain prompt),
score them with the toy's *proxy* reward, pair best/worst, annotate token rewards by contrastive
prompting (treg.stages.annotate), then train every method from the same checkpoint with the same budget
through :class:`treg.stages.trainer.TRegTrainer` (training seed ``s``), and evaluate each trained policy
on held-out prompts with the *exact* verifier (the same prompts and sampling seeds for every
method and seed: common random numbers).

Methods (METHOD.md §3-§5; ``alpha``/``weighting``/token-reward source per method):

===================== ====== ========= ========== ==========================================
name                  loss   alpha     weighting  token rewards
===================== ====== ========= ========== ==========================================
dpo                   dpo    0         -          -
dpo_reg               dpo    alpha     sequence   contrastive (reference model, toy template)
dpo_reg_static        dpo    alpha     static     contrastive
dpo_sft               dpo    alpha     static     +0.5 chosen / 0 rejected (sft-chosen)
dpo_reg_dpo_reward    dpo    alpha     sequence   sigmoid(beta (log pi_dpo - log pi_ref)) - 0.5
simpo                 simpo  0         -          -
simpo_reg             simpo  alpha     sequence   contrastive
===================== ====== ========= ========== ==========================================

Everything the report shows is recomputed from files under ``out`` (see :mod:`treg.toy.report`):
``eval/<method>/seed<s>.jsonl`` (every judged sample), ``tokens/seed<s>.jsonl`` (token rewards and
ground-truth labels of the training pairs), ``curves/<method>/seed<s>.json`` (training logs).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from treg.errors import TregError
from treg.io.fsutil import atomic_write_text
from treg.io.schema import IDS, REWARD_COLUMNS, REWARDS, SIDES, TEXT
from treg.method.token_rewards import CONTRASTIVE, DPO_IMPLICIT, DPO_SFT, TOKEN_REWARD_SOURCES

BASE = ("dpo", "dpo_reg")
ABLATIONS = ("dpo_reg_static", "dpo_sft", "dpo_reg_dpo_reward", "simpo", "simpo_reg")
METHODS = {
    "dpo": {"method": "dpo", "reg": None, "weighting": "sequence"},
    "dpo_reg": {"method": "dpo", "reg": CONTRASTIVE, "weighting": "sequence"},
    "dpo_reg_static": {"method": "dpo", "reg": CONTRASTIVE, "weighting": "static"},
    "dpo_sft": {"method": "dpo", "reg": DPO_SFT, "weighting": "static"},
    "dpo_reg_dpo_reward": {"method": "dpo", "reg": DPO_IMPLICIT, "weighting": "sequence"},
    "simpo": {"method": "simpo", "reg": None, "weighting": "sequence"},
    "simpo_reg": {"method": "simpo", "reg": CONTRASTIVE, "weighting": "sequence"},
}
ANNOTATED_SOURCE = CONTRASTIVE  # the source prepare_data annotates with; others are derived per method
DPO_REWARD_POLICY = "dpo"  # the demo method whose trained policy gives the DPO_IMPLICIT token rewards
# beta / gamma per pairwise loss of PREFERENCE_LOSSES that the demo trains (from DemoConfig)
LOSS_HYPERPARAMETERS = {
    "dpo": lambda cfg: {"beta": cfg.beta, "gamma": 0.0},
    "simpo": lambda cfg: {"beta": cfg.simpo_beta, "gamma": cfg.simpo_gamma},
}


@dataclass
class DemoConfig:
    """Every setting of a demo run (recorded in results.json ``config``)."""

    out: str = "runs/demo"
    seeds: int = 5
    ablations: bool = False
    train_prompts: int = 500
    eval_prompts: int = 300
    eval_samples: int = 2
    n_samples: int = 5
    temperature: float = 1.0
    steps: int = 100
    batch_size: int = 16
    lrs: list[float] = field(default_factory=lambda: [5e-5])
    alphas: list[float] = field(default_factory=lambda: [0.5])
    beta: float = 0.1
    simpo_beta: float = 2.0
    simpo_gamma: float = 1.0
    tune_prompts: int = 200
    model: str | None = None
    eval_seed: int = 999_983
    threads: int | None = None
    quiet: bool = False
    protocol: str = "shared"
    tune_seeds: int = 3
    pick: str = "mean"

    def methods(self) -> list[str]:
        return list(BASE + ABLATIONS) if self.ablations else list(BASE)

    def check(self) -> None:
        for name in ("seeds", "train_prompts", "eval_prompts", "eval_samples", "steps", "batch_size",
                     "tune_prompts"):
            if getattr(self, name) < 1:
                raise TregError("must be >= 1", field=f"--{name.replace('_', '-')}")
        from treg.toy.protocol import PICK_RULES, PROTOCOLS, TUNE_SEED_OFFSET
        if self.protocol not in PROTOCOLS:
            raise TregError(f"unknown protocol (choose from {', '.join(PROTOCOLS)})", field="--protocol")
        if self.pick not in PICK_RULES:
            raise TregError(f"unknown pick rule (choose from {', '.join(PICK_RULES)})", field="--pick")
        if self.tune_seeds < 1:
            raise TregError("must be >= 1", field="--tune-seeds")
        if self.seeds > TUNE_SEED_OFFSET:
            raise TregError(f"at most {TUNE_SEED_OFFSET} test seeds (tuning seeds start there)", field="--seeds")
        if self.n_samples < 2:
            raise TregError("at least 2 samples per prompt are needed for a pair", field="--n-samples")
        if not self.lrs or any(v <= 0 for v in self.lrs):
            raise TregError("learning rates must be > 0", field="--lrs")
        if not self.alphas or any(v < 0 for v in self.alphas):
            raise TregError("alphas must be >= 0", field="--alphas")


def _log(cfg: DemoConfig, msg: str) -> None:
    if not cfg.quiet:
        print(msg, flush=True)


def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, default=float))


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, default=float) + "\n" for row in rows))


def _load(path: str):
    from treg.toy import load
    return load(path)


def train_policy(cfg: DemoConfig, name: str, dataset, *, lr: float, alpha: float, seed: int, workdir: str,
                 callbacks: list | None = None):
    """Train one method from the checkpoint through TRegTrainer; returns (model, log_history)."""
    from treg.stages.config import TRegConfig
    from treg.stages.trainer import TRegTrainer
    spec = METHODS[name]
    args = TRegConfig(
        output_dir=workdir, method=spec["method"], weighting=spec["weighting"],
        alpha=alpha if spec["reg"] else 0.0, **LOSS_HYPERPARAMETERS[spec["method"]](cfg),
        learning_rate=lr, max_steps=cfg.steps, per_device_train_batch_size=cfg.batch_size,
        lr_scheduler_type="cosine", warmup_steps=max(1, cfg.steps // 10), logging_steps=max(1, cfg.steps // 20),
        save_strategy="no", report_to="none", disable_tqdm=True, seed=seed, data_seed=seed,
        use_cpu=True, max_length=128, dataloader_num_workers=0, logging_strategy="steps")
    model, tok = _load(cfg.model)
    trainer = TRegTrainer(model, args=args, train_dataset=dataset, processing_class=tok, callbacks=callbacks)
    from transformers import PrinterCallback
    trainer.remove_callback(PrinterCallback)  # logs stay in memory (trainer.state.log_history)
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    return trainer.model.eval(), history


def _with_rewards(dataset, source: str | None, dpo_rewards=None):
    """The annotated dataset with the token-reward columns a method's regularizer uses: the annotated
    (contrastive) ones, ones that follow from the data alone (DPO-SFT), or the trained DPO policy's."""
    if source is None or source == ANNOTATED_SOURCE:
        return dataset
    spec = TOKEN_REWARD_SOURCES[source]
    if not spec.needs_model:  # e.g. sft-chosen: a rule of the data alone (METHOD.md §5)
        return dataset.map(lambda r: {REWARDS[side]: spec.rewards({}, side, 0.0, len(r[IDS[side]])).tolist()
                                      for side in SIDES})
    cols = tuple(REWARD_COLUMNS)
    return dataset.remove_columns(list(cols)).add_column(cols[0], dpo_rewards[cols[0]]) \
        .add_column(cols[1], dpo_rewards[cols[1]])


def prepare_data(cfg: DemoConfig, seed: int, ref, tok, eval_queries: set[str]):
    """Sample -> proxy-score -> pair -> annotate for data seed ``seed``; returns (dataset, pair stats)."""
    from treg.toy import pipeline
    rows = pipeline.prompts(cfg.train_prompts, 10_000 + seed, exclude=eval_queries, prefix=f"s{seed}-")
    responses = pipeline.sample_responses(ref, tok, rows, n=cfg.n_samples, seed=seed,
                                          temperature=cfg.temperature)
    pairs, stats = pipeline.make_pairs(rows, responses, reward_seed=seed)
    if not pairs:
        raise TregError("every sampled group tied under the proxy reward: no preference pairs")
    dataset = pipeline.annotate_pairs(ref, tok, pairs)
    return dataset, stats


def token_records(dataset, dpo_dataset) -> list[dict]:
    """Per training pair: texts, contrastive and DPO-implicit token rewards (for AUROC and heat maps)."""
    out = []
    for i, row in enumerate(dataset):
        rec = {"query": row[TEXT["prompt"]], "chosen": row[TEXT["chosen"]], "rejected": row[TEXT["rejected"]],
               "chosen_ids": row[IDS["chosen"]], "rejected_ids": row[IDS["rejected"]]}
        for side in SIDES:
            rec[f"{side}_contrastive"] = row[REWARDS[side]]
            if dpo_dataset is not None:
                rec[f"{side}_dpo"] = dpo_dataset[i][REWARDS[side]]
        out.append(rec)
    return out


def tune(cfg: DemoConfig, name: str, dataset, dpo_rewards, ref_tok, tune_rows, workdir) -> tuple[float, float, list]:
    """Pick (lr, alpha) for ``name`` by the exact verifier's mean reward on separate tuning prompts."""
    from treg.toy import pipeline
    alphas = cfg.alphas if METHODS[name]["reg"] else [0.0]
    grid = [(lr, a) for lr in cfg.lrs for a in alphas]
    if len(grid) == 1:
        return grid[0][0], grid[0][1], []
    trials = []
    for lr, a in grid:
        model, _ = train_policy(cfg, name, _with_rewards(dataset, METHODS[name]["reg"], dpo_rewards),
                                lr=lr, alpha=a, seed=0, workdir=workdir)
        score = pipeline.summarize(pipeline.evaluate(model, ref_tok, tune_rows, n=1,
                                                     seed=cfg.eval_seed + 1))["reward"]
        trials.append({"lr": lr, "alpha": a, "tune_reward": score})
        _log(cfg, f"  tune {name}: lr {lr:g} alpha {a:g} -> reward {score:.4f}")
    best = max(trials, key=lambda t: t["tune_reward"])
    return best["lr"], best["alpha"], trials


def run_demo(cfg: DemoConfig) -> dict:
    """Run the demo; writes the per-seed files, results.json, report.md and report.html under ``cfg.out``."""
    import torch
    from treg.toy import checkpoint_path
    cfg.check()
    _quiet_libraries()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg.model = cfg.model or checkpoint_path()
    t0 = time.time()
    ref, tok = _load(cfg.model)
    final = Path(cfg.out)
    try:
        final.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TregError(f"cannot create the output directory ({err.strerror})", file=str(final)) from None
    out = Path(tempfile.mkdtemp(dir=final, prefix=".staging-"))  # nothing half-written in cfg.out
    workdir = tempfile.mkdtemp(prefix="treg-demo-")
    try:
        results = _run(cfg, ref, tok, out, t0, workdir)
        _publish(out, final)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    return results


def _run(cfg: DemoConfig, ref, tok, out: Path, t0: float, workdir: str) -> dict:
    """The body of :func:`run_demo`, writing into the staging directory ``out``."""
    from treg.toy import report
    from treg.toy import pipeline
    eval_rows = pipeline.prompts(cfg.eval_prompts, cfg.eval_seed, prefix="eval-")
    eval_queries = {pipeline.query_of(r["prompt"]) for r in eval_rows}
    tune_rows = pipeline.prompts(cfg.tune_prompts, cfg.eval_seed + 1, exclude=eval_queries, prefix="tune-")
    eval_queries |= {pipeline.query_of(r["prompt"]) for r in tune_rows}
    _log(cfg, f"treg demo: {cfg.seeds} seed(s), methods {', '.join(cfg.methods())}, model {cfg.model}")
    ref_records = pipeline.evaluate(ref, tok, eval_rows, n=cfg.eval_samples, seed=cfg.eval_seed)
    _write_jsonl(out / "eval" / "reference" / "seed0.jsonl", ref_records)
    from treg.toy.protocol import PROTOCOLS
    chosen, protocol = PROTOCOLS[cfg.protocol](cfg, cfg.methods(), ref, tok, eval_queries, workdir,
                                               lambda msg: _log(cfg, msg))
    pair_stats = []
    for seed in range(cfg.seeds):
        ts = time.time()
        dataset, stats = prepare_data(cfg, seed, ref, tok, eval_queries)
        pair_stats.append(stats)
        _log(cfg, f"seed {seed}: {stats['pairs_kept']} pairs from {stats['prompts']} prompts "
                  f"({time.time() - ts:.0f} s)")
        dpo_rewards = None
        for name in [DPO_REWARD_POLICY] + [m for m in cfg.methods() if m != DPO_REWARD_POLICY]:
            if name not in chosen:
                lr, alpha, trials = tune(cfg, name, dataset, dpo_rewards, tok, tune_rows, workdir)
                chosen[name] = {"lr": lr, "alpha": alpha, "trials": trials}
            lr, alpha = chosen[name]["lr"], chosen[name]["alpha"]
            data = _with_rewards(dataset, METHODS[name]["reg"], dpo_rewards)
            model, history = train_policy(cfg, name, data, lr=lr, alpha=alpha, seed=seed, workdir=workdir)
            records = pipeline.evaluate(model, tok, eval_rows, n=cfg.eval_samples, seed=cfg.eval_seed)
            _write_jsonl(out / "eval" / name / f"seed{seed}.jsonl", records)
            _write_json(out / "curves" / name / f"seed{seed}.json", history)
            s = pipeline.summarize(records)
            _log(cfg, f"  {name:<20} reward {s['reward']:.4f}  exact {s['exact_match']:.3f}  "
                      f"length {s['length']:.2f}")
            if name == DPO_REWARD_POLICY:  # DPO-implicit token rewards of the trained DPO policy (METHOD.md §5)
                dpo_ann = pipeline.annotate_pairs(ref, tok, [_pair_row(r) for r in dataset],
                                                  source=DPO_IMPLICIT, dpo_model=model, beta=cfg.beta)
                if dpo_ann[IDS["chosen"]] != dataset[IDS["chosen"]]:
                    raise RuntimeError("DPO re-annotation does not align with the training pairs")
                _write_jsonl(out / "tokens" / f"seed{seed}.jsonl", token_records(dataset, dpo_ann))
                dpo_rewards = dpo_ann.select_columns(REWARD_COLUMNS)
            del model
    config = {**dataclasses.asdict(cfg), "methods": cfg.methods(),
              "chosen_hyperparameters": chosen, "pair_stats": pair_stats}
    results = report.build_results(out, config=config, wall_seconds=time.time() - t0, protocol=protocol)
    report.write_reports(out, results)
    return results


OUTPUTS = ("eval", "tokens", "curves", "results.json", "report.md", "report.html")


def _publish(staging: Path, final: Path) -> None:
    """Move a finished run's outputs into ``final``, replacing (only) a previous run's outputs there."""
    for name in OUTPUTS:
        target = final / name
        if target.is_dir():
            shutil.rmtree(target)
        if (staging / name).exists():
            os.replace(staging / name, target)


def _quiet_libraries() -> None:
    """No per-step prints or progress bars from transformers / datasets during the demo."""
    import datasets
    import transformers
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _pair_row(row: dict) -> dict:
    """A TRL conversational preference row rebuilt from an annotated row (for re-annotation)."""
    return {"prompt": [{"role": "user", "content": row[TEXT["prompt"]]}],
            "chosen": [{"role": "assistant", "content": row[TEXT["chosen"]]}],
            "rejected": [{"role": "assistant", "content": row[TEXT["rejected"]]}]}
