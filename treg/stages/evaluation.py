"""Benchmark output files and pairwise win rates.

Output formats written by ``treg generate`` (one record per prompt):

- ``alpaca_eval``: one JSON list ``[{"instruction", "output", "generator", "dataset"}]`` — what
  AlpacaEval 2 reads as ``--model_outputs`` (its loader is ``pandas.read_json`` on the file).
- ``arena_hard``: JSON Lines in Arena-Hard-Auto's model-answer schema (``gen_answer.py``):
  ``{"question_id", "answer_id", "model_id", "choices": [{"index": 0, "turns": [{"content",
  "token_len"}]}], "tstamp", "conv_metadata": {"token_len", "header_count", "list_count",
  "bold_count"}}``. ``token_len`` counts tokens of *our* tokenizer (Arena-Hard uses tiktoken's
  gpt-3.5 encoding; it only enters its optional style control).
- ``jsonl``: ``{"prompt_id", "prompt", "output", "generator", "n_tokens", "finish_reason"}`` per line.

Win rates (:func:`win_rate_stats`): per paired prompt the outcome is 1 (A's score > B's), 0.5 (tie)
or 0; the win rate is their mean, with a percentile-bootstrap 95% interval over prompts. The
length-controlled win rate fits ``P(A wins) = sigmoid(b0 + b1 * tanh(d / sd(d)))`` with ``d`` the
difference of output lengths in characters (A - B), by maximum likelihood (Newton's method, ties as
two half-weighted observations), and reports ``sigmoid(b0)``: the predicted win rate at zero length
difference. This follows the length term of AlpacaEval-LC's GLM, without its per-instruction terms.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from treg.errors import TregError
from treg.io.fsutil import atomic_write_text
from treg.io.meta import stable_hash

FORMATS = ("alpaca_eval", "arena_hard", "jsonl")


# --------------------------------------------------------------------------- writing

def markdown_counts(text: str) -> dict:
    """Markdown element counts in Arena-Hard's ``conv_metadata`` layout (code blocks excluded)."""
    text = re.sub(r"```[^`]*```", "", text)
    return {
        "header_count": {f"h{k}": len(re.findall(rf"^#{{{k}}}\s", text, re.MULTILINE)) for k in range(1, 7)},
        "list_count": {"ordered": len(re.findall(r"^\s*\d+\.\s", text, re.MULTILINE)),
                       "unordered": len(re.findall(r"^\s*[-*+]\s", text, re.MULTILINE))},
        "bold_count": {"**": len(re.findall(r"\*\*[^*\n]+\*\*", text)),
                       "__": len(re.findall(r"__[^_\n]+__", text))},
    }


def prompt_text(prompt) -> str:
    """The instruction text of a prompt: the string itself, or the last user message's content."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else str(prompt[-1]["content"])


def format_records(records: Sequence[dict], fmt: str, generator: str) -> str:
    """Serialise generated records into the text of a benchmark file.

    Each record: ``prompt`` (str or messages), ``prompt_id`` (str), ``output`` (str), ``n_tokens``
    (int), ``finish_reason`` (str) and optionally ``dataset`` (str, AlpacaEval's subset name).
    """
    if fmt == "alpaca_eval":
        rows = [{"instruction": prompt_text(r["prompt"]), "output": r["output"], "generator": generator,
                 "dataset": r.get("dataset") or "treg"} for r in records]
        return json.dumps(rows, indent=2, ensure_ascii=False) + "\n"
    if fmt == "arena_hard":
        now = time.time()
        lines = []
        for r in records:
            lines.append(json.dumps({
                "question_id": r["prompt_id"],
                "answer_id": stable_hash([generator, r["prompt_id"], r["output"]]),
                "model_id": generator,
                "choices": [{"index": 0, "turns": [{"content": r["output"], "token_len": r["n_tokens"]}]}],
                "tstamp": now,
                "conv_metadata": {"token_len": r["n_tokens"], **markdown_counts(r["output"])},
            }, ensure_ascii=False))
        return "\n".join(lines) + "\n"
    if fmt == "jsonl":
        return "".join(json.dumps({"prompt_id": r["prompt_id"], "prompt": r["prompt"], "output": r["output"],
                                   "generator": generator, "n_tokens": r["n_tokens"],
                                   "finish_reason": r["finish_reason"]}, ensure_ascii=False) + "\n"
                       for r in records)
    raise TregError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")


def write_outputs(records: Sequence[dict], path: str, fmt: str, generator: str, meta: dict) -> None:
    """Write a benchmark file atomically, plus ``<path>.treg_meta.json`` (meta incl. fingerprint)."""
    atomic_write_text(path, format_records(records, fmt, generator))
    from treg import __version__
    atomic_write_text(f"{path}.treg_meta.json",
                       json.dumps({"treg_version": __version__, **meta}, indent=2, sort_keys=True, default=str))


# --------------------------------------------------------------------------- reading

def read_outputs(path: str, *, questions: str | None = None) -> dict[str, dict]:
    """Read a benchmark file (any of :data:`FORMATS`, detected from its content) into
    ``{key: {"prompt": str | messages, "output": str}}``, keyed by instruction text (AlpacaEval, and
    JSONL rows), or by ``question_id`` (Arena-Hard, whose prompts come from ``questions``: its
    ``question.jsonl`` with ``turns[0].content``). Rows are 1-based in errors; a repeated key is an
    error (pairing by it would silently drop rows)."""
    p = Path(path)
    if not p.is_file():
        raise TregError("no such file", file=path)
    text = p.read_text(encoding="utf-8")
    out: dict[str, dict] = {}

    def add(key: str, row: int, prompt, output) -> None:
        if key in out:
            raise TregError(f"repeats the instruction / question_id {key[:60]!r} of an earlier row", file=path,
                            row=row)
        out[key] = {"prompt": prompt, "output": output}

    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise TregError(f"unreadable JSON ({err.msg} at line {err.lineno})", file=path) from None
        for i, r in enumerate(rows, start=1):
            for f in ("instruction", "output"):
                if not isinstance(r, dict) or not isinstance(r.get(f), str):
                    raise TregError("missing or non-string field", file=path, row=i, field=f)
            add(r["instruction"], i, r["instruction"], r["output"])
        return out
    qtext = _read_questions(questions) if questions else None
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as err:
            raise TregError(f"malformed JSON line ({err.msg})", file=path, row=i) from None
        if not isinstance(r, dict):
            raise TregError("expected a JSON object per line", file=path, row=i)
        if "choices" in r:  # Arena-Hard model answer
            qid = str(r.get("question_id"))
            try:
                output = r["choices"][0]["turns"][-1]["content"]
            except (KeyError, IndexError, TypeError):
                raise TregError("no choices[0].turns[-1].content", file=path, row=i, field="choices") from None
            if qtext is None:
                raise TregError("Arena-Hard answers carry no prompt: pass --questions question.jsonl", file=path)
            if qid not in qtext:
                raise TregError(f"question_id not found in {questions}", file=path, row=i, field="question_id")
            add(qid, i, qtext[qid], output)
        else:
            for f in ("prompt", "output"):
                if f not in r:
                    raise TregError("missing field", file=path, row=i, field=f)
            add(prompt_text(r["prompt"]), i, r["prompt"], r["output"])
    return out


def _read_questions(path: str) -> dict[str, str]:
    """Arena-Hard ``question.jsonl``: ``{question_id: turns[0].content}``."""
    if not Path(path).is_file():
        raise TregError("no such file", file=path)
    q = {}
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                r = json.loads(line)
                q[str(r["question_id"])] = r["turns"][0]["content"]
            except (json.JSONDecodeError, KeyError, IndexError, TypeError):
                raise TregError("need question_id and turns[0].content", file=path, row=i) from None
    return q


# --------------------------------------------------------------------------- statistics

def fit_logistic(x: np.ndarray, y: np.ndarray, w: np.ndarray, *, iters: int = 50) -> tuple[float, float]:
    """Weighted maximum-likelihood logistic regression ``P(y=1) = sigmoid(b0 + b1 x)`` by Newton's
    method (a tiny ridge of 1e-6 keeps the Hessian invertible). Returns ``(b0, b1)``."""
    X = np.stack([np.ones_like(x), x], axis=1)
    b = np.zeros(2)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(X @ b)))
        grad = X.T @ (w * (y - p)) - 1e-6 * b
        hess = (X * (w * p * (1 - p))[:, None]).T @ X + 1e-6 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        b = b + step
        if np.max(np.abs(step)) < 1e-10:
            break
    return float(b[0]), float(b[1])


def length_controlled_win_rate(outcome: np.ndarray, len_diff: np.ndarray) -> tuple[float, str]:
    """Win rate at zero length difference (see module docstring). Returns ``(rate, note)``; when every
    outcome is the same (no contrast to fit) the raw win rate is returned and the note says so."""
    outcome = np.asarray(outcome, dtype=float)
    if np.all(outcome == outcome[0]) and outcome[0] in (0.0, 1.0):
        return float(outcome.mean()), "all outcomes equal: LC = raw win rate"
    sd = float(np.std(len_diff, ddof=1)) if len(len_diff) > 1 else 0.0  # pandas' .std(), as AlpacaEval
    x = np.tanh(np.asarray(len_diff, float) / sd) if sd > 0 else np.zeros(len(outcome))
    # a tie counts as half a win and half a loss: two observations of weight 0.5
    xs = np.concatenate([x, x])
    ys = np.concatenate([np.ones_like(outcome), np.zeros_like(outcome)])
    ws = np.concatenate([outcome, 1.0 - outcome])
    b0, _ = fit_logistic(xs, ys, ws)
    return 1.0 / (1.0 + math.exp(-b0)), "logistic fit on tanh(length diff / sd)"


def win_rate_stats(scores_a: Sequence[float], scores_b: Sequence[float], len_a: Sequence[int],
                   len_b: Sequence[int], *, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Paired win rate of A over B with a bootstrap 95% interval and the length-controlled rate.

    All inputs are aligned per prompt (equal length n >= 1). Rates are percentages.
    """
    a, b = np.asarray(scores_a, float), np.asarray(scores_b, float)
    if len(a) == 0:
        raise TregError("no paired prompts to compare")
    outcome = np.where(a > b, 1.0, np.where(a < b, 0.0, 0.5))
    rng = np.random.default_rng(seed)
    boots = outcome[rng.integers(0, len(outcome), size=(n_boot, len(outcome)))].mean(axis=1)
    lc, note = length_controlled_win_rate(outcome, np.asarray(len_a, float) - np.asarray(len_b, float))
    return {"n": int(len(a)), "wins": int((outcome == 1).sum()), "ties": int((outcome == 0.5).sum()),
            "losses": int((outcome == 0).sum()), "win_rate": 100 * float(outcome.mean()),
            "ci95_low": 100 * float(np.percentile(boots, 2.5)),
            "ci95_high": 100 * float(np.percentile(boots, 97.5)),
            "lc_win_rate": 100 * lc, "lc_note": note,
            "mean_chars_a": float(np.mean(len_a)), "mean_chars_b": float(np.mean(len_b)),
            "mean_score_a": float(a.mean()), "mean_score_b": float(b.mean())}


# --------------------------------------------------------------------------- the two runs

def generate(model_path: str, prompts: str, output: str, *, fmt: str = "jsonl", generator: str | None = None,
             temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 1024, seed: int = 0,
             batch_size: int = 16, prompt_column: str | None = None, split: str = "train",
             limit: int | None = None, dtype: str | None = None, use_chat_template: bool = True,
             progress: bool = True, backend: str = "hf", tensor_parallel_size: int = 1) -> dict:
    """Run ``treg generate``: one response per prompt (greedy when ``temperature == 0``, else seeded
    sampling as in :mod:`treg.stages.sampling`), written as a benchmark file in ``fmt`` plus
    ``<output>.treg_meta.json``. Returns the meta."""
    from treg.io.chat import ChatFormat
    from treg.io.meta import tokenizer_fingerprint
    from treg.stages.sampling import (hf_generate, load_policy, load_prompt_rows, path_fingerprint, row_seed,
                               stop_token_ids)
    if fmt not in FORMATS:
        raise TregError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}", field="format")
    # alpaca_eval picks its reader by the suffix; Arena-Hard globs model_answer/*.jsonl
    suffix = {"alpaca_eval": ".json", "arena_hard": ".jsonl"}.get(fmt)
    if suffix and not output.endswith(suffix):
        raise TregError(f"a --format {fmt} file must end in {suffix} (the benchmark's loader reads it by that name)",
                        file=output)
    if temperature < 0 or not 0 < top_p <= 1 or max_new_tokens < 1 or batch_size < 1:
        raise TregError("need temperature >= 0, 0 < top_p <= 1, max_new_tokens >= 1, batch_size >= 1")
    rows, label = load_prompt_rows(prompts, prompt_column=prompt_column, split=split, limit=limit)
    if use_chat_template:  # a tokenizer without chat template: one line before minutes of model loading
        from treg.stages.sampling import load_tokenizer
        ChatFormat(load_tokenizer(model_path), use_chat_template=True, file=model_path)
    if backend == "vllm":
        import importlib.util
        from treg.stages.sampling import load_generation_config, load_tokenizer, vllm_engine, vllm_generate
        if importlib.util.find_spec("vllm") is None:
            raise TregError("--backend vllm needs the 'vllm' package; use --backend hf", field="backend")
        model, tokenizer = load_generation_config(model_path), load_tokenizer(model_path)
    else:
        model, tokenizer = load_policy(model_path, dtype=dtype)
    chat = ChatFormat(tokenizer, use_chat_template=use_chat_template, file=model_path)
    contexts = [chat.context_ids(r.messages) for r in rows]
    seeds = [row_seed(seed, r.prompt_id, 0) for r in rows]
    stops = stop_token_ids(model, tokenizer, chat)
    if backend == "vllm":
        llm = vllm_engine(model_path, dtype=dtype, tensor_parallel_size=tensor_parallel_size)
        outs = vllm_generate(llm, contexts, seeds, stop_ids=stops, temperature=temperature, top_p=top_p,
                             max_new_tokens=max_new_tokens)
    else:
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(rows), desc="generate", unit="prompt")
        outs = hf_generate(model, tokenizer, contexts, seeds, stop_ids=stops, temperature=temperature, top_p=top_p,
                           max_new_tokens=max_new_tokens, batch_size=batch_size,
                           progress=bar.update if bar else None)
        if bar:
            bar.close()
    generator = generator or Path(model_path.rstrip("/")).name
    records = [{"prompt": r.value if isinstance(r.value, str) else r.messages, "prompt_id": r.prompt_id,
                "dataset": r.extra.get("dataset"), "output": o["text"], "n_tokens": o["n_tokens"],
                "finish_reason": o["finish_reason"]} for r, o in zip(rows, outs)]
    settings = {"stage": "generate", "model": path_fingerprint(model_path), "format": fmt,
                "prompts": stable_hash([(r.prompt_id, r.messages) for r in rows]), "generator": generator,
                "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed,
                "use_chat_template": use_chat_template, "backend": backend}
    meta = {"stage": "generate", "model": model_path, "source": label, "format": fmt, "generator": generator,
            "prompts": len(rows), "temperature": temperature, "max_new_tokens": max_new_tokens,
            "truncated": sum(o["finish_reason"] == "length" for o in outs),
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "fingerprint": stable_hash(settings)}
    write_outputs(records, output, fmt, generator, meta)
    return meta


def evaluate(outputs: str, baseline: str, *, judge: str | None = None, reward_fn: str | None = None,
             trust_remote_code: bool = False, questions: str | None = None, batch_size: int = 8,
             n_boot: int = 2000, seed: int = 0, allow_unpaired: bool = False) -> dict:
    """Run ``treg eval``: score both files' outputs with one judge, pair them by instruction (or
    Arena-Hard ``question_id``) and return :func:`win_rate_stats` plus pairing counts.

    The two files must hold the same instruction set: a row of either without a partner is an error
    (a win rate on a silent subset is misleading) unless ``allow_unpaired``, which scores the shared
    rows only and reports the unpaired counts."""
    from treg.stages.scoring import make_scorer, score_rows
    a, b = read_outputs(outputs, questions=questions), read_outputs(baseline, questions=questions)
    keys = [k for k in a if k in b]
    if not keys:
        raise TregError("no instruction is shared by the two files: nothing to pair", file=baseline)
    if not allow_unpaired and len(keys) != max(len(a), len(b)):
        missing = next((k for k in a if k not in b), None) or next(k for k in b if k not in a)
        raise TregError(f"the two files hold different instruction sets ({len(a) - len(keys)} of {outputs} and "
                        f"{len(b) - len(keys)} of {baseline} unpaired, e.g. {missing[:60]!r}); pass "
                        "--allow-unpaired to compare the shared ones only", file=baseline)
    scorer, desc = make_scorer(reward_model=judge, reward_fn=reward_fn, trust_remote_code=trust_remote_code,
                               batch_size=batch_size)
    rows = [{"prompt": a[k]["prompt"], "responses": [a[k]["output"], b[k]["output"]], "row": i + 1}
            for i, k in enumerate(keys)]
    scores = score_rows(scorer, rows, label=outputs, is_fn=reward_fn is not None)
    stats = win_rate_stats([s[0] for s in scores], [s[1] for s in scores],
                           [len(a[k]["output"]) for k in keys], [len(b[k]["output"]) for k in keys],
                           n_boot=n_boot, seed=seed)
    return {"outputs": outputs, "baseline": baseline, "judge": desc, "unpaired_outputs": len(a) - len(keys),
            "unpaired_baseline": len(b) - len(keys), **stats}


def run_alpaca_eval(outputs: str, baseline: str | None, extra: Sequence[str] = ()) -> int:
    """Hand the outputs to the ``alpaca_eval`` CLI (GPT-4 judge). Needs the package and an API key;
    refuses clearly otherwise — treg never imitates the official judge."""
    import importlib.util
    import shutil
    import subprocess
    if importlib.util.find_spec("alpaca_eval") is None or shutil.which("alpaca_eval") is None:
        raise TregError("--alpaca-eval needs the 'alpaca_eval' package (pip install alpaca-eval)")
    if not os.environ.get("OPENAI_API_KEY"):
        raise TregError("--alpaca-eval needs OPENAI_API_KEY (its default judge is a GPT-4 model)")
    cmd = ["alpaca_eval", "--model_outputs", outputs]
    if baseline:
        cmd += ["--reference_outputs", baseline]
    return subprocess.call(cmd + list(extra))
