"""Per-token log-probs of many ``(context, response)`` sequences: annotate's scoring engine.

``score_sequences(model, seqs, ...)`` returns, for each ``seqs[i] = (context_ids, response_ids)``, the
float32 array ``log p(y_t | context, y_<t)`` over the response. Two paths, the same numbers up to float
rounding (tests/test_seqscore.py checks 1e-5 against one unbatched forward per sequence):

* **rows**: each sequence is one row. Rows are sorted by length (longest first) and cut into batches
  whose PADDED size ``rows x longest`` stays under ``batch_tokens``; the output head runs on response
  tokens only (``treg.method.logprobs.model_token_logps(positions=...)``), never on (B, T, V) logits.
* **shared contexts**: sequences with identical context ids form a group (the plain prompt of a pair's
  chosen and rejected responses; instruction-mode better/worse contexts, which both responses share).
  The context minus its last token runs ONCE into a KV cache; the cache rows are copied to each
  response, which runs as ``[last context token] + response`` on top. A group of k responses then
  costs one context instead of k. Used when it saves at least ``MIN_SHARED_SAVING`` of the tokens
  (the toy world's instruction template saves 29%; revision mode, whose contexts hold the draft
  itself, about 1%, which would not pay for the masked attention the cached path needs).

The shared path is taken only for model types in ``SHARED_MODEL_TYPES`` (each checked equal to one
full forward per sequence) without sliding-window layers, length-dependent RoPE or PEFT prompt learning
(``shared_unsupported`` says why not). The first shared batch per model is also checked against the
rows path; a model that disagrees, or whose cached forward raises, is scored by rows from then on, with
one warning.
"""

from __future__ import annotations

import time
import warnings
import weakref
from dataclasses import dataclass

import numpy as np
import torch

MIN_SHARED_SAVING = 0.10   # share contexts only if that skips >= 10% of the tokens
_VERIFIED: "weakref.WeakKeyDictionary[torch.nn.Module, str | None]" = weakref.WeakKeyDictionary()


@dataclass
class Progress:
    """Counters for progress reporting. ``real_tokens``: context + response tokens of the sequences
    scored (what a one-sequence-per-forward loop computes); ``computed_tokens``: the real tokens that
    went through the model (fewer when contexts are shared); ``padded_tokens``: with padding."""
    real_tokens: int = 0
    computed_tokens: int = 0
    padded_tokens: int = 0
    seconds: float = 0.0


def plan_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices sorted by length (longest first, stable) cut so that ``len(batch) * max_len <= batch_tokens``
    (a sequence longer than the budget gets a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * lengths[cur[0]] > batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def context_groups(seqs: list[tuple[list[int], list[int]]]) -> list[list[int]]:
    """Indices of ``seqs`` grouped by identical context ids (first-appearance order)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, _) in enumerate(seqs):
        groups.setdefault(tuple(ctx), []).append(i)
    return list(groups.values())


def plan_groups(prefix_lens: list[int], leaf_lens: list[list[int]], batch_tokens: int) -> list[list[int]]:
    """Groups sorted by (longest leaf, prefix) descending, cut so that the two forwards' padded size
    ``n_groups * max_prefix + n_leaves * max_leaf`` stays under ``batch_tokens`` (one group at least)."""
    order = sorted(range(len(prefix_lens)), key=lambda g: (-max(leaf_lens[g]), -prefix_lens[g], g))
    batches, cur, tp, tl, nl = [], [], 0, 0, 0
    for g in order:
        ntp, ntl, nnl = max(tp, prefix_lens[g]), max(tl, max(leaf_lens[g])), nl + len(leaf_lens[g])
        if cur and (len(cur) + 1) * ntp + nnl * ntl > batch_tokens:
            batches.append(cur)
            cur, ntp, ntl, nnl = [], prefix_lens[g], max(leaf_lens[g]), len(leaf_lens[g])
        cur.append(g)
        tp, tl, nl = ntp, ntl, nnl
    if cur:
        batches.append(cur)
    return batches


# Model types whose cached forward was checked equal to one full forward per sequence (tests/test_seqscore.py
# and a review over tiny random configs). Others are scored by rows: correct, only slower.
SHARED_MODEL_TYPES = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "gemma", "phi", "phi3", "olmo", "olmo2",
    "cohere", "stablelm", "starcoder2", "granitemoe", "deepseek_v3", "gpt2", "gpt_bigcode", "gpt_neox", "gptj",
    "codegen", "opt", "xglm", "falcon"})


def _rope_type(text_config) -> str | None:
    for name in ("rope_parameters", "rope_scaling"):
        value = getattr(text_config, name, None)
        if isinstance(value, dict):
            return value.get("rope_type") or value.get("type")
    return None


def shared_unsupported(model) -> str | None:
    """Why ``model`` cannot take the shared-context path (None if it can)."""
    from treg.method.logprobs import _resolve_head, _unwrap
    if _VERIFIED.get(model):
        return _VERIFIED[model]
    peft = getattr(model, "peft_config", None)
    if isinstance(peft, dict) and any(getattr(c, "is_prompt_learning", False) for c in peft.values()):
        return "PEFT prompt learning (virtual tokens are prepended again to the cached continuation)"
    base = _unwrap(model)
    config = getattr(base, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return "not a decoder-only transformers model"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "model_type", None) not in SHARED_MODEL_TYPES:
        return f"model type '{getattr(text, 'model_type', None)}' is not in treg.method.seqscore.SHARED_MODEL_TYPES"
    layer_types = getattr(text, "layer_types", None) or []
    if getattr(text, "sliding_window", None) is not None and getattr(text, "use_sliding_window", True) \
            or any(t != "full_attention" for t in layer_types):
        return "sliding-window layers (the window counts cache slots, which include the prefixes' padding)"
    if _rope_type(text) in ("dynamic", "longrope"):
        return "a RoPE whose frequencies depend on the forward's length"
    import inspect
    params = inspect.signature(base.forward).parameters
    if "position_ids" not in params or not ({"cache", "past_key_values"} & set(params)):
        return "its forward takes no position_ids / KV cache"
    if isinstance(_resolve_head(model), str):
        return "its output head is not supported by treg.method.logprobs"
    return None


@torch.no_grad()
def score_sequences(model, seqs: list[tuple[list[int], list[int]]], *, batch_tokens: int, pad_id: int,
                    progress: Progress | None = None, share: bool = True) -> list[np.ndarray]:
    """Per-token log-probs of each response given its context: ``seqs[i] = (context_ids, response_ids)``
    -> float32 arrays of length ``len(response_ids)`` (``out[t] = log p(y_t | context, y_<t)``).
    ``share``: allow the shared-context path (module docstring); it is taken only where it pays."""
    results: list[np.ndarray | None] = [None] * len(seqs)
    groups = [g for g in context_groups(seqs) if len(g) > 1 and len(seqs[g[0]][0]) > 1]
    total = sum(len(c) + len(r) for c, r in seqs)
    saved = sum((len(g) - 1) * (len(seqs[g[0]][0]) - 1) for g in groups)
    if share and groups and saved >= MIN_SHARED_SAVING * total and shared_unsupported(model) is None:
        try:
            _score_shared(model, seqs, groups, results, batch_tokens, pad_id, progress)
        except (AttributeError, TypeError, ValueError, NotImplementedError) as err:  # not OOM: that is the user's
            _disable(model, f"the cached forward failed ({type(err).__name__}: {str(err).splitlines()[0]})")
            results = [None] * len(seqs)
    rest = [i for i, r in enumerate(results) if r is None]
    for i, lp in zip(rest, _score_rows(model, [seqs[i] for i in rest], batch_tokens, pad_id, progress)):
        results[i] = lp
    return results


def _score_rows(model, seqs, batch_tokens: int, pad_id: int, progress: Progress | None) -> list[np.ndarray]:
    from treg.method.logprobs import model_token_logps
    device = next(model.parameters()).device
    lengths = [len(c) + len(r) for c, r in seqs]
    results: list[np.ndarray | None] = [None] * len(seqs)
    for batch in plan_batches(lengths, batch_tokens):
        t0 = time.perf_counter()
        width = lengths[batch[0]]
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        wanted = torch.zeros((len(batch), width), dtype=torch.bool)  # response tokens only: no head on contexts
        for j, i in enumerate(batch):
            ctx, resp = seqs[i]
            ids[j, :lengths[i]] = torch.tensor(ctx + resp, dtype=torch.long)
            wanted[j, len(ctx):lengths[i]] = True
        # Right padding in a causal LM: real positions never attend to the pads after them, and
        # positions are arange either way, so an all-ones mask gives the same log-probs at real
        # positions (pads' own outputs are discarded) and keeps SDPA/flash on the mask-free causal path.
        ids = ids.to(device)
        logps = model_token_logps(model, ids, torch.ones_like(ids), positions=wanted.to(device)).cpu().numpy()
        for j, i in enumerate(batch):
            start = len(seqs[i][0])
            results[i] = logps[j, start:lengths[i]].copy()
        real = sum(lengths[i] for i in batch)
        _count(progress, t0, real=real, computed=real, padded=len(batch) * width)
    return results


def _count(progress: Progress | None, t0: float, *, real: int, computed: int, padded: int) -> None:
    if progress is not None:
        progress.real_tokens += real
        progress.computed_tokens += computed
        progress.padded_tokens += padded
        progress.seconds += time.perf_counter() - t0


def _score_shared(model, seqs, groups, results, batch_tokens, pad_id, progress) -> None:
    """Fill ``results`` for the sequences in ``groups`` (each: indices sharing one context)."""
    prefix_lens = [len(seqs[g[0]][0]) - 1 for g in groups]
    leaf_lens = [[1 + len(seqs[i][1]) for i in g] for g in groups]
    for batch in plan_groups(prefix_lens, leaf_lens, batch_tokens):
        t0 = time.perf_counter()
        members = [groups[g] for g in batch]
        out = _shared_batch(model, seqs, members, pad_id)
        if model not in _VERIFIED:  # first shared batch of this model: check against the rows path
            flat = [i for m in members for i in m]
            ref = _score_rows(model, [seqs[i] for i in flat], batch_tokens, pad_id, None)
            diff = np.concatenate([np.abs(a - out[i]) for a, i in zip(ref, flat)])
            half = next(model.parameters()).dtype != torch.float32
            worst, mean = float(diff.max(initial=0.0)), float(diff.mean()) if diff.size else 0.0
            if not (worst <= (0.25 if half else 2e-3) and mean <= (0.02 if half else 2e-4)):  # also NaN
                _disable(model, f"shared-context log-probs differ from the rows path (max {worst:.3g}, "
                                f"mean {mean:.3g})")
                return
            _VERIFIED[model] = None
        for i, lp in out.items():
            results[i] = lp
        tp = max(prefix_lens[g] for g in batch)
        tl = max(n for g in batch for n in leaf_lens[g])
        _count(progress, t0, real=sum(len(seqs[i][0]) + len(seqs[i][1]) for m in members for i in m),
               computed=sum(prefix_lens[g] + sum(leaf_lens[g]) for g in batch),
               padded=len(batch) * tp + sum(len(leaf_lens[g]) for g in batch) * tl)


def _disable(model, reason: str) -> None:
    """Score ``model`` by rows from now on, with one warning."""
    _VERIFIED[model] = reason
    warnings.warn(f"treg.method.seqscore: scoring {type(model).__name__} without context sharing: {reason}",
                  RuntimeWarning, stacklevel=4)


def _shared_batch(model, seqs, members: list[list[int]], pad_id: int) -> dict[int, np.ndarray]:
    """One shared-context batch: prefixes (contexts minus their last token) into a KV cache, then the
    leaves ``[last context token] + response`` on the cache rows of their group."""
    from treg.method.logprobs import cache_argument, model_token_logps
    device = next(model.parameters()).device
    prefixes = [seqs[m[0]][0][:-1] for m in members]
    tp = max(map(len, prefixes))
    pids = torch.full((len(members), tp), pad_id, dtype=torch.long)
    pmask = torch.zeros((len(members), tp), dtype=torch.long)
    for j, p in enumerate(prefixes):
        pids[j, :len(p)], pmask[j, :len(p)] = torch.tensor(p, dtype=torch.long), 1
    pids, pmask = pids.to(device), pmask.to(device)
    # Right-padded prefixes with an all-ones mask (see _score_rows): the pads' cache entries are finite
    # and the leaves' mask (pmask) hides them.
    kw = cache_argument(model)
    out = model(input_ids=pids, attention_mask=torch.ones_like(pids), use_cache=True, logits_to_keep=1)
    cache = getattr(out, kw)
    leaves = [(j, i) for j, m in enumerate(members) for i in m]
    rows = torch.tensor([j for j, _ in leaves], device=device)
    cache.reorder_cache(rows)                         # (n_groups, ...) -> (n_leaves, ...) per layer
    width = max(1 + len(seqs[i][1]) for _, i in leaves)
    ids = torch.full((len(leaves), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(leaves), width), dtype=torch.long)
    for k, (j, i) in enumerate(leaves):
        ctx, resp = seqs[i]
        ids[k, :1 + len(resp)] = torch.tensor(ctx[-1:] + resp, dtype=torch.long)
        mask[k, :1 + len(resp)] = 1
    ids, mask = ids.to(device), mask.to(device)
    logps = model_token_logps(model, ids, mask, prefix=(cache, pmask[rows])).cpu().numpy()
    return {i: logps[k, 1:1 + len(seqs[i][1])].copy() for k, (_, i) in enumerate(leaves)}
