"""Results and reports of ``treg demo``, recomputed from the saved per-seed files only.

Inputs under ``out`` (written by :mod:`treg.toy.demo`): ``eval/<method>/seed<s>.jsonl`` (one judged
sample per line: ``reward``, ``exact``, ``length``, ...), ``tokens/seed<s>.jsonl`` (training pairs
with per-token ``*_contrastive`` / ``*_dpo`` rewards) and ``curves/<method>/seed<s>.json``.

:func:`build_results` -> ``results.json`` (schema in docs/toy.md); :func:`write_reports` ->
``report.md`` and ``report.html`` (tables, base64 PNG learning curves, token heat maps). Every number
in the reports comes from ``results.json`` or those files; nothing is typed in.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from treg.io.fsutil import atomic_write_text

METHOD_ORDER = ("dpo", "dpo_reg", "dpo_reg_static", "dpo_sft", "dpo_reg_dpo_reward", "simpo", "simpo_reg")
LABEL_NAMES = {"dpo": "DPO", "dpo_reg": "DPO-REG", "dpo_reg_static": "DPO-REG, static w",
               "dpo_sft": "DPO-SFT", "dpo_reg_dpo_reward": "DPO-REG, DPO reward", "simpo": "SimPO",
               "simpo_reg": "SimPO-REG", "reference": "reference (no training)"}


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _seed_of(path: Path) -> int:
    return int(path.stem.removeprefix("seed"))


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0.0 for a single value)."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def summarize_method(directory: Path) -> dict:
    """Per-seed means of one method's eval records, then mean +- std over seeds."""
    from treg.toy.pipeline import summarize
    per_seed = []
    for path in sorted(directory.glob("seed*.jsonl"), key=_seed_of):
        s = summarize(_read_jsonl(path))
        per_seed.append({"seed": _seed_of(path), "reward": s["reward"], "exact_match": s["exact_match"],
                         "length": s["length"], "n": s["n"]})
    r_mean, r_std = mean_std([s["reward"] for s in per_seed])
    e_mean, e_std = mean_std([s["exact_match"] for s in per_seed])
    l_mean, l_std = mean_std([s["length"] for s in per_seed])
    return {"eval_reward_mean": r_mean, "eval_reward_std": r_std, "exact_match": e_mean,
            "exact_match_std": e_std, "mean_length": l_mean, "mean_length_std": l_std, "seeds": per_seed}


def token_quality(out: Path) -> dict:
    """AUROC of contrastive and DPO-implicit token rewards vs ground truth, per seed and mean +- std."""
    from treg.toy.credit import quality
    result: dict = {"contrastive": {"per_seed": []}, "dpo_implicit": {"per_seed": []}}
    for path in sorted((out / "tokens").glob("seed*.jsonl"), key=_seed_of):
        recs = _read_jsonl(path)
        for key, suffix in (("contrastive", "contrastive"), ("dpo_implicit", "dpo")):
            if not recs or f"chosen_{suffix}" not in recs[0]:
                continue
            queries, responses, rewards = [], [], []
            for r in recs:
                for side in ("chosen", "rejected"):
                    queries.append(r["query"])
                    responses.append(r[side])
                    rewards.append(r[f"{side}_{suffix}"])
            q = quality(queries, responses, rewards)
            result[key]["per_seed"].append({"seed": _seed_of(path), **q})
    for key in result:
        for metric in ("auroc", "auroc_vs_incorrect", "auroc_vs_filler"):
            vals = [s[metric] for s in result[key]["per_seed"] if s[metric] is not None]
            m, sd = mean_std(vals) if vals else (None, None)
            result[key][metric], result[key][f"{metric}_std"] = m, sd
    return result


def paired_results(out: Path, names: list[str]) -> dict:
    """Each method minus DPO, paired by test seed and prompt, with bootstrap 95% intervals."""
    from treg.toy.protocol import paired_vs
    per = {n: {_seed_of(p): _read_jsonl(p) for p in (out / "eval" / n).glob("seed*.jsonl")} for n in names}
    return paired_vs(per, "dpo")


def build_results(out: str | os.PathLike, *, config: dict, wall_seconds: float,
                  protocol: dict | None = None) -> dict:
    """results.json content from the files under ``out``; also written there (atomically)."""
    out = Path(out)
    methods = {name: summarize_method(out / "eval" / name) for name in METHOD_ORDER
               if (out / "eval" / name).is_dir()}
    quality = token_quality(out)
    results = {
        "protocol": protocol or {"name": config.get("protocol", "shared")},
        "paired_vs_dpo": paired_results(out, list(methods)),
        "methods": methods,
        "reference": summarize_method(out / "eval" / "reference"),
        "token_reward_auroc": {"contrastive": quality["contrastive"]["auroc"],
                               "dpo_implicit": quality["dpo_implicit"]["auroc"]},
        "token_reward_quality": quality,
        "wall_seconds": round(float(wall_seconds), 1),
        "config": config,
    }
    atomic_write_text(out / "results.json", json.dumps(results, indent=1, default=float))
    return results


def fmt(mean, std=None, digits: int = 3) -> str:
    """``mean +- std`` with fixed digits (the report's only number format)."""
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def method_rows(results: dict) -> list[list[str]]:
    """Rows of the methods table: name, reward, exact match, length, seeds."""
    rows = []
    ref = results["reference"]
    rows.append([LABEL_NAMES["reference"], fmt(ref["eval_reward_mean"]), fmt(ref["exact_match"]),
                 fmt(ref["mean_length"], digits=2), "-"])
    for name, m in results["methods"].items():
        rows.append([f"{LABEL_NAMES.get(name, name)} (`{name}`)", fmt(m["eval_reward_mean"], m["eval_reward_std"]),
                     fmt(m["exact_match"], m["exact_match_std"]), fmt(m["mean_length"], m["mean_length_std"], 2),
                     str(len(m["seeds"]))])
    return rows


def auroc_rows(results: dict) -> list[list[str]]:
    q = results["token_reward_quality"]
    names = {"contrastive": "contrastive prompting (reference model)",
             "dpo_implicit": "DPO-implicit, beta (log pi_dpo - log pi_ref)"}
    return [[names[k], fmt(q[k]["auroc"], q[k]["auroc_std"]),
             fmt(q[k]["auroc_vs_incorrect"], q[k]["auroc_vs_incorrect_std"]),
             fmt(q[k]["auroc_vs_filler"], q[k]["auroc_vs_filler_std"]), str(len(q[k]["per_seed"]))]
            for k in ("contrastive", "dpo_implicit")]


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


METHOD_HEADER = ["method", "eval reward", "exact match", "length (tokens)", "seeds"]
AUROC_HEADER = ["token reward", "AUROC correct vs bad", "vs incorrect", "vs filler", "seeds"]


PAIRED_HEADER = ["method", "minus DPO (mean)", "95% bootstrap interval", "seeds better", "seeds x prompts"]


def paired_rows(results: dict) -> list[list[str]]:
    return [[f"{LABEL_NAMES.get(n, n)} (`{n}`)", f"{p['mean']:+.3f}", f"[{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]",
             f"{p['seeds_better']}/{p['n_seeds']}", f"{p['n_seeds']} x {p['n_prompts']}"]
            for n, p in results.get("paired_vs_dpo", {}).items()]


def tuning_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the tuned protocol's grid: one row per (method, lr, alpha)."""
    proto = results["protocol"]
    header = ["method", "lr", "alpha"] + [f"tune seed {s}" for s in proto["tune_seeds"]] + \
        [f"score ({proto['pick_rule']})", "picked"]
    rows = []
    for name, trials in proto["tuning"].items():
        pk = proto["picks"][name]
        for t in trials:
            mark = "yes" if (t["lr"], t["alpha"]) == (pk["lr"], pk["alpha"]) else ""
            rows.append([name, f"{t['lr']:.3g}", f"{t['alpha']:g}"] + [f"{r:.3f}" for r in t["rewards"]] +
                        [f"{t['score']:.3f}", mark])
    return header, rows


def protocol_markdown(results: dict) -> list[str]:
    lines = []
    if results.get("paired_vs_dpo"):
        lines += ["## Difference to DPO, paired by test seed and prompt", "",
                  _md_table(PAIRED_HEADER, paired_rows(results)), ""]
    if results["protocol"].get("tuning"):
        proto = results["protocol"]
        header, rows = tuning_rows(results)
        lines += [f"## Tuning grid (protocol `tuned`: tuning seeds {', '.join(map(str, proto['tune_seeds']))}; "
                  f"test seeds {', '.join(map(str, proto['test_seeds']))}; pick rule `{proto['pick_rule']}`)", "",
                  _md_table(header, rows), ""]
    return lines


def markdown(results: dict) -> str:
    cfg = results["config"]
    hp = ", ".join(f"{k}: lr {v['lr']:g}, alpha {v['alpha']:g}" for k, v in cfg["chosen_hyperparameters"].items())
    return "\n".join([
        "# treg demo report (toy world)", "",
        f"{cfg['seeds']} seed(s); {cfg['train_prompts']} training prompts x {cfg['n_samples']} samples; "
        f"{cfg['steps']} steps x {cfg['batch_size']} pairs per method; evaluation: {cfg['eval_prompts']} held-out "
        f"prompts x {cfg['eval_samples']} samples at temperature {cfg['temperature']:g}, judged by the exact "
        f"verifier (training pairs were chosen by the proxy reward). Wall time {results['wall_seconds']:.0f} s.",
        "", "## Held-out evaluation (mean ± std over seeds)", "",
        _md_table(METHOD_HEADER, method_rows(results)), "",
        "## Token-reward quality against ground truth (training pairs)", "",
        _md_table(AUROC_HEADER, auroc_rows(results)), "",
        *protocol_markdown(results),
        f"Hyperparameters per method: {hp}.", "",
        "Files: `results.json`, `eval/<method>/seed<s>.jsonl`, `tokens/seed<s>.jsonl`, `curves/`.", ""])


def _curves_png(out: Path, methods: list[str], key: str, title: str) -> str | None:
    """Mean over seeds of a logged training metric per method, as a base64 PNG (None if no data)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=90)
    drawn = False
    for name in methods:
        runs = [json.loads(p.read_text()) for p in sorted((out / "curves" / name).glob("seed*.json"))]
        series = [[(h["step"], h[key]) for h in run if key in h] for run in runs]
        series = [s for s in series if s]
        if not series:
            continue
        n = min(len(s) for s in series)
        steps = [p[0] for p in series[0][:n]]
        ax.plot(steps, np.mean([[p[1] for p in s[:n]] for s in series], axis=0), label=LABEL_NAMES.get(name, name))
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def sensitivity_png(results: dict) -> str | None:
    """Tuning reward (mean over tuning seeds, bars: min..max) vs learning rate, one panel per method
    and one line per alpha, as a base64 PNG (None without a tuned protocol)."""
    tuning = results["protocol"].get("tuning")
    if not tuning:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(tuning)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.2), dpi=90, sharey=True, squeeze=False)
    for ax, (name, trials) in zip(axes[0], tuning.items()):
        for alpha in sorted({t["alpha"] for t in trials}):
            ts = sorted((t for t in trials if t["alpha"] == alpha), key=lambda t: t["lr"])
            x = [t["lr"] for t in ts]
            m = np.array([np.mean(t["rewards"]) for t in ts])
            lo = m - np.array([min(t["rewards"]) for t in ts])
            hi = np.array([max(t["rewards"]) for t in ts]) - m
            ax.errorbar(x, m, yerr=[lo, hi], marker="o", capsize=3, label=f"alpha {alpha:g}")
        pk = results["protocol"]["picks"][name]
        ax.axvline(pk["lr"], color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_title(LABEL_NAMES.get(name, name), fontsize=9)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("tuning reward (mean; bars min..max)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _color(r: float) -> str:
    """Green for positive token reward, red for negative (|r| <= 0.5 -> opacity)."""
    a = min(1.0, abs(r) * 2) if math.isfinite(r) else 0.0
    return f"rgba(0,160,0,{a:.2f})" if r >= 0 else f"rgba(220,0,0,{a:.2f})"


def heatmap_html(rec: dict, side: str, key: str) -> str:
    """One response as coloured word spans; ground-truth label as underline style and tooltip."""
    from treg.toy.credit import token_labels
    words = rec[side].split()
    labels = token_labels(rec["query"], rec[side])
    style = {"correct": "", "incorrect": "text-decoration:underline wavy;", "filler": "font-style:italic;"}
    spans = [f'<span style="background:{_color(r)};{style[lab]}padding:1px 3px" '
             f'title="{lab}, r={r:+.3f}">{html.escape(w)}</span>'
             for w, lab, r in zip(words, labels, rec[f"{side}_{key}"])]
    return " ".join(spans)


def html_report(out: Path, results: dict, n_heatmaps: int = 4) -> str:
    def table(header, rows):
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c.replace('`', ''))}</td>" for c in r) + "</tr>"
                       for r in rows)
        return f"<table><tr>{head}</tr>{body}</table>"
    methods = list(results["methods"])
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>treg demo report</title><style>"
             "body{font-family:sans-serif;max-width:60em;margin:1em auto}td,th{border:1px solid #ccc;"
             "padding:3px 8px}table{border-collapse:collapse}.hm{font-family:monospace;line-height:2}</style>"
             "</head><body>"]
    md = markdown(results).split("\n")
    parts.append(f"<h1>treg demo report (toy world)</h1><p>{html.escape(md[2])}</p>")
    parts.append("<h2>Held-out evaluation (mean ± std over seeds)</h2>" + table(METHOD_HEADER, method_rows(results)))
    parts.append("<h2>Token-reward quality against ground truth</h2>" + table(AUROC_HEADER, auroc_rows(results)))
    if results.get("paired_vs_dpo"):
        parts.append("<h2>Difference to DPO, paired by test seed and prompt (bootstrap 95% interval)</h2>"
                     + table(PAIRED_HEADER, paired_rows(results)))
    if results["protocol"].get("tuning"):
        parts.append("<h2>Sensitivity: tuning reward vs learning rate (protocol tuned)</h2>")
        png = sensitivity_png(results) if _has_matplotlib() else None
        if png:
            parts.append(f'<img alt="sensitivity" class="sensitivity" src="data:image/png;base64,{png}">')
        parts.append(table(*tuning_rows(results)))
    parts.append("<h2>Learning curves (mean over seeds)</h2>")
    from treg.extras import available, install_hint
    if not available("matplotlib"):  # the report is still written, without the plots, and says so
        note = f"Learning curves need the optional package 'matplotlib': {install_hint('matplotlib')}"
        print(f"treg: {note}", file=sys.stderr)
        parts.append(f"<p>{html.escape(note)}</p>")
    for key, title in (("treg/pref_loss", "preference loss -log sigmoid(z) (comparable across methods)"),
                       ("rewards/margins", "reward margin"), ("rewards/accuracies", "reward accuracy")):
        png = _curves_png(out, methods, key, title) if available("matplotlib") else None
        if png:
            parts.append(f'<img alt="{html.escape(title)}" src="data:image/png;base64,{png}">')
    tokens = sorted((out / "tokens").glob("seed*.jsonl"), key=_seed_of)
    if tokens:
        parts.append("<h2>Token heat maps (seed 0 training pairs)</h2><p>Green: positive token reward, red: "
                     "negative. Wavy underline: ground-truth incorrect token; italics: filler.</p>")
        for rec in _read_jsonl(tokens[0])[:n_heatmaps]:
            parts.append(f"<h3>{html.escape(rec['query'])}</h3>")
            for side in ("chosen", "rejected"):
                for key in ("contrastive", "dpo"):
                    if f"{side}_{key}" in rec:
                        parts.append(f"<div class='hm'><b>{side}, {key}:</b> {heatmap_html(rec, side, key)}</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _has_matplotlib() -> bool:
    from treg.extras import available
    return available("matplotlib")


def write_reports(out: str | os.PathLike, results: dict) -> None:
    """``report.md`` and ``report.html`` beside results.json (atomic writes)."""
    out = Path(out)
    atomic_write_text(out / "report.md", markdown(results))
    atomic_write_text(out / "report.html", html_report(out, results))
