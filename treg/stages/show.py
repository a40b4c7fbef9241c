"""Token-reward heat maps of an annotated dataset: terminal (rich) and one self-contained HTML page.

Rows are annotated-dataset rows (dicts; docs/data.md): ``chosen_input_ids``, ``rejected_input_ids``,
``chosen_token_rewards``, ``rejected_token_rewards`` (one r_hat per response token), optionally
``prompt_text`` / ``source_index``. Each token is coloured by its r_hat: green positive, red
negative, intensity ``min(1, |r_hat| / scale)`` (``scale`` defaults to the largest |r_hat| shown).

Public API: ``render_html(rows, tokenizer, ...) -> str`` (embeddable; one ``<span class="tok">``
per response token), ``render_terminal(rows, tokenizer, console)``, ``summary(dataset, tokenizer)``,
``worst_indices(dataset, k)``, ``token_pieces(tokenizer, ids)``.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np

from treg.io.schema import IDS, REWARDS, SIDES, TEXT



def token_pieces(tokenizer, ids: Sequence[int]) -> list[str]:
    """The text each token adds, by incremental decoding (exact for byte-level BPE and SentencePiece).
    A token that ends inside a multi-byte character gets ``""``; the character goes to the token
    that completes it. ``"".join(pieces) == tokenizer.decode(ids)`` up to incomplete trailing bytes.

    Linear in ``len(ids)``: each step decodes only a short window, from the token before the last
    emitted piece (its context keeps SentencePiece's leading spaces and split characters right) to
    the current token — the sliding-window incremental detokenization of vLLM / TGI."""
    ids = [int(i) for i in ids]
    pieces: list[str] = []
    prefix, read = 0, 0  # window start; end of the text already emitted

    def dec(part):
        return tokenizer.decode(part, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    for k in range(len(ids)):
        before = dec(ids[prefix:read]) if read > prefix else ""
        text = dec(ids[prefix:k + 1])
        if text.endswith("\ufffd") or not text.startswith(before) or len(text) <= len(before):
            pieces.append("")  # an incomplete character (or nothing new yet): wait for the next token
            continue
        pieces.append(text[len(before):])
        prefix, read = read, k + 1
    return pieces


def _flat(dataset, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(values, lengths) of a list column, via Arrow (no per-row Python loop)."""
    import pyarrow.compute as pc
    col = dataset.with_format("arrow")[:][column].combine_chunks()
    values = col.flatten().to_numpy(zero_copy_only=False)
    return values, pc.list_value_length(col).to_numpy(zero_copy_only=False)


def worst_indices(dataset, k: int) -> list[int]:
    """The ``k`` pairs whose token rewards disagree most with the preference: ascending
    ``mean r_hat(chosen) - mean r_hat(rejected)``."""
    means = {}
    for side in SIDES:
        values, lengths = _flat(dataset, REWARDS[side])
        sums = np.add.reduceat(values.astype(np.float64), np.r_[0, np.cumsum(lengths)[:-1]]) \
            if len(values) else np.zeros(len(lengths))
        means[side] = sums / np.maximum(lengths, 1)
    gap = means["chosen"] - means["rejected"]
    return [int(i) for i in np.argsort(gap, kind="stable")[:k]]


def summary(dataset, tokenizer=None, *, top: int = 10) -> dict:
    """Mean r_hat and share of positive tokens per side, and the ``top`` most negative tokens
    (token ids averaged over all their occurrences; only negative means; at least 2 occurrences
    when any id has them)."""
    out = {"pairs": len(dataset)}
    ids_all, vals_all = [], []
    for side in SIDES:
        values, _ = _flat(dataset, REWARDS[side])
        ids, _ = _flat(dataset, IDS[side])
        out[side] = {"tokens": int(len(values)), "mean_reward": float(values.mean()) if len(values) else 0.0,
                     "positive_share": float((values > 0).mean()) if len(values) else 0.0}
        ids_all.append(ids)
        vals_all.append(values)
    ids, vals = np.concatenate(ids_all).astype(np.int64), np.concatenate(vals_all).astype(np.float64)
    uniq, inv, counts = np.unique(ids, return_inverse=True, return_counts=True)
    means = np.bincount(inv, weights=vals) / counts
    eligible = (counts >= 2 if (counts >= 2).any() else counts >= 1) & (means < 0)
    order = [i for i in np.argsort(means, kind="stable") if eligible[i]][:top]
    out["most_negative_tokens"] = [
        {"token": tokenizer.decode([int(uniq[i])]) if tokenizer is not None else str(int(uniq[i])),
         "id": int(uniq[i]), "mean_reward": float(means[i]), "count": int(counts[i])} for i in order]
    return out


def _scale(rows, scale: float | None) -> float:
    if scale is not None:
        return float(scale)
    vals = [abs(v) for r in rows for s in SIDES for v in r[REWARDS[s]]]
    return max(max(vals, default=0.0), 1e-9)


def _rgb(r: float, scale: float) -> tuple[int, int, int, float]:
    a = min(1.0, abs(r) / scale)
    return ((30, 160, 60) if r > 0 else (215, 40, 40)) + (round(a * 0.85, 3),)


def render_html(rows: list[dict], tokenizer, *, title: str = "T-REG token rewards", scale: float | None = None,
                indices: Sequence[int] | None = None) -> str:
    """One self-contained HTML page: per pair, prompt, then chosen | rejected side by side; every
    response token is a ``<span class="tok" style="background:rgba(...)" title="r_hat=...">``."""
    scale = _scale(rows, scale)
    esc = html.escape
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>"
             "body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}"
             ".pair{border:1px solid #ccc;border-radius:6px;margin:1em 0;padding:.6em}"
             ".cols{display:grid;grid-template-columns:1fr 1fr;gap:1em}"
             ".resp,.prompt{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:13px}"
             ".prompt{color:#555;border-left:3px solid #ddd;padding-left:.5em}"
             ".tok{border-radius:2px}</style></head><body>",
             f"<h1>{esc(title)}</h1><p>Each token is coloured by r&#770;: <span style='background:rgba(30,160,60,.85)'>"
             f"positive</span> / <span style='background:rgba(215,40,40,.85)'>negative</span>; full colour at "
             f"|r&#770;| &ge; {scale:.3g}. Hover a token for its value.</p>"]
    for n, row in enumerate(rows):
        idx = indices[n] if indices is not None else row.get("source_index", n)
        parts.append(f"<div class='pair'><h3>pair {esc(str(idx))}</h3>")
        if row.get(TEXT["prompt"]) is not None:
            parts.append(f"<div class='prompt'>{esc(row[TEXT['prompt']])}</div>")
        parts.append("<div class='cols'>")
        for side in SIDES:
            ids, rew = row[IDS[side]], row[REWARDS[side]]
            mean = float(np.mean(rew)) if len(rew) else 0.0
            spans = []
            for piece, r in zip(token_pieces(tokenizer, ids), rew):
                cr, cg, cb, a = _rgb(r, scale)
                spans.append(f"<span class='tok' style='background:rgba({cr},{cg},{cb},{a})' "
                             f"title='r_hat={r:+.4f}'>{esc(piece)}</span>")
            parts.append(f"<div><h4>{side} (mean r&#770; {mean:+.4f})</h4><div class='resp'>{''.join(spans)}"
                         "</div></div>")
        parts.append("</div></div>")
    parts.append("</body></html>")
    return "".join(parts)


def render_terminal(rows: list[dict], tokenizer, console, *, scale: float | None = None,
                    indices: Sequence[int] | None = None) -> None:
    """Print each pair as a rich table: chosen | rejected, tokens on coloured backgrounds."""
    from rich.table import Table
    from rich.text import Text
    scale = _scale(rows, scale)
    for n, row in enumerate(rows):
        idx = indices[n] if indices is not None else row.get("source_index", n)
        table = Table(title=f"pair {idx}", show_lines=True, expand=True)
        cells = []
        for side in SIDES:
            ids, rew = row[IDS[side]], row[REWARDS[side]]
            table.add_column(f"{side} (mean r_hat {float(np.mean(rew)):+.4f})", ratio=1)
            text = Text()
            for piece, r in zip(token_pieces(tokenizer, ids), rew):
                cr, cg, cb, a = _rgb(r, scale)
                bg = tuple(round(c * a) for c in (cr, cg, cb))  # blend towards black
                text.append(piece, style=f"on rgb({bg[0]},{bg[1]},{bg[2]})")
            cells.append(text)
        if row.get(TEXT["prompt"]) is not None:
            console.print(Text(f"prompt: {row[TEXT['prompt']]}", style="dim"))
        table.add_row(*cells)
        console.print(table)


def print_summary(stats: dict, console) -> None:
    """Terminal rendering of :func:`summary`."""
    from rich.table import Table
    table = Table(title=f"token rewards over {stats['pairs']} pairs")
    for col in ("side", "tokens", "mean r_hat", "share > 0"):
        table.add_column(col)
    for side in SIDES:
        s = stats[side]
        table.add_row(side, str(s["tokens"]), f"{s['mean_reward']:+.4f}", f"{s['positive_share']:.1%}")
    console.print(table)
    neg = ", ".join(f"{t['token']!r} {t['mean_reward']:+.4f} (x{t['count']})" for t in stats["most_negative_tokens"])
    console.print(f"most negative tokens: {neg}")
