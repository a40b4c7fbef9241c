"""``treg probe``: do a model's token rewards carry signal on the user's own pairs? (issue 11, docs/annotate.md)

For each usable pair (at most ``n_pairs``, drawn with ``seed``) one corruption from
:mod:`treg.method.corrupt` is planted into the *chosen* response; the tokens overlapping the planted
text are its *planted tokens*. Every requested reward method then scores, with annotate's own code
(:func:`treg.stages.annotate.build_pairs` / ``annotate_pairs``, so the numbers are those
``treg annotate`` would write), the user's chosen and rejected responses and the corrupted one:

* ``auroc``: P(a random other token of a corrupted response gets a higher reward than a random planted
  token), pooled over the corrupted responses of each strategy, then averaged over the strategies
  (so that an off-topic sentence's many tokens do not outweigh a one-token swap; ``auroc_pooled``
  pools all, ``auroc_by_strategy`` has each); ties count 1/2; end-of-turn tokens are left out. 1.0:
  every planted token is ranked below the rest; 0.5: chance. CI: percentile bootstrap over responses
  (stratified by strategy).
* ``agreement``: share of the user's pairs whose chosen response has the higher summed reward
  (ties 1/2), with a bootstrap CI over pairs; ``clean_beats_corrupted``: the same for the original
  chosen response vs its corrupted copy.

Methods: ``contrastive:<template>`` for each template (METHOD.md §1), ``dpo`` (METHOD.md §5; needs a
DPO model) and two calibrating baselines: ``surprisal`` (the reference model's own log-prob of each
token on the plain prompt) and ``random`` (uniform noise in (-0.5, 0.5), r_hat's range). A contrastive
or dpo method *carries signal* when its AUROC is at least ``min_auroc``, its CI lies above 0.5, and
the agreement's CI is not entirely below 0.5 (chosen must not lose to rejected on the user's own pairs).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from treg.errors import TregError
from treg.method.token_rewards import TOKEN_REWARD_SOURCES
from treg.io.chat import ChatFormat, PreferenceRow
from treg.method.metrics import auroc  # noqa: F401  (part of the probe's API)
from treg.method.corrupt import STRATEGIES, Corruption, corrupt, name_pool, planted_tokens

SIGNAL = "carries signal"
NOISE = "near or below chance: alpha > 0 would regularize toward noise"
BASELINES = ("surprisal", "random")


@dataclass
class Planted:
    """One usable pair: the user's row, the corruption of its chosen response, planted token indices
    and the number of text tokens (end-of-turn tokens excluded) of the corrupted response."""
    row: PreferenceRow
    corruption: Corruption
    planted: list[int]
    n_text: int


@dataclass
class MethodResult:
    """Token rewards of one method: ``rewards[side][i]`` for side chosen / rejected / corrupted."""
    name: str
    rewards: dict = field(default_factory=dict)


def plant(rows: list[PreferenceRow], fmt: ChatFormat, *, strategies=STRATEGIES, n_pairs: int = 100,
          seed: int = 0, file: str | None = None) -> list[Planted]:
    """Plant one corruption per usable pair (strategy order seeded per row); at most ``n_pairs`` pairs,
    drawn with ``seed`` when there are more. TregError when no pair is usable."""
    tok = fmt.tokenizer
    if not getattr(tok, "is_fast", False):
        raise TregError("treg probe needs a fast tokenizer (offset mapping) to locate planted tokens",
                        field="model")
    pool = name_pool([t for r in rows for t in (r.chosen, r.rejected)])
    unk = tok.unk_token_id
    out = []
    for row in rows:
        rng = random.Random(f"{seed}/{row.index}")
        order = list(strategies)
        rng.shuffle(order)
        for strategy in order:
            c = corrupt(row.chosen, strategy, rng, pool=pool)
            if c is None:
                continue
            enc = tok(c.text, add_special_tokens=False, return_offsets_mapping=True)
            idx = planted_tokens(enc["offset_mapping"], c.span)
            ids = list(enc["input_ids"])
            if not idx or len(idx) == len(ids) or (unk is not None and any(ids[i] == unk for i in idx)):
                continue  # nothing planted, nothing left, or text the tokenizer does not know
            if fmt.response_ids(c.text)[:len(ids)] != ids:
                raise AssertionError("offset tokenization differs from the response tokenization")
            out.append(Planted(row, c, idx, len(ids)))
            break
    if not out:
        raise TregError(f"no usable pair: no chosen response of the {len(rows)} pair(s) could be corrupted "
                        f"by {', '.join(strategies)} (a number, a capitalised name, an auxiliary verb, "
                        "or a sentence the tokenizer knows)", file=file)
    if len(out) > n_pairs:
        keep = sorted(random.Random(seed).sample(range(len(out)), n_pairs))
        out = [out[i] for i in keep]
    return out


def score_methods(model, tokenizer, planted: list[Planted], *, methods: list[tuple[str, object]],
                  fmt: ChatFormat, batch_tokens: int, max_length: int | None, dpo_model=None,
                  seed: int = 0) -> tuple[list[Planted], list[MethodResult]]:
    """Token rewards of every method for chosen / rejected / corrupted responses.

    ``methods``: ``[(name, source, template_or_None)]``, source a key of TOKEN_REWARD_SOURCES, name
    ``<source>:<template label>`` for templated sources; the baselines are added. Pairs that ``max_length`` leaves out of any method are dropped everywhere."""
    from treg.io.loading import pad_token_id
    from treg.stages.annotate import _Pair, _row, annotate_pairs, build_pairs, make_config
    pad_id = pad_token_id(tokenizer)
    per_method, plain_cache = [], {}
    for name, source, template in methods:
        spec = TOKEN_REWARD_SOURCES[source]
        cfg = make_config(template=template, source=source, beta=0.1, max_length=max_length,
                          batch_tokens=batch_tokens, use_chat_template=fmt.use_chat_template,
                          dpo_model=dpo_model if spec.needs_dpo_model else None)
        plain_ref_only = all(ctx != "plain" for ctx, _ in spec.scores)  # x itself is scored by the reference only
        users = {p.row.index: p for p in build_pairs([x.row for x in planted], fmt, cfg)}
        bad = [PreferenceRow(x.row.index, x.row.row, x.row.prompt, x.corruption.text, x.row.rejected)
               for x in planted]
        for cp in build_pairs(bad, fmt, cfg):
            p = users.get(cp.row.index)
            if p is None:
                continue
            p.resp["corrupted"] = cp.resp["chosen"]
            if cp.row.chosen == cp.row.rejected:  # the corruption IS the user's rejected response: score it once
                continue
            for kind in ("plain", "better", "worse"):
                if ("chosen", kind) in cp.ctx:
                    p.ctx[("corrupted", kind)] = cp.ctx[("chosen", kind)]
        pairs = [p for p in users.values() if "corrupted" in p.resp]
        for p in pairs:  # the plain-prompt log-probs do not depend on the template: score them once
            if plain_ref_only and all((p.row.index, s) in plain_cache for s in p.resp):
                for s in p.resp:
                    p.ctx.pop((s, "plain"), None)
                    p.out[(s, "plain", "ref")] = plain_cache[(p.row.index, s)]
        annotate_pairs(pairs, model, cfg, pad_id=pad_id, dpo_model=dpo_model)
        result = {}
        for p in pairs:
            if not any(s == "corrupted" for s, _ in p.ctx):
                p.out.update({("corrupted", k, m): v for (s, k, m), v in list(p.out.items()) if s == "rejected"})
            for s in p.resp:
                plain_cache[(p.row.index, s)] = p.out[(s, "plain", "ref")]
            view = _Pair(p.row, p.prompt_ids, {"chosen": p.resp["corrupted"], "rejected": p.resp["chosen"]}, {},
                         {("chosen" if s == "corrupted" else "rejected", k, m): v for (s, k, m), v in p.out.items()
                          if s in ("corrupted", "chosen")})
            own, bad_row = _row(p, cfg, None), _row(view, cfg, None)
            result[p.row.index] = {"chosen": np.asarray(own["chosen_token_rewards"]),
                                   "rejected": np.asarray(own["rejected_token_rewards"]),
                                   "corrupted": np.asarray(bad_row["chosen_token_rewards"])}
        per_method.append((name, result))
    keep = set.intersection(*(set(r) for _, r in per_method))
    planted = [x for x in planted if x.row.index in keep]
    if not planted:
        raise TregError(f"no usable pair: every pair is longer than --max-length {max_length} tokens",
                        field="max-length")
    results = [MethodResult(name, {s: [r[x.row.index][s] for x in planted] for s in ("chosen", "rejected",
                                                                                     "corrupted")})
               for name, r in per_method]
    results.append(MethodResult("surprisal", {s: [plain_cache[(x.row.index, s)].astype(np.float64)
                                                  for x in planted] for s in ("chosen", "rejected", "corrupted")}))
    rng = np.random.default_rng(seed)
    results.append(MethodResult("random", {s: [rng.random(len(a)) - 0.5 for a in results[-1].rewards[s]]
                                           for s in ("chosen", "rejected", "corrupted")}))
    return planted, results


def _share_greater(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a > b) + 0.5 * (a == b)


def metrics(planted: list[Planted], res: MethodResult, *, bootstrap: int = 1000, seed: int = 0,
            min_auroc: float = 0.6) -> dict:
    """AUROC of planted tokens (with CI), agreement on the user's pairs (with CI), clean vs corrupted,
    and the verdict (None for baselines)."""
    pos, neg = [], []
    for x, r in zip(planted, res.rewards["corrupted"]):
        mask = np.zeros(x.n_text, dtype=bool)
        mask[x.planted] = True
        pos.append(r[:x.n_text][~mask])
        neg.append(r[:x.n_text][mask])
    sums = {s: np.array([float(np.sum(r)) for r in res.rewards[s]]) for s in res.rewards}
    agree = _share_greater(sums["chosen"], sums["rejected"])
    clean = _share_greater(sums["chosen"], sums["corrupted"])
    strategies = list(dict.fromkeys(x.corruption.strategy for x in planted))
    groups = {st: np.array([i for i, x in enumerate(planted) if x.corruption.strategy == st]) for st in strategies}

    def macro(idx: np.ndarray) -> tuple[float | None, dict]:
        """Mean over strategies of the AUROC pooled within each strategy (responses ``idx``)."""
        by = {}
        for st in strategies:
            k = [i for i in idx if planted[i].corruption.strategy == st]
            by[st] = auroc(np.concatenate([pos[i] for i in k]), np.concatenate([neg[i] for i in k])) if k else None
        vals = [v for v in by.values() if v is not None]
        return (float(np.mean(vals)) if vals else None), by

    rng = np.random.default_rng(seed)
    n = len(planted)
    boot_auc, boot_agree = [], []
    for _ in range(bootstrap):
        i = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups.values()])  # stratified
        a = macro(i)[0]
        if a is not None:
            boot_auc.append(a)
        boot_agree.append(float(agree[rng.integers(0, n, n)].mean()))

    def ci(values):
        return [round(float(np.percentile(values, 2.5)), 4), round(float(np.percentile(values, 97.5)), 4)] \
            if values else None

    value, by_strategy = macro(np.arange(n))
    out = {"method": res.name, "auroc": round(value, 4), "auroc_ci": ci(boot_auc),
           "auroc_pooled": round(auroc(np.concatenate(pos), np.concatenate(neg)), 4),
           "auroc_by_strategy": {k: None if v is None else round(v, 4) for k, v in by_strategy.items()},
           "agreement": round(float(agree.mean()), 4), "agreement_ci": ci(boot_agree),
           "clean_beats_corrupted": round(float(clean.mean()), 4), "verdict": None}
    if res.name not in BASELINES:
        lo = out["auroc_ci"][0] if out["auroc_ci"] else value
        agree_hi = out["agreement_ci"][1] if out["agreement_ci"] else out["agreement"]
        out["verdict"] = SIGNAL if value >= min_auroc and lo > 0.5 and agree_hi > 0.5 else NOISE
    return out


def run_probe(model, tokenizer, rows: list[PreferenceRow], *, templates=("revision",), sources=("contrastive",),
              dpo_model=None, strategies=STRATEGIES, n_pairs: int = 100, seed: int = 0, bootstrap: int = 1000,
              min_auroc: float = 0.6, max_length: int | None = None, batch_tokens: int = 2048,
              use_chat_template: bool = True, file: str | None = None) -> dict:
    """The whole probe (see module docstring); returns the report dict that ``--json`` writes. ``model``
    may be a zero-argument callable returning ``(model, dpo_model)``, called after the corruptions
    are planted (so that a dataset with no usable pair fails before any model load)."""
    from treg.method.templates import load_template
    t0 = time.perf_counter()
    methods = []
    for source in sources:
        spec = TOKEN_REWARD_SOURCES.get(source)
        if spec is None or not spec.needs_model:
            probed = [n for n, s in TOKEN_REWARD_SOURCES.items() if s.needs_model]
            raise TregError(f"cannot probe source '{source}' (choose {', '.join(probed)})", field="source")
        if spec.needs_template:
            methods += [(f"{source}:{Path(str(t)).stem}", source, load_template(t)) for t in templates]
        else:
            methods.append((source, source, None))
    fmt = ChatFormat(tokenizer, use_chat_template=use_chat_template)
    planted = plant(rows, fmt, strategies=strategies, n_pairs=n_pairs, seed=seed, file=file)
    if callable(model) and not isinstance(model, torch.nn.Module):  # load only once the input is known good
        model, dpo_model = model()
    planted, results = score_methods(model, tokenizer, planted, methods=methods, fmt=fmt,
                                     batch_tokens=batch_tokens, max_length=max_length, dpo_model=dpo_model,
                                     seed=seed)
    counts = {s: sum(x.corruption.strategy == s for x in planted) for s in strategies}
    return {"n_pairs": len(planted), "n_rows": len(rows), "seed": seed, "strategies": counts,
            "n_planted_tokens": sum(len(x.planted) for x in planted),
            "n_tokens": sum(x.n_text for x in planted), "min_auroc": min_auroc,
            "results": [metrics(planted, r, bootstrap=bootstrap, seed=seed, min_auroc=min_auroc) for r in results],
            "examples": [{"source_index": x.row.index, "strategy": x.corruption.strategy,
                          "original": x.corruption.original, "planted": x.corruption.planted,
                          "text": x.corruption.text} for x in planted[:5]],
            "seconds": round(time.perf_counter() - t0, 2)}


def report_text(report: dict) -> str:
    """The human-readable table ``treg probe`` prints."""
    strat = ", ".join(f"{k} {v}" for k, v in report["strategies"].items() if v)
    lines = [f"treg probe: {report['n_pairs']} pairs ({strat}); {report['n_planted_tokens']} planted of "
             f"{report['n_tokens']} tokens; {report['seconds']:.1f} s",
             f"{'method':<28} {'AUROC [95% CI]':<22} {'agreement [95% CI]':<22} verdict"]
    for r in report["results"]:
        def f(v, c):
            return f"{v:.3f} [{c[0]:.2f}, {c[1]:.2f}]" if c else f"{v:.3f}"
        name = r["method"] + (" (baseline)" if r["method"] in BASELINES else "")
        lines.append(f"{name:<28} {f(r['auroc'], r['auroc_ci']):<22} {f(r['agreement'], r['agreement_ci']):<22} "
                     f"{r['verdict'] or ''}".rstrip())
    return "\n".join(lines)
