"""Benchmark output files and pairwise win rates.

Output formats written by ``treg generate`` are the entries of :data:`treg.io.formats.OUTPUT_FORMATS`
(alpaca_eval, arena_hard, jsonl: one record per prompt).

Win rates (:func:`win_rate_stats`): per paired prompt the outcome is 1 (A's score > B's), 0.5 (tie)
or 0; the win rate is their mean (AlpacaEval's ``win_rate``; its ``discrete_win_rate`` is the same for
these discrete outcomes), with its standard error and a percentile-bootstrap 95% interval over prompts.
The length-controlled win rate is AlpacaEval 0.6.6's (:mod:`treg.stages.lc`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from treg.errors import TregError
from treg.io.fsutil import atomic_file, read_text_strict
from treg.io.formats import OUTPUT_FORMATS, format_records, prompt_text  # noqa: F401  (format_records: API)
from treg.io.meta import stable_hash

FORMATS = tuple(OUTPUT_FORMATS)


# --------------------------------------------------------------------------- writing

def write_outputs(records: Sequence[dict], path: str, fmt: str, generator: str, meta: dict) -> None:
    """Write a benchmark file atomically, plus ``<path>.treg_meta.json`` (meta incl. fingerprint): both are
    written in full before either is renamed into place, so a failed write (a full disk, a file-size limit)
    leaves the old pair as it was."""
    from treg import __version__
    with atomic_file(path) as out_tmp, atomic_file(f"{path}.treg_meta.json") as meta_tmp:
        out_tmp.write_text(format_records(records, fmt, generator), encoding="utf-8")
        meta_tmp.write_text(json.dumps({"treg_version": __version__, **meta}, indent=2, sort_keys=True, default=str),
                            encoding="utf-8")


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
    text = read_text_strict(p, what="outputs file")
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
    for i, line in enumerate(text.split("\n"), start=1):
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
    for i, line in enumerate(read_text_strict(path, what="questions file").split("\n"), start=1):
        if line.strip():
            try:
                r = json.loads(line)
                q[str(r["question_id"])] = r["turns"][0]["content"]
            except (json.JSONDecodeError, KeyError, IndexError, TypeError):
                raise TregError("need question_id and turns[0].content", file=path, row=i) from None
    return q


# --------------------------------------------------------------------------- statistics

def win_rate_stats(scores_a: Sequence[float], scores_b: Sequence[float], len_a: Sequence[int],
                   len_b: Sequence[int], *, n_boot: int = 2000, seed: int = 0, lc_gamed: str | None = None,
                   lc_glm: str | None = None) -> dict[str, Any]:
    """Paired win rate of A (the model) over B (the baseline) with a bootstrap 95% interval and
    AlpacaEval's length-controlled rate (``lc_gamed``: its ``df_gamed.csv``; ``lc_glm``: see
    :func:`treg.stages.lc.lc_win_rate`).

    All inputs are aligned per prompt (equal length n >= 1), in the order of A's file (the position
    indexes AlpacaEval's instruction difficulty). Rates are percentages.
    """
    from treg.stages.lc import lc_win_rate, read_gamed
    a, b = np.asarray(scores_a, float), np.asarray(scores_b, float)
    if len(a) == 0:
        raise TregError("no paired prompts to compare")
    outcome = np.where(a > b, 1.0, np.where(a < b, 0.0, 0.5))
    rng = np.random.default_rng(seed)
    boots = outcome[rng.integers(0, len(outcome), size=(n_boot, len(outcome)))].mean(axis=1)
    lc = lc_win_rate(outcome, len_a, len_b, gamed=read_gamed(lc_gamed) if lc_gamed else None, glm=lc_glm)
    sem = float(np.std(outcome, ddof=1) / np.sqrt(len(outcome))) if len(outcome) > 1 else float("nan")
    return {"n": int(len(a)), "wins": int((outcome == 1).sum()), "ties": int((outcome == 0.5).sum()),
            "losses": int((outcome == 0).sum()), "win_rate": 100 * float(outcome.mean()),
            "discrete_win_rate": 100 * float(outcome.mean()), "standard_error": 100 * sem,
            "ci95_low": 100 * float(np.percentile(boots, 2.5)),
            "ci95_high": 100 * float(np.percentile(boots, 97.5)), **lc,
            "mean_chars_a": float(np.mean(len_a)), "mean_chars_b": float(np.mean(len_b)),
            "mean_score_a": float(a.mean()), "mean_score_b": float(b.mean())}


# --------------------------------------------------------------------------- the two runs

def generate(model_path: str, prompts: str, output: str, *, fmt: str = "jsonl", generator: str | None = None,
             temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 1024, seed: int = 0,
             batch_size: int = 16, prompt_column: str | None = None, split: str = "train",
             limit: int | None = None, dtype: str | None = None, use_chat_template: bool = True,
             progress: bool = True, backend: str = "hf", tensor_parallel_size: int = 1,
             gpu_memory_utilization: float | None = None, max_model_len: int | None = None) -> dict:
    """Run ``treg generate``: one response per prompt (greedy when ``temperature == 0``, else seeded
    sampling as in :mod:`treg.stages.sampling`), written as a benchmark file in ``fmt`` plus
    ``<output>.treg_meta.json``. Returns the meta."""
    from treg.io.chat import ChatFormat
    from treg.io.meta import tokenizer_fingerprint
    from treg.stages.sampling import (hf_generate, load_policy, load_prompt_rows, path_fingerprint, row_seed,
                               stop_token_ids)
    if fmt not in FORMATS:
        raise TregError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}", field="format")
    suffix = OUTPUT_FORMATS[fmt].suffix  # the benchmark's loader reads the file by its suffix
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
        from treg.extras import available, install_hint
        from treg.io.loading import load_tokenizer
        from treg.stages.sampling import load_generation_config, vllm_engine, vllm_generate
        if not available("vllm"):
            raise TregError(f"--backend vllm needs the optional package 'vllm': {install_hint('vllm')}; or use "
                            "--backend hf", field="backend")
        model, tokenizer = load_generation_config(model_path), load_tokenizer(model_path)
    else:
        model, tokenizer = load_policy(model_path, dtype=dtype)
    chat = ChatFormat(tokenizer, use_chat_template=use_chat_template, file=model_path)
    contexts = [chat.context_ids(r.messages) for r in rows]
    seeds = [row_seed(seed, r.prompt_id, 0) for r in rows]
    stops = stop_token_ids(model, tokenizer, chat)
    if backend == "vllm":
        llm = vllm_engine(model_path, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                          gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len)
        outs = vllm_generate(llm, contexts, seeds, stop_ids=stops, temperature=temperature, top_p=top_p,
                             max_new_tokens=max_new_tokens)
    else:
        from treg.progress import progress_bar
        with progress_bar(len(rows), "generate", "prompt", enabled=progress) as bar:
            outs = hf_generate(model, tokenizer, contexts, seeds, stop_ids=stops, temperature=temperature,
                               top_p=top_p, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               progress=bar.update)
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
             n_boot: int = 2000, seed: int = 0, allow_unpaired: bool = False, lc_gamed: str | None = None,
             lc_glm: str | None = None, progress: bool = True) -> dict:
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
    from treg.progress import progress_bar
    with progress_bar(2 * len(rows), "eval", "output", enabled=progress) as bar:
        scores = score_rows(scorer, rows, label=outputs, is_fn=reward_fn is not None, progress=bar.update)
    stats = win_rate_stats([s[0] for s in scores], [s[1] for s in scores],
                           [len(a[k]["output"]) for k in keys], [len(b[k]["output"]) for k in keys],
                           n_boot=n_boot, seed=seed, lc_gamed=lc_gamed, lc_glm=lc_glm)
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
