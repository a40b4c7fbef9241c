"""Sequence-level rewards for sampled responses, and best/worst preference pairs (METHOD.md §6).

Data contract
-------------
Input: a samples dataset written by ``treg sample`` (see :mod:`treg.stages.sampling`): one row per prompt
with ``prompt`` (str or list of ``{role, content}`` messages), ``prompt_id`` (str) and ``responses``
(list[str], N >= 2).

Output: a preference dataset in TRL's format, directly readable by ``treg annotate``:

- ``prompt``: as given (str, or messages for conversational prompts);
- ``chosen`` / ``rejected``: str for a string prompt; for a conversational prompt a one-message list
  ``[{"role": "assistant", "content": ...}]`` (TRL's conversational preference format);
- ``score_chosen`` / ``score_rejected`` (float), ``all_scores`` (list[float], one per response, in
  the order of ``responses``), ``prompt_id`` (str).

Highest score = chosen, lowest = rejected (METHOD.md §6). Rows whose best and worst scores tie, or
differ by less than ``min_margin``, are dropped and counted.

Scorers are callables ``scorer(prompts, responses) -> list[float]`` (equal-length lists). Two kinds:
:func:`load_reward_fn` (a user function ``(prompt, response) -> float``) and
:class:`RewardModelScorer` (an ``AutoModelForSequenceClassification`` with one scalar output).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from treg.errors import TregError

Scorer = Callable[[Sequence[Any], Sequence[str]], list]


# --------------------------------------------------------------------------- reward functions

def load_reward_fn(spec: str) -> Callable[[Any, str], float]:
    """Import ``module:function`` or ``path/to/file.py:function`` and return the function.

    The function receives ``(prompt, response)`` with the prompt as stored (str or messages) and must
    return a finite number.
    """
    if ":" not in spec:
        raise TregError(f"--reward-fn must look like 'module:function' or 'file.py:function', got {spec!r}")
    target, _, name = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.exists():
                raise TregError("reward-function file not found", file=target)
            mod_name = f"treg_reward_fn_{abs(hash(str(path.resolve())))}"
            spec_obj = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(spec_obj)
            sys.modules[mod_name] = module
            spec_obj.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except TregError:
        raise
    except Exception as err:  # the user's module failed to import: name it, no traceback
        raise TregError(f"cannot import reward-function module {target!r}: {type(err).__name__}: {err}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise TregError(f"{target!r} has no callable {name!r}")
    return fn


def fn_scorer(fn: Callable[[Any, str], float]) -> Scorer:
    """Wrap a ``(prompt, response) -> float`` function as a batch scorer (errors are re-raised as-is)."""
    def score(prompts, responses):
        return [fn(p, r) for p, r in zip(prompts, responses)]
    return score


# --------------------------------------------------------------------------- reward models

def check_reward_model_config(path: str, *, trust_remote_code: bool = False) -> dict:
    """Read the raw config of ``path`` and refuse what cannot be a scalar reward model.

    - custom code (``auto_map`` in config.json) without ``trust_remote_code``: refused, because
      transformers would silently load its built-in class with a freshly initialised head;
    - built-in architectures must be ``*ForSequenceClassification`` with ``num_labels == 1``.
    Returns the config dict.
    """
    from transformers import PretrainedConfig
    from treg.io.fsutil import check_local_path
    check_local_path(path)
    try:
        cfg, _ = PretrainedConfig.get_config_dict(path)
    except Exception as err:
        raise TregError(f"cannot read a model config: {type(err).__name__}: {err}", file=path) from None
    custom = bool(cfg.get("auto_map"))
    if custom and not trust_remote_code:
        raise TregError("this reward model ships custom code (auto_map in config.json); "
                        "review it and pass --trust-remote-code to run it", file=path)
    if custom:
        return cfg
    archs = cfg.get("architectures") or []
    if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
        raise TregError(f"not a reward model: architectures {archs} have no scalar head "
                        "(need *ForSequenceClassification with num_labels=1)", file=path)
    n_labels = cfg.get("num_labels", len(cfg.get("id2label") or {}) or 2)
    if n_labels != 1:
        raise TregError(f"reward model must have num_labels == 1 (one scalar per sequence), got {n_labels}",
                        file=path)
    return cfg


class RewardModelScorer:
    """Score ``(prompt, response)`` with a sequence-classification reward model.

    The conversation ``prompt messages + [assistant: response]`` is tokenized with the reward model's
    own chat template (its tokenizer must have one). Sequences are right-padded in length-sorted
    batches of ``batch_size``; the score is the model's single logit at the last real token (or the
    ``score`` field of custom-code outputs such as ArmoRM's). bf16 on CUDA, fp32 on CPU. Custom-code
    models are scored one sequence at a time, since their padding handling is unknown.
    """

    def __init__(self, path: str, *, trust_remote_code: bool = False, batch_size: int = 8,
                 device=None, dtype: str | None = None):
        import torch

        from treg.io.loading import load_reward_model, load_tokenizer
        cfg = check_reward_model_config(path, trust_remote_code=trust_remote_code)
        self.custom = bool(cfg.get("auto_map"))
        if device is None:
            from accelerate import PartialState
            device = PartialState().device
        self.device = torch.device(device)
        self.tokenizer = load_tokenizer(path, field="reward-model", trust_remote_code=trust_remote_code)
        if not getattr(self.tokenizer, "chat_template", None):
            raise TregError("the reward model's tokenizer has no chat template", file=path)
        model, info = load_reward_model(path, dtype=dtype, device=self.device, trust_remote_code=trust_remote_code)
        missing = [k for k in info.get("missing_keys", []) if "score" in k or "classifier" in k]
        if missing and not self.custom:
            raise TregError(f"not a trained reward model: head weights {missing} are missing from the "
                            "checkpoint (they would be random)", file=path)
        if not self.custom and model.config.num_labels != 1:
            raise TregError(f"reward model must have num_labels == 1, got {model.config.num_labels}", file=path)
        self.model = model.to(self.device).eval()
        self.pad_id = model.config.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.pad_token_id
            model.config.pad_token_id = self.pad_id
        self.batch_size = 1 if self.custom or self.pad_id is None else max(1, batch_size)
        self.path = path

    def encode(self, prompt, response: str) -> list[int]:
        """Token ids of the conversation under the reward model's chat template."""
        messages = list(prompt) if isinstance(prompt, (list, tuple)) else [{"role": "user", "content": prompt}]
        messages = messages + [{"role": "assistant", "content": response}]
        out = self.tokenizer.apply_chat_template(messages, tokenize=True)
        ids = out["input_ids"] if hasattr(out, "keys") else out
        return list(ids)

    def __call__(self, prompts, responses, progress=None) -> list[float]:
        import torch
        seqs = [self.encode(p, r) for p, r in zip(prompts, responses)]
        scores: list[float | None] = [None] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        # Right padding cannot move the pooled position: transformers pools the rightmost non-pad token,
        # the same one with or without padding (batch_size is 1 when there is no pad id).
        groups = [order[k:k + self.batch_size] for k in range(0, len(order), self.batch_size)]
        pad = self.pad_id if self.pad_id is not None else 0
        with torch.no_grad():
            for group in groups:
                width = max(len(seqs[i]) for i in group)
                ids = torch.tensor([seqs[i] + [pad] * (width - len(seqs[i])) for i in group], device=self.device)
                mask = torch.tensor([[1] * len(seqs[i]) + [0] * (width - len(seqs[i])) for i in group],
                                    device=self.device)
                out = self.model(input_ids=ids, attention_mask=mask)
                val = getattr(out, "score", None)
                val = out.logits if val is None else val
                val = val.float().reshape(len(group), -1)
                if val.shape[1] != 1:
                    raise TregError(f"reward model returned {val.shape[1]} values per sequence, need 1",
                                    file=self.path)
                for i, v in zip(group, val[:, 0].tolist()):
                    scores[i] = v
                if progress is not None:
                    progress(len(group))
        return scores


# --------------------------------------------------------------------------- pairs

@dataclass
class PairStats:
    """Counts and means for the score summary table."""
    prompts: int = 0
    kept: int = 0
    dropped_tie: int = 0
    dropped_margin: int = 0
    sum_chosen: float = 0.0
    sum_rejected: float = 0.0
    sum_len_chosen: int = 0
    sum_len_rejected: int = 0

    def as_dict(self) -> dict:
        k = max(self.kept, 1)
        return {"prompts": self.prompts, "pairs_kept": self.kept, "dropped_ties": self.dropped_tie,
                "dropped_below_margin": self.dropped_margin,
                "mean_score_chosen": self.sum_chosen / k if self.kept else None,
                "mean_score_rejected": self.sum_rejected / k if self.kept else None,
                "mean_chars_chosen": self.sum_len_chosen / k if self.kept else None,
                "mean_chars_rejected": self.sum_len_rejected / k if self.kept else None}


def check_scores(scores: Sequence, *, row: int, file: str | None = None) -> list[float]:
    """Every score a finite float, else a TregError naming the row and the response index."""
    out = []
    for j, s in enumerate(scores):
        try:  # a str ("0.7") or bool would convert silently: refuse them, they are a wrong return type
            if isinstance(s, (str, bytes, bool)):
                raise TypeError
            v = float(s)
        except (TypeError, ValueError):
            raise TregError(f"score {s!r} ({type(s).__name__}) is not a number", file=file, row=row,
                            field=f"responses[{j}]") from None
        if not math.isfinite(v):
            raise TregError(f"score is {v} (must be finite)", file=file, row=row, field=f"responses[{j}]")
        out.append(v)
    return out


def make_pair(row: dict, scores: list[float], min_margin: float, stats: PairStats) -> dict | None:
    """Best/worst pair of one scored row (METHOD.md §6: highest = chosen, lowest = rejected).

    Ties (best == worst) and margins below ``min_margin`` return ``None`` and are counted in ``stats``.
    The first response wins among equal best scores, the last among equal worst (deterministic).
    """
    stats.prompts += 1
    responses = row["responses"]
    best = max(range(len(scores)), key=lambda j: (scores[j], -j))
    worst = min(range(len(scores)), key=lambda j: (scores[j], -j))
    margin = scores[best] - scores[worst]
    if margin == 0:
        stats.dropped_tie += 1
        return None
    if margin < min_margin:
        stats.dropped_margin += 1
        return None
    chosen, rejected = responses[best], responses[worst]
    stats.kept += 1
    stats.sum_chosen += scores[best]
    stats.sum_rejected += scores[worst]
    stats.sum_len_chosen += len(chosen)
    stats.sum_len_rejected += len(rejected)
    prompt = row["prompt"]
    if isinstance(prompt, (list, tuple)):  # TRL conversational preference format
        chosen = [{"role": "assistant", "content": chosen}]
        rejected = [{"role": "assistant", "content": rejected}]
    return {"prompt": prompt, "prompt_id": str(row["prompt_id"]), "chosen": chosen, "rejected": rejected,
            "score_chosen": scores[best], "score_rejected": scores[worst], "all_scores": scores}


# --------------------------------------------------------------------------- the `treg score` run

def read_samples(source: str) -> tuple[list[dict], str, str]:
    """Rows ``{prompt, prompt_id, responses}`` from a samples dataset (or any JSONL/Parquet/datasets
    source with ``prompt`` and ``responses``). Returns ``(rows, label, input_fingerprint)``."""
    from treg.io.chat import normalize_messages, read_records
    from treg.io.meta import read_meta, stable_hash
    from treg.io.fsutil import check_local_path
    check_local_path(source)
    records, label = read_records(source)
    if not records:
        raise TregError("no rows", file=label)
    rows = []
    for index, (row, rec) in enumerate(records):
        for f in ("prompt", "responses"):
            if rec.get(f) is None:
                raise TregError("missing field", file=label, row=row, field=f)
        prompt = rec["prompt"]
        if not isinstance(prompt, str):
            prompt = normalize_messages(prompt, file=label, row=row, field="prompt")
        resp = rec["responses"]
        if not isinstance(resp, list) or not all(isinstance(r, str) for r in resp):
            raise TregError("must be a list of strings", file=label, row=row, field="responses")
        if len(resp) < 2:
            raise TregError(f"{len(resp)} response(s): no pair possible (sample with --n >= 2)",
                            file=label, row=row, field="responses")
        pid = rec.get("prompt_id")
        rows.append({"prompt": prompt, "prompt_id": str(index if pid is None else pid), "responses": resp,
                     "row": row})
    meta = read_meta(source, required=False) if Path(source).is_dir() else {}
    fp = meta.get("fingerprint") or stable_hash([(r["prompt"], r["responses"]) for r in rows])
    return rows, label, fp


def reward_fingerprint(reward_model: str | None, reward_fn: str | None) -> str:
    """Identity of the scorer: the reward model's files, or the reward function's source code."""
    import inspect
    from treg.io.meta import stable_hash
    from treg.stages.sampling import path_fingerprint
    if bool(reward_model) == bool(reward_fn):
        raise TregError("give exactly one of --reward-model / --reward-fn")
    if reward_model:
        return stable_hash({"reward_model": reward_model, "files": path_fingerprint(reward_model)})
    fn = load_reward_fn(reward_fn)
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        src = None
    return stable_hash({"reward_fn": reward_fn, "source": src})


def make_scorer(*, reward_model: str | None = None, reward_fn: str | None = None,
                trust_remote_code: bool = False, batch_size: int = 8) -> tuple[Scorer, str]:
    """``(scorer, description)`` from exactly one of ``reward_model`` / ``reward_fn``."""
    if bool(reward_model) == bool(reward_fn):
        raise TregError("give exactly one of --reward-model / --reward-fn")
    if reward_model:
        return RewardModelScorer(reward_model, trust_remote_code=trust_remote_code, batch_size=batch_size), \
            f"reward model {reward_model}"
    return fn_scorer(load_reward_fn(reward_fn)), f"reward function {reward_fn}"


def score_rows(scorer: Scorer, rows: list[dict], *, label: str, is_fn: bool, progress=None) -> list[list[float]]:
    """Scores of every response of every row; any failure names the row (and response). ``progress(k)``
    is called as ``k`` more responses are scored (per response for a function, per batch for a model)."""
    prompts = [r["prompt"] for r in rows for _ in r["responses"]]
    responses = [x for r in rows for x in r["responses"]]
    if is_fn:  # a user function: call per row so that an exception names its row
        flat = []
        for r in rows:
            for j, resp in enumerate(r["responses"]):
                try:
                    flat.append(scorer([r["prompt"]], [resp])[0])
                    if progress is not None:
                        progress(1)
                except Exception as err:  # the user's function failed: name where, no traceback
                    raise TregError(f"the reward function raised {type(err).__name__}: {err}", file=label,
                                    row=r["row"], field=f"responses[{j}]") from None
    elif isinstance(scorer, RewardModelScorer):
        flat = scorer(prompts, responses, progress=progress)
    else:
        flat = scorer(prompts, responses)
        if progress is not None:
            progress(len(responses))
    out, k = [], 0
    for r in rows:
        m = len(r["responses"])
        out.append(check_scores(flat[k:k + m], row=r["row"], file=label))
        k += m
    return out


def score(samples: str, output: str, *, reward_model: str | None = None, reward_fn: str | None = None,
          trust_remote_code: bool = False, min_margin: float = 0.0, batch_size: int = 8,
          shard_size: int = 64, overwrite: bool = False, progress: bool = True) -> tuple[dict, PairStats]:
    """Run ``treg score`` (module docstring). Scores go to resumable shards under ``output/.shards``;
    rank 0 then writes the pairs dataset atomically. Returns ``(meta, stats)``."""
    import datasets
    from accelerate import PartialState
    from treg.io.shards import ShardedWriter
    if min_margin < 0:
        raise TregError("--min-margin must be >= 0", field="min_margin")
    rows, label, in_fp = read_samples(samples)
    if reward_model:  # refuse a wrong or untrusted model before anything is written
        check_reward_model_config(reward_model, trust_remote_code=trust_remote_code)
    settings = {"stage": "score", "samples": in_fp, "reward": reward_fingerprint(reward_model, reward_fn),
                "min_margin": min_margin, "shard_size": shard_size}
    state = PartialState()
    writer = ShardedWriter.for_rows(output, rows, shard_size=shard_size, settings=settings, state=state,
                                    overwrite=overwrite)
    pending = writer.pending_shards()
    if pending:
        scorer, _ = make_scorer(reward_model=reward_model, reward_fn=reward_fn,
                                trust_remote_code=trust_remote_code, batch_size=batch_size)
        from treg.progress import progress_bar
        total = sum(len(r["responses"]) for i in pending for r in writer.shard_rows(i))
        with progress_bar(total, "score", "resp", enabled=progress and state.is_main_process) as bar:

            def work(i: int, shard: list) -> list[dict]:
                scores = score_rows(scorer, shard, label=label, is_fn=reward_fn is not None, progress=bar.update)
                return [{"prompt": r["prompt"], "prompt_id": r["prompt_id"], "responses": r["responses"],
                         "scores": s} for r, s in zip(shard, scores)]

            writer.run(work)
    state.wait_for_everyone()
    stats = PairStats()
    meta = {"stage": "score", "samples": samples, "reward_model": reward_model, "reward_fn": reward_fn,
            "min_margin": min_margin, "fingerprint": writer.fingerprint}
    if writer.complete:  # finished before: report from the existing output
        from treg.io.meta import read_meta
        return read_meta(output), stats
    if state.is_main_process:
        scored = writer.load_shards().to_list()
        pairs = [p for r in scored if (p := make_pair(r, [float(x) for x in r["scores"]], min_margin, stats))]
        if not pairs:
            raise TregError(f"no pairs kept: {stats.dropped_tie} tied, {stats.dropped_margin} below "
                            f"--min-margin {min_margin} (of {stats.prompts} prompts)", file=samples)
        meta.update(stats.as_dict())
        writer.save_final(datasets.Dataset.from_list(pairs), meta)  # (drops an --overwrite run's staging)
    state.wait_for_everyone()
    return meta, stats
