"""The trainer's reference pass: reference log-probs (and token rewards) computed once, cached, resumable.

``add_reference(trainer, dataset, name)`` gives ``dataset`` what training needs and the data lacks:

* ``ref_{chosen,rejected}_logps`` / ``ref_*_token_logps`` (METHOD.md §3) when the method needs a reference and
  ``precompute_ref_log_probs`` is on (or stored values were invalidated by truncation: null rows, see
  :func:`treg.io.data.exact_reference`; only those rows are recomputed), scored on the sequences the
  collator will build (``max_length`` / ``truncation_mode`` applied);
* ``{chosen,rejected}_token_rewards`` when ``alpha > 0`` and the data has none: the contrastive source with
  the default template (:data:`treg.method.token_rewards.TOKEN_REWARD_SOURCES`, annotate's engine
  :func:`treg.method.seqscore.score_sequences`), in the same pass as the reference log-probs. The contexts
  come from the texts (``prompt_text``/``chosen_text``/``rejected_text``, or TRL's ``prompt``/``chosen``/
  ``rejected``); the responses are the dataset's token ids.

The model is the initial policy (PEFT: adapters disabled; a frozen copy when the trainer holds one).

**Cache.** Results go to ``ref_cache_dir`` (default ``output_dir/ref_cache``) under ``<name>-<fingerprint>``,
written in shards of :data:`SHARD_ROWS` pairs through :class:`treg.io.shards.ShardedWriter` (each shard
atomic): a killed run resumes from the finished shards, and a finished cache is re-used by the next run with
no model forward at all. The fingerprint (:mod:`treg.stages.refcache`) covers the model (weights content up
to 2 GiB, else name + revision + file fingerprint), the data (token ids, texts when rewards are computed, rows),
the tokenizer, ``max_length``, ``truncation_mode``, mixed precision and the reward source/template; a cache
made for other settings is never used (a warning names what changed).

**Sharded models.** Under DeepSpeed ZeRO-3 (an inference engine over the partitioned weights, as TRL does)
and FSDP2 (``fully_shard``: DTensor parameters) every forward is collective. Processes then step in
lockstep: before each real forward all processes vote; one that has finished its shards runs a dummy
one-row forward for every real forward still running elsewhere (TRL #6403 pads the last batch the same
way), so every process makes the same number of forward calls (:mod:`treg.stages.sharded`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import numpy as np
import torch

from treg.errors import TregError
from treg.io.data import response_window, truncate_sequence
from treg.io.meta import META_FILE, stable_hash, tokenizer_fingerprint
from treg.io.schema import IDS, PROMPT, REF_SUM, REF_TOK, REWARDS, SIDES, TEXT
from treg.method.losses import PREFERENCE_LOSSES, needs_token_rewards
from treg.method.token_rewards import CONTRASTIVE, PLAIN_REF
from treg.stages import refcache
from treg.stages.sharded import Lockstep, deepspeed_engine, is_sharded

logger = logging.getLogger(__name__)

SHARD_ROWS = 256                    # pairs per cache shard: a killed run loses at most one shard per process
SHARDED_BATCH_TOKENS = 4096        # token budget per forward when the weights are sharded (full-logits path)
CACHE_VERSION = 1
REWARD_SOURCE, REWARD_TEMPLATE = CONTRASTIVE, "revision"   # in-trainer token rewards (annotate's defaults)
INDEX = "index"


# ------------------------------------------------------------------------------------------ what is needed
def wanted(args, dataset) -> tuple[list[int] | None, bool]:
    """``(ref_rows, rewards)``: rows whose reference values must be computed (None: none) and whether token
    rewards must be computed (for every row)."""
    cols = dataset.column_names
    ref_rows = None
    if PREFERENCE_LOSSES[args.method].needs_ref:
        if not all(REF_SUM[s] in cols for s in SIDES):
            if args.precompute_ref_log_probs:
                ref_rows = list(range(len(dataset)))
        else:
            null = np.zeros(len(dataset), dtype=bool)
            for column in (*REF_SUM.values(), *REF_TOK.values()):
                if column in cols:
                    null |= dataset.with_format("arrow")[:][column].is_null().to_numpy(zero_copy_only=False)
            ref_rows = np.flatnonzero(null).tolist() or None
    rewards = needs_token_rewards(args.alpha) and not all(REWARDS[s] in cols for s in SIDES)
    return ref_rows, rewards


def reward_texts(dataset, *, field: str = REWARDS["chosen"]) -> list[tuple[str, str, str]]:
    """(query, chosen draft, rejected draft) per row for the contrastive contexts, from treg's text columns or
    TRL's prompt/chosen/rejected columns; a one-line TregError when the dataset has neither."""
    cols = dataset.column_names
    if all(TEXT[k] in cols for k in ("prompt", *SIDES)):
        return list(zip(dataset[TEXT["prompt"]], dataset[TEXT["chosen"]], dataset[TEXT["rejected"]]))
    if {"chosen", "rejected"} <= set(cols):
        from treg.io.chat import messages_to_text, preference_rows
        keys = [k for k in ("prompt", "chosen", "rejected") if k in cols]
        rows = preference_rows([{k: r[k] for k in keys} for r in dataset.select_columns(keys)], label="train_dataset")
        return [(messages_to_text(r.prompt), r.chosen, r.rejected) for r in rows]
    raise TregError("alpha > 0 needs token rewards: the dataset has no token-reward columns and no texts to compute "
                    f"them from ({TEXT['prompt']}/{TEXT['chosen']}/{TEXT['rejected']} or prompt/chosen/rejected); "
                    "run 'treg annotate' or set alpha 0", field=field)


def _reference_model(trainer):
    """(module to call, context that makes it the reference, unwrapped model)."""
    if trainer.ref_model is not None:
        return trainer.ref_model, contextlib.nullcontext(), trainer.accelerator.unwrap_model(trainer.ref_model)
    model = trainer.accelerator.unwrap_model(trainer.model)
    context = trainer._reference_context(model)
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if trainer.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3:
        engine = getattr(trainer, "_treg_reference_engine", None)
        if engine is None:
            engine = trainer._treg_reference_engine = deepspeed_engine(model, trainer.accelerator)
        return engine, context, model
    return model, context, model


# ------------------------------------------------------------------------------------------ the pass
def add_reference(trainer, dataset, name: str):
    """``dataset`` with the missing reference / token-reward values filled in (module docstring)."""
    args = trainer.args
    ref_rows, rewards = wanted(args, dataset)
    if ref_rows is None and not rewards:
        return dataset
    if trainer.state.global_step > 0 and trainer.ref_model is None and not _is_peft(trainer):
        raise TregError(f"the {name} dataset has no reference log-probs (or token rewards) and the policy has "
                        "already been trained; pass it before training or add the columns ('treg annotate')",
                        field="precompute_ref_log_probs")
    texts = reward_texts(dataset) if rewards else None
    tokenizer = trainer.processing_class
    acc = trainer.accelerator
    call, context, model = _reference_model(trainer)
    data_cols = [PROMPT, *IDS.values()]
    settings = {
        "cache_version": CACHE_VERSION, "dataset": name, "num_rows": len(dataset),
        "model": refcache.model_fingerprint(model), "tokenizer": tokenizer_fingerprint(tokenizer),
        "data": refcache.data_fingerprint(dataset, data_cols),
        "max_length": args.max_length, "truncation_mode": args.truncation_mode,
        "mixed_precision": str(acc.mixed_precision), "shard_rows": SHARD_ROWS,
        "ref_rows": None if ref_rows is None else stable_hash(ref_rows),
        "rewards": None if not rewards else {"source": REWARD_SOURCE, "texts": stable_hash(texts), **_reward_cfg(
            tokenizer).settings()},
    }
    if acc.num_processes > 1:  # rank 0's fingerprint for all (content hashes of sharded weights differ)
        from accelerate.utils import broadcast_object_list
        box = [settings]
        broadcast_object_list(box, from_process=0)
        settings = box[0]
    root = Path(getattr(args, "ref_cache_dir", None) or Path(args.output_dir) / "ref_cache")
    out = root / f"{name}-{stable_hash(settings)}"
    t0 = time.perf_counter()
    stats = _compute(trainer, dataset, name, out, settings, ref_rows, texts, call, context, model)
    cached = refcache.load(out)
    dataset = refcache.merge(dataset, cached, ref_rows, rewards)
    stats.update(seconds=round(time.perf_counter() - t0, 3), cache=str(out))
    info = getattr(trainer, "reference_info", None)
    if info is None:
        info = trainer.reference_info = {}
    info[name] = stats
    return dataset


def _is_peft(trainer) -> bool:
    from treg.stages.trainer import is_peft_model
    return is_peft_model(trainer.accelerator.unwrap_model(trainer.model))


def _reward_cfg(tokenizer):
    from treg.stages.annotate import make_config
    return make_config(template=REWARD_TEMPLATE, source=REWARD_SOURCE, beta=0.1, max_length=None,
                       batch_tokens=1, use_chat_template=bool(getattr(tokenizer, "chat_template", None)),
                       dpo_model=None)


def _compute(trainer, dataset, name, out, settings, ref_rows, texts, call, context, model) -> dict:
    """Run the pending shards of this process (lockstep when sharded) and finalize; returns stats."""
    import datasets
    from treg.io.shards import ShardedWriter
    from treg.method.seqscore import Progress
    from treg.stages.annotate import default_batch_tokens, rate_text
    from treg import progress as progress_mod
    from treg.io.loading import pad_token_id
    acc, args = trainer.accelerator, trainer.args
    f32 = datasets.Sequence(datasets.Value("float32"))
    features = datasets.Features({INDEX: datasets.Value("int64"),
                                  **{REF_SUM[s]: datasets.Value("float64") for s in SIDES},
                                  **{REF_TOK[s]: f32 for s in SIDES}, **{REWARDS[s]: f32 for s in SIDES}})
    if acc.is_main_process and not (out / META_FILE).exists():
        refcache.warn_other_caches(out, settings)
    writer = ShardedWriter.for_rows(out, list(range(len(dataset))), shard_size=SHARD_ROWS, settings=settings,
                                    state=acc, features=features)
    todo = writer.pending_shards()
    stats = {"computed_rows": 0, "sequences": 0, "tokens": 0, "forwards": 0, "dummy_forwards": 0,
             "reused": writer.complete, "resumed_shards": len(writer.done_shards()) if todo else 0}
    sharded = is_sharded(call) or is_sharded(model)
    lockstep_needed = sharded and acc.num_processes > 1
    if not todo and not lockstep_needed:
        with refcache.quiet_datasets():
            writer.finalize({"stage": "reference", "settings": settings})
        if stats["reused"]:
            logger.info("reference pass (%s): re-used the cache %s", name, out)
        return stats
    pad_id = pad_token_id(trainer.processing_class)
    device = next(p for p in call.parameters()).device if not sharded else acc.device
    if device.type == "meta":
        raise TregError("the model's weights are on the meta device in this process (FSDP "
                        "cpu_ram_efficient_loading?): set fsdp_cpu_ram_efficient_loading false, or store reference "
                        "log-probs in the data ('treg annotate')", field="precompute_ref_log_probs")
    moved = None
    if not sharded and device != acc.device and device.type == "cpu":
        moved, device = device, acc.device        # FSDP before `train`: the full model, placed for the pass
        call.to(device)
    longest = max(1, int(max(len(p) + max(len(c), len(r)) for p, c, r in zip(
        dataset[PROMPT], dataset[IDS["chosen"]], dataset[IDS["rejected"]]))))
    batch_tokens = (args.precompute_ref_batch_size * 2 * min(longest, args.max_length or longest)
                    if args.precompute_ref_batch_size else default_batch_tokens(device))
    if sharded:  # the head is sharded too: full (B, T, V) logits, so smaller batches
        batch_tokens = min(batch_tokens, SHARDED_BATCH_TOKENS)
    ref_set = set(range(len(dataset))) if ref_rows is None else set(ref_rows)
    do_ref = ref_rows is not None
    cfg = _reward_cfg(trainer.processing_class) if texts is not None else None
    fmt = None
    if cfg is not None:
        from treg.io.chat import ChatFormat
        fmt = ChatFormat(trainer.processing_class, use_chat_template=cfg.use_chat_template)
    per_row = 2 * len(cfg.spec.scores) if cfg is not None else 0
    total = sum(per_row + 2 * (r in ref_set and do_ref) for i in todo for r in writer.shard_rows(i))
    bar = progress_mod.progress_bar(total, f"reference pass ({name})", "seq",
                                    enabled=acc.is_main_process and not args.disable_tqdm)
    prog = Progress()
    was_training = call.training
    call.eval()
    counter = {"n": 0}
    hook = call.register_forward_pre_hook(lambda *_: counter.__setitem__("n", counter["n"] + 1))
    lock = Lockstep(call, acc, pad_id) if lockstep_needed else None

    def work(i: int, rows: list[int]) -> list[dict]:
        sub = dataset.select(rows)
        seqs, jobs = _jobs(sub, rows, args, ref_set if do_ref else set(), texts, cfg, fmt)
        from treg.method.seqscore import score_sequences
        with torch.no_grad(), acc.autocast():
            scores = score_sequences(call, seqs, batch_tokens=batch_tokens, pad_id=pad_id, progress=prog,
                                     share=not sharded) if seqs else []
        stats["sequences"] += len(seqs)
        stats["tokens"] += sum(len(c) + len(r) for c, r in seqs)
        stats["computed_rows"] += len(rows)
        bar.update(len(seqs))
        bar.set_postfix_str(rate_text(prog))
        return _rows(sub, rows, jobs, scores, cfg, do_ref, ref_set)

    try:
        with context:
            writer.run(work)
            if lock is not None:
                lock.finish()
    finally:
        hook.remove()
        bar.close()
        call.train(was_training)
        if moved is not None:
            call.to(moved)
    stats["forwards"] = counter["n"] - (lock.dummies if lock else 0)
    stats["dummy_forwards"] = lock.dummies if lock else 0
    with refcache.quiet_datasets():
        writer.finalize({"stage": "reference", "settings": settings})
    if stats["computed_rows"]:
        tps = prog.real_tokens / prog.seconds if prog.seconds else 0.0
        logger.info("reference pass (%s): %d pairs, %d sequences, %d tokens in %.1f s (%.0f tok/s)%s; cached in %s",
                    name, stats["computed_rows"], stats["sequences"], stats["tokens"], prog.seconds, tps,
                    f", resumed after {stats['resumed_shards']} finished shards" if stats["resumed_shards"] else "",
                    out)
    return stats


def _jobs(sub, rows, args, ref_set, texts, cfg, fmt):
    """The (context, response) sequences of one shard and, per sequence, (k, side, key, first token)."""
    from treg.method.templates import render
    max_len, mode = args.max_length, args.truncation_mode
    seqs, jobs = [], []
    for k, (row, r) in enumerate(zip(rows, sub)):
        prompt = list(r[PROMPT])
        for side in SIDES:
            resp = list(r[IDS[side]])
            pos0, lo, hi = response_window(len(prompt), len(resp), max_len, mode)
            if row in ref_set and hi > lo:
                seq = truncate_sequence(prompt + resp, max_len, mode)
                first = max(pos0 + lo, 1)                    # sequence position 0 has no context: never scored
                if pos0 + hi > first:
                    seqs.append((seq[:first], seq[first:pos0 + hi]))
                    jobs.append((k, side, PLAIN_REF, first - pos0))
            if texts is not None:
                query, chosen, rejected = texts[row]
                scored = resp[:hi] if mode == "keep_start" and max_len is not None else resp
                if cfg.template.mode == "revision":
                    contexts = render(cfg.template, query=query, draft=chosen if side == "chosen" else rejected)
                else:
                    contexts = render(cfg.template, query=query)
                by_name = dict(zip(("better", "worse"), contexts))
                for ctx_name, model_name in cfg.spec.scores:
                    if len(scored):
                        seqs.append((fmt.context_ids(by_name[ctx_name]), scored))
                        jobs.append((k, side, (ctx_name, model_name), 0))
    return seqs, jobs


def _rows(sub, rows, jobs, scores, cfg, do_ref, ref_set) -> list[dict]:
    out = [{INDEX: row} for row in rows]
    lp: dict = {}
    for (k, side, key, first), values in zip(jobs, scores):
        lp[(k, side, key)] = (first, values)
    for k, (row, r) in enumerate(zip(rows, sub)):
        for side in SIDES:
            n = len(r[IDS[side]])
            ref = np.zeros(n, dtype=np.float32)
            if (k, side, PLAIN_REF) in lp:
                first, values = lp[(k, side, PLAIN_REF)]
                ref[first:first + len(values)] = values
            if do_ref and row in ref_set:
                out[k][REF_TOK[side]] = ref.tolist()
                out[k][REF_SUM[side]] = float(ref.astype(np.float64).sum())
            if cfg is not None:
                passes = {key: np.zeros(n, dtype=np.float32) for key in cfg.spec.scores}
                for key in cfg.spec.scores:
                    if (k, side, key) in lp:
                        _, values = lp[(k, side, key)]
                        passes[key][:len(values)] = values
                r_hat = cfg.spec.rewards({PLAIN_REF: ref, **passes}, side, cfg.beta, n)
                got = len(lp[(k, side, cfg.spec.scores[0])][1]) if cfg.spec.scores and (k, side, cfg.spec.scores[0]) \
                    in lp else n
                r_hat = np.where(np.arange(n) < got, r_hat, 0.0).astype(np.float32)  # cut tokens: never trained on
                out[k][REWARDS[side]] = r_hat.tolist()
            for name in (REF_TOK[side], REWARDS[side]):
                values = out[k].get(name)
                if values is not None and not np.isfinite(values).all():
                    raise TregError("the reference model produced a non-finite value (NaN/inf); check the model and "
                                    "its dtype", row=row, field=name)
    return out


