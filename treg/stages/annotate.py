"""Token rewards by contrastive prompting + reference log-probs (METHOD.md §1, §5).

Python API (notebooks)::

    ds = annotate(model, tokenizer, rows, template="revision")     # -> datasets.Dataset

``rows``: ``PreferenceRow``s (treg.io.chat) or dicts in any TRL preference format. On-disk, resumable
and multi-process: :func:`annotate_to_disk` (what ``treg annotate`` runs).

Per pair, the response ``y`` (chosen and rejected) is tokenized ONCE (``ChatFormat.response_ids``,
ending with the end-of-turn token) and appended to each tokenized context (METHOD.md §1):

* plain ``x``                  -> ``ref_*_logps`` (sum) and ``ref_*_token_logps`` (per token)
* ``x_better`` / ``x_worse``   -> ``r_hat(y_t) = sigmoid(lp_better - lp_worse) - 0.5`` (source contrastive)

Other sources (same schema) are entries of :data:`treg.method.token_rewards.TOKEN_REWARD_SOURCES`
(the DPO-reward regularizer and DPO-SFT of METHOD.md §5); each declares the passes it needs.

Speed: all sequences of a chunk of pairs (2 responses x up to 3 contexts) go to
``treg.method.seqscore.score_sequences``: sorted by length into token-budget batches (``batch_tokens``, default
by device: :func:`default_batch_tokens`), the output head on response tokens only (no (B, T, V) logits),
and a context shared by several responses (the plain prompt; instruction-mode better/worse prompts)
computed once into a KV cache where that saves >= 10% of the tokens.

Output columns (one row per pair; docs/data.md contract + extras): ``prompt_input_ids``,
``chosen_input_ids``, ``rejected_input_ids``, ``chosen_token_rewards``, ``rejected_token_rewards``
(float32, one per response token), ``ref_chosen_logps``, ``ref_rejected_logps`` (float64 sums),
``ref_chosen_token_logps``, ``ref_rejected_token_logps`` (float32), and ``source_index`` (0-based
row of the input), ``prompt_text``, ``chosen_text``, ``rejected_text``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from treg.io.chat import ChatFormat, PreferenceRow, messages_to_text, preference_rows
from treg.io.loading import pad_token_id
from treg.errors import TregError
from treg.method.seqscore import Progress, score_sequences
from treg.method.templates import Template, load_template, render
from treg.method.token_rewards import PLAIN_REF, TOKEN_REWARD_SOURCES, TokenRewardSource
from treg.io.schema import IDS, PROMPT, REF_SUM, REF_TOK, REWARDS, SIDES, SOURCE_INDEX, STAGE, TEXT, features

# Default padded tokens per forward, by device type. On CPU, throughput falls for big batches
# (activations leave the caches): the toy checkpoint on 2 cores scores 61.6k tok/s at 2,048 tokens
# vs 35.0k at 16,384, a hidden-256 Llama 7.3k vs 5.8k (docs/benchmarks.md, "annotate").
CPU_BATCH_TOKENS, GPU_BATCH_TOKENS = 2048, 16384


def default_batch_tokens(device) -> int:
    """``--batch-tokens`` when not given: 2,048 on CPU, 16,384 on accelerators (cuda, mps, xpu...)."""
    return CPU_BATCH_TOKENS if torch.device(device).type == "cpu" else GPU_BATCH_TOKENS


def source_spec(source: str) -> TokenRewardSource:
    """The registry entry of ``source`` (TregError naming the choices when there is none)."""
    spec = TOKEN_REWARD_SOURCES.get(source)
    if spec is None:
        raise TregError(f"unknown source '{source}' (choose {', '.join(TOKEN_REWARD_SOURCES)})", field="source")
    return spec


@dataclass
class AnnotateConfig:
    """Settings of one annotation run (everything that decides the output)."""
    template: Template | None = None
    source: str = "contrastive"
    beta: float = 0.1
    max_length: int | None = None
    batch_tokens: int = 16384
    use_chat_template: bool = True

    def __post_init__(self):
        if source_spec(self.source).needs_template and self.template is None:
            self.template = load_template("revision")
        if self.batch_tokens < 1:
            raise TregError("must be >= 1", field="batch_tokens")
        if not math.isfinite(self.beta) or self.beta <= 0:
            raise TregError("must be a positive number", field="beta")

    @property
    def spec(self) -> TokenRewardSource:
        return TOKEN_REWARD_SOURCES[self.source]

    def settings(self) -> dict:
        """JSON-able settings for fingerprints and meta (template text only where it matters)."""
        out = {"source": self.source, "max_length": self.max_length, "batch_tokens": self.batch_tokens,
               "use_chat_template": self.use_chat_template}
        if self.spec.needs_template:
            out.update(template_mode=self.template.mode, template_text=self.template.text)
        if self.spec.uses_beta:
            out["beta"] = self.beta
        return out


@dataclass
class _Pair:
    row: PreferenceRow
    prompt_ids: list[int]
    resp: dict            # side -> response ids
    ctx: dict             # (side, "plain"|"better"|"worse") -> context ids
    out: dict = field(default_factory=dict)  # (side, ctx, model) -> response log-probs (np.float32)


def build_pairs(rows: list[PreferenceRow], fmt: ChatFormat, cfg: AnnotateConfig) -> list[_Pair]:
    """Tokenize pairs; pairs whose longest scored sequence exceeds ``cfg.max_length`` are left out."""
    pairs = []
    for row in rows:
        prompt_ids = fmt.context_ids(row.prompt)
        resp = {"chosen": fmt.response_ids(row.chosen), "rejected": fmt.response_ids(row.rejected)}
        ctx = {(side, "plain"): prompt_ids for side in SIDES}
        if cfg.spec.needs_template:
            query = messages_to_text(row.prompt)
            if cfg.template.mode == "revision":  # the draft is in the context: one pair of contexts per side
                for side in SIDES:
                    better, worse = render(cfg.template, query=query, draft=getattr(row, side))
                    ctx[(side, "better")], ctx[(side, "worse")] = fmt.context_ids(better), fmt.context_ids(worse)
            else:  # instruction mode: both responses share the better/worse contexts
                better, worse = (fmt.context_ids(m) for m in render(cfg.template, query=query))
                for side in SIDES:
                    ctx[(side, "better")], ctx[(side, "worse")] = better, worse
        longest = max(len(c) + len(resp[s]) for (s, _), c in ctx.items())
        if cfg.max_length is not None and longest > cfg.max_length:
            continue
        pairs.append(_Pair(row, prompt_ids, resp, ctx))
    return pairs


def annotate_pairs(pairs: list[_Pair], model, cfg: AnnotateConfig, *, pad_id: int, dpo_model=None,
                   file: str | None = None, progress: Progress | None = None) -> list[dict]:
    """Score ``pairs`` (one chunk) and return output rows (see module docstring for the columns)."""
    needed = {PLAIN_REF, *cfg.spec.scores}  # (context, model) passes of this source
    jobs = [(p, key, name) for name in ("ref", "dpo") for p in pairs for key in p.ctx if (key[1], name) in needed]
    for name, mdl in (("ref", model), ("dpo", dpo_model)):
        mine = [j for j in jobs if j[2] == name]
        if not mine:
            continue
        seqs = [(p.ctx[key], p.resp[key[0]]) for p, key, _ in mine]
        for (p, key, _), lp in zip(mine, score_sequences(mdl, seqs, batch_tokens=cfg.batch_tokens,
                                                         pad_id=pad_id, progress=progress)):
            p.out[(*key, name)] = lp
    return [_row(p, cfg, file) for p in pairs]


def _row(p: _Pair, cfg: AnnotateConfig, file: str | None) -> dict:
    out = {SOURCE_INDEX: p.row.index, TEXT["prompt"]: messages_to_text(p.row.prompt),
           TEXT["chosen"]: p.row.chosen, TEXT["rejected"]: p.row.rejected, PROMPT: p.prompt_ids}
    for side in SIDES:
        ref = p.out[(side, *PLAIN_REF)]
        lp = {key[1:]: values for key, values in p.out.items() if key[0] == side}  # (context, model) -> (n,)
        r_hat = cfg.spec.rewards(lp, side, cfg.beta, len(ref))  # METHOD.md §1 / §5, one registry entry
        total = float(ref.astype(np.float64).sum())
        for name, values in ((REWARDS[side], r_hat), (REF_TOK[side], ref), (REF_SUM[side], np.array([total]))):
            if not np.isfinite(values).all():
                raise TregError("the model produced a non-finite value (NaN/inf); check the model and "
                                "--dtype", file=file, row=p.row.row, field=name)
        out[IDS[side]] = p.resp[side]
        out[REWARDS[side]] = r_hat.tolist()
        out[REF_SUM[side]] = total
        out[REF_TOK[side]] = ref.tolist()
    return out


def annotate(model, tokenizer, rows, *, template: str | Template = "revision", source: str = "contrastive",
             dpo_model=None, beta: float = 0.1, max_length: int | None = None, batch_tokens: int | None = None,
             use_chat_template: bool = True, chunk_pairs: int = 256, progress: bool = True):
    """In-memory annotation (no shards): returns a ``datasets.Dataset`` with the columns above.

    ``rows``: ``PreferenceRow``s or dicts in a TRL preference format. Pairs longer than
    ``max_length`` (any scored sequence) are skipped. ``dpo_model`` is needed for ``source="dpo"``.
    ``batch_tokens``: padded tokens per forward (default: :func:`default_batch_tokens` of the model's device).
    """
    import datasets
    if batch_tokens is None:
        batch_tokens = default_batch_tokens(next(model.parameters()).device)
    cfg = make_config(template=template, source=source, beta=beta, max_length=max_length,
                      batch_tokens=batch_tokens, use_chat_template=use_chat_template, dpo_model=dpo_model)
    rows = rows if rows and isinstance(rows[0], PreferenceRow) else preference_rows(list(rows))
    fmt = ChatFormat(tokenizer, use_chat_template=use_chat_template)
    pad_id = pad_token_id(tokenizer)
    out = []
    chunks = [rows[i:i + chunk_pairs] for i in range(0, len(rows), chunk_pairs)]
    bar = progress_bar(len(rows), enabled=progress)
    stats = Progress()
    for chunk in chunks:
        pairs = build_pairs(chunk, fmt, cfg)
        out += annotate_pairs(pairs, model, cfg, pad_id=pad_id, dpo_model=dpo_model, progress=stats)
        bar.update(len(chunk))
        bar.set_postfix_str(rate_text(stats))
    bar.close()
    return datasets.Dataset.from_list(out, features=features())


def make_config(*, template, source, beta, max_length, batch_tokens, use_chat_template, dpo_model) -> AnnotateConfig:
    """Validate options and build an :class:`AnnotateConfig` (TregError on a bad combination)."""
    spec = source_spec(source)
    if spec.needs_dpo_model and dpo_model is None:
        raise TregError(f"--source {source} needs --dpo-model", field="dpo_model")
    if not spec.needs_dpo_model and dpo_model is not None:
        raise TregError(f"--dpo-model is not used by --source {source}", field="dpo_model")
    if max_length is not None and max_length < 2:
        raise TregError("must be >= 2", field="max_length")
    tmpl = (template if isinstance(template, Template) else load_template(template)) \
        if spec.needs_template else None
    return AnnotateConfig(template=tmpl, source=source, beta=beta, max_length=max_length,
                          batch_tokens=batch_tokens, use_chat_template=use_chat_template)


def progress_bar(total: int, *, enabled: bool = True, desc: str = "annotate"):
    from treg import progress  # count, rate, ETA; quiet under --no-progress and off a terminal
    return progress.progress_bar(total, desc, "pair", enabled=enabled)


def rate_text(stats: Progress) -> str:
    """``tok/s`` counts context + response tokens of the scored sequences (as a one-sequence-per-forward
    loop would compute them); ``pad`` = padded / computed tokens; ``shared`` = scored / computed."""
    tps = stats.real_tokens / stats.seconds if stats.seconds else 0.0
    pad = stats.padded_tokens / stats.computed_tokens if stats.computed_tokens else 1.0
    shared = stats.real_tokens / stats.computed_tokens if stats.computed_tokens else 1.0
    return f"{tps:,.0f} tok/s, pad x{pad:.2f}" + (f", shared x{shared:.2f}" if shared > 1.005 else "")


def annotate_to_disk(model, tokenizer, rows: list[PreferenceRow], out, *, cfg: AnnotateConfig,
                     dpo_model=None, shard_size: int = 256, overwrite: bool = False,
                     run_info: dict | None = None, file: str | None = None, rank: int = 0,
                     world_size: int = 1, barrier=None, on_shard=None, progress: bool = True):
    """Annotate into ``out`` through a resumable :class:`treg.io.shards.ShardedWriter`.

    Shard ``i`` holds input rows ``[i * shard_size, (i + 1) * shard_size)``; process ``rank`` scores
    shards ``i % world_size == rank``; rank 0 merges after a barrier. ``run_info`` (model names,
    dtype, data source) joins the settings fingerprint: a rerun with the same settings resumes, with
    different ones it is refused unless ``overwrite``. ``on_shard(i)`` is called after each shard
    is written (tests use it to simulate a crash). ``model`` may be a zero-argument callable returning
    ``(model, dpo_model)``: it is called only after the output check, and only if there is work left.
    Returns ``out`` (a Path).
    """
    from treg.io.meta import stable_hash, tokenizer_fingerprint
    from treg.io.shards import ShardedWriter
    run_info = dict(run_info or {})
    tok_fp = tokenizer_fingerprint(tokenizer)
    settings = {**cfg.settings(), **run_info, "tokenizer_fingerprint": tok_fp, "shard_size": shard_size,
                "num_rows": len(rows), "data_hash": stable_hash([[r.prompt, r.chosen, r.rejected] for r in rows])}
    from types import SimpleNamespace
    state = SimpleNamespace(process_index=rank, num_processes=world_size, wait_for_everyone=barrier)
    writer = ShardedWriter.for_rows(out, rows, shard_size=shard_size, settings=settings, state=state,
                                    features=features(), overwrite=overwrite)
    fmt = ChatFormat(tokenizer, use_chat_template=cfg.use_chat_template)
    pad_id = pad_token_id(tokenizer)
    todo = writer.pending_shards()
    if callable(model) and not isinstance(model, torch.nn.Module):
        model, dpo_model = model() if todo else (None, None)
    bar = progress_bar(writer.pending_rows(), enabled=progress and rank == 0)
    stats = Progress()

    def work(i: int, chunk: list) -> list[dict]:
        rows_out = annotate_pairs(build_pairs(chunk, fmt, cfg), model, cfg, pad_id=pad_id, dpo_model=dpo_model,
                                  file=file, progress=stats)
        bar.update(len(chunk))
        bar.set_postfix_str(rate_text(stats))
        return rows_out

    writer.run(work, after_shard=on_shard)
    bar.close()

    def meta(ds) -> dict:
        if len(ds) == 0:  # every pair was skipped: an empty dataset is useless downstream, keep nothing
            import shutil
            shutil.rmtree(writer.out, ignore_errors=True)
            raise TregError(f"every pair is longer than --max-length {cfg.max_length} tokens (context + "
                            "response); nothing written", file=file, field="max-length")
        from treg.io.data import validate
        validate(ds, file=str(out))  # the output meets the contract (treg.io.schema) before it is published
        return {"stage": STAGE, "tokenizer_fingerprint": tok_fp, **run_info,
                "source": cfg.source, "template": cfg.template.text if cfg.template else None,
                "template_mode": cfg.template.mode if cfg.template else None,
                "beta": cfg.beta if cfg.spec.uses_beta else None,
                "num_pairs": len(ds), "num_rows": len(rows), "skipped_too_long": len(rows) - len(ds),
                "lengths": length_stats(ds), "settings": settings}

    return writer.finalize(meta)


def length_stats(ds) -> dict:
    """Mean / max token lengths of prompt, chosen and rejected (for treg_meta.json)."""
    import pyarrow.compute as pc
    table = ds.with_format("arrow")[:]
    out = {}
    for col in (PROMPT, IDS["chosen"], IDS["rejected"]):
        n = pc.list_value_length(table[col]).to_numpy(zero_copy_only=False) if len(ds) else np.zeros(1)
        out[col.replace("_input_ids", "")] = {"mean": round(float(n.mean()), 2), "max": int(n.max())}
    return out
