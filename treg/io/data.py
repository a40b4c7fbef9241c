"""The annotated-dataset contract: load, validate, truncate, collate (see docs/data.md).

The columns, dtypes and which are per token are declared once in :mod:`treg.io.schema` (the table
there and in docs/data.md); this module loads, validates, truncates and collates such datasets.

Truncation follows TRL 1.16 ``DPOConfig.max_length`` / ``truncation_mode`` exactly: the collator
cuts each side's ``prompt + response`` sequence on its own, like TRL's ``DataCollatorForPreference``:
``keep_start`` keeps ``seq[:max_length]`` (the response loses its tail) and a pair whose prompt
alone fills ``max_length`` is dropped beforehand (TRL drops these too); ``keep_end`` keeps
``seq[-max_length:]`` (the prompt loses its head first). Token rewards and per-token reference
log-probs are cut in lockstep with the tokens. Stored reference log-probs stay exact where they can:
log p(y_t | x, y_<t) depends on the prefix only, so under ``keep_start`` the kept tokens' values are
unchanged and only the sums are recomputed from them; under ``keep_end`` a cut removes the head of
the prompt, so the rows cut that way (and only those) get null reference values, which the trainer's
reference pass (:mod:`treg.stages.reference`) recomputes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from treg.errors import TregError
from treg.io.meta import read_meta, save_dataset_atomic, tokenizer_fingerprint
from treg.io.schema import IDS, PROMPT, REF_COLUMNS, REF_SUM, REF_TOK, REWARDS, SIDES, STAGE, required_columns

logger = logging.getLogger(__name__)

TRUNCATION_MODES = ("keep_start", "keep_end")


class Annotated(NamedTuple):
    """What :func:`load_annotated` returns: the validated ``datasets.Dataset`` and its meta dict."""
    dataset: Any
    meta: dict


def write_annotated(dataset, path: str | Path, meta: dict) -> None:
    """Save an annotated dataset + ``treg_meta.json`` atomically (temp dir, then rename).

    ``meta`` should hold at least ``tokenizer_fingerprint``; ``stage`` (``"annotate"``) and
    ``num_pairs`` are filled in when absent. See docs/data.md for the documented fields.
    """
    full = {"stage": STAGE, "num_pairs": len(dataset), **meta}
    save_dataset_atomic(dataset, path, full)


def load_annotated(path: str | Path, tokenizer=None, *, need_rewards: bool = True) -> Annotated:
    """Load and validate an annotated dataset directory.

    Checks (each failure is a :class:`TregError` naming the file, and row/field where one is at
    fault): directory and meta exist; ``meta["tokenizer_fingerprint"]`` equals the tokenizer's (when
    ``tokenizer`` is given); the dataset is non-empty; required columns exist (reward columns only
    when ``need_rewards``); responses are non-empty; every per-token column has one value per
    response token; every float is finite. Row numbers are 0-based dataset indices.
    """
    from datasets import load_from_disk
    path = Path(path)
    if not path.is_dir():
        raise TregError("no such dataset directory", file=str(path))
    meta = read_meta(path)
    if meta.get("stage") not in (None, STAGE):
        raise TregError(f"expected a dataset written by 'treg annotate', got stage '{meta.get('stage')}'",
                        file=str(path), field="stage")
    if tokenizer is not None:
        want, got = tokenizer_fingerprint(tokenizer), meta.get("tokenizer_fingerprint")
        if got is None:
            raise TregError("treg_meta.json has no tokenizer fingerprint", file=str(path),
                            field="tokenizer_fingerprint")
        if got != want:
            raise TregError(f"annotated with another tokenizer (fingerprint {got}, this tokenizer {want}); "
                            "re-run 'treg annotate' with this model's tokenizer", file=str(path),
                            field="tokenizer_fingerprint")
    try:
        dataset = load_from_disk(str(path))
    except IndexError:  # datasets cannot open a directory with zero data shards
        raise TregError("empty dataset: no preference pairs", file=str(path)) from None
    except (FileNotFoundError, ValueError) as err:
        raise TregError(f"not a datasets directory ({err})", file=str(path)) from None
    validate(dataset, file=str(path), need_rewards=need_rewards)
    return Annotated(dataset, meta)


def validate(dataset, *, file: str | None = None, need_rewards: bool = True) -> None:
    """Validate columns, lengths and finiteness in bulk (Arrow/numpy, no per-row Python loop)."""
    import pyarrow.compute as pc
    if len(dataset) == 0:
        raise TregError("empty dataset: no preference pairs", file=file)
    need = required_columns(need_token_rewards=need_rewards)
    for column in need:
        if column not in dataset.column_names:
            raise TregError(f"missing column (has: {', '.join(dataset.column_names)})", file=file, field=column)
    table = dataset.with_format("arrow")[:]

    def lengths(column: str) -> np.ndarray:
        import pyarrow as pa
        if not pa.types.is_list(table[column].type) and not pa.types.is_large_list(table[column].type):
            raise TregError(f"expected a list per row, got {table[column].type}", file=file, field=column)
        return pc.fill_null(pc.list_value_length(table[column]), -1).to_numpy(zero_copy_only=False)

    def first(bad: np.ndarray) -> int | None:
        idx = np.flatnonzero(bad)
        return int(idx[0]) if idx.size else None

    if (row := first(lengths(PROMPT) <= 0)) is not None:
        raise TregError("empty prompt: the first response token needs a context token (e.g. BOS)",
                        file=file, row=row, field=PROMPT)
    for side in SIDES:
        n = lengths(IDS[side])
        if (row := first(n <= 0)) is not None:
            raise TregError("empty response: needs at least one token", file=file, row=row, field=IDS[side])
        for column in (REWARDS[side], REF_TOK[side]):
            if column not in table.column_names:
                continue
            m = lengths(column)
            if (row := first(m != n)) is not None:
                got = "no values" if m[row] < 0 else f"{m[row]} values"
                raise TregError(f"{got} for {n[row]} response tokens", file=file, row=row, field=column)
            _check_finite(table[column], file, column, offsets_of=m)
        if REF_SUM[side] in table.column_names:
            _check_finite(table[REF_SUM[side]], file, REF_SUM[side], offsets_of=None)


def _check_finite(column, file, name, *, offsets_of: np.ndarray | None) -> None:
    """Raise on the first null / NaN / inf value, naming the row (list columns: via their lengths)."""
    col = column.combine_chunks()
    values = col.flatten() if offsets_of is not None else col
    arr = values.to_numpy(zero_copy_only=False).astype(np.float64, copy=False) if values.null_count == 0 \
        else np.asarray(values.to_pylist(), dtype=np.float64)  # nulls -> nan
    bad = np.flatnonzero(~np.isfinite(arr))
    if not bad.size:
        return
    flat = int(bad[0])
    if offsets_of is None:
        row = flat
    else:
        row = int(np.searchsorted(np.cumsum(offsets_of), flat, side="right"))
    raise TregError(f"non-finite value {arr[flat]!r}", file=file, row=row, field=name)


def truncate_pairs(dataset, max_length: int | None, truncation_mode: str = "keep_start"):
    """Prepare pairs for TRL-1.16 truncation (the cut itself happens per sequence in the collator).

    Returns ``(dataset, dropped)``. With ``keep_start``, pairs whose prompt alone fills
    ``max_length`` are removed (the response would vanish; TRL 1.16 drops them too) and counted in
    ``dropped``. Stored reference log-probs of cut sequences are kept exact (:func:`exact_reference`):
    never is a whole column thrown away.
    """
    if truncation_mode not in TRUNCATION_MODES:
        raise TregError(f"unknown truncation_mode '{truncation_mode}' (choose {' or '.join(TRUNCATION_MODES)})",
                        field="truncation_mode")
    if max_length is None:
        return dataset, 0
    if max_length < 2:
        raise TregError("max_length must be >= 2 (a prompt token and a response token)", field="max_length")
    n = _lengths(dataset)
    longest = n[PROMPT] + np.maximum(n[IDS["chosen"]], n[IDS["rejected"]])
    if int(longest.max()) <= max_length:
        return dataset, 0
    before = len(dataset)
    if truncation_mode == "keep_start":
        keep = np.flatnonzero(n[PROMPT] < max_length)
        if len(keep) < before:
            dataset = dataset.select(keep.tolist())
    if len(dataset) == 0:
        raise TregError(f"every pair was dropped: all prompts are >= max_length={max_length} tokens",
                        field="max_length")
    dropped = before - len(dataset)
    if dropped:
        logger.warning("dropped %d of %d pairs whose prompt fills max_length=%d", dropped, before, max_length)
    return exact_reference(dataset, max_length, truncation_mode), dropped


def _lengths(dataset) -> dict[str, np.ndarray]:
    import pyarrow.compute as pc
    table = dataset.with_format("arrow")[:]
    return {c: pc.list_value_length(table[c]).to_numpy(zero_copy_only=False) for c in (PROMPT, *IDS.values())}


def exact_reference(dataset, max_length: int, truncation_mode: str):
    """Stored ``ref_*`` values made exact for the truncated sequences, recomputing only what a cut invalidates.

    ``keep_start``: the kept tokens keep their prefix, so their per-token values are exact; the sums
    of cut sequences become the sums of the kept tokens' values (a row with sums but no per-token
    values cannot be fixed that way and is marked stale). ``keep_end``: a cut removes the head of the
    sequence, which changes every kept token's prefix: the row is marked stale. Stale rows get null
    in every ``ref_*`` column; the trainer's reference pass recomputes exactly those rows.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    present = [c for c in REF_COLUMNS if c in dataset.column_names]
    if not present or not any(REF_SUM[s] in present for s in SIDES):
        return dataset
    n = _lengths(dataset)
    table = dataset.with_format("arrow")[:]
    stale = np.zeros(len(dataset), dtype=bool)
    new: dict[str, Any] = {}
    cut_any = 0
    for side in SIDES:
        cut = n[PROMPT] + n[IDS[side]] > max_length
        cut_any += int(cut.sum())
        if not cut.any() or REF_SUM[side] not in present:
            continue
        if truncation_mode == "keep_end" or REF_TOK[side] not in present:
            stale |= cut
            continue
        tok = table[REF_TOK[side]]
        stale |= cut & tok.is_null().to_numpy(zero_copy_only=False)
        lengths = pc.fill_null(pc.list_value_length(tok), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        flat = np.concatenate([[0.0], np.cumsum(pc.list_flatten(tok).to_numpy(zero_copy_only=False), dtype=np.float64)])
        keep = np.clip(max_length - n[PROMPT].astype(np.int64), 0, lengths)   # response tokens kept (keep_start)
        kept_sum = flat[starts + keep] - flat[starts]
        old = table[REF_SUM[side]]
        sums = pc.fill_null(old, np.nan).to_numpy(zero_copy_only=False).astype(np.float64)
        new[REF_SUM[side]] = pa.array(np.where(cut, kept_sum, sums), mask=old.is_null().to_numpy(zero_copy_only=False))
    if not cut_any:
        return dataset
    if stale.any():
        mask = pa.array(stale)
        for column in present:
            col = new.get(column, table[column])
            new[column] = pc.if_else(mask, pa.nulls(len(stale), type=col.type), col)
    if getattr(dataset, "_indices", None) is not None:
        dataset = dataset.flatten_indices()
    for column, values in new.items():
        feature = dataset.features[column]
        values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
        dataset = dataset.remove_columns(column).add_column(column, values, feature=feature)
    if stale.any():
        logger.warning("max_length=%d (%s) cuts %d sequences: %d of %d rows lose stored reference log-probs "
                       "(their kept tokens' prefix changed) and are recomputed; the other rows keep theirs",
                       max_length, truncation_mode, cut_any, int(stale.sum()), len(dataset))
    else:
        logger.info("max_length=%d cuts %d sequences: reference sums recomputed from the kept tokens' "
                    "stored values (exact under keep_start)", max_length, cut_any)
    return dataset


def truncate_sequence(values: list, max_length: int | None, mode: str) -> list:
    """TRL 1.16 ``DataCollatorForPreference``: ``seq[:max_length]`` (keep_start) or ``seq[-max_length:]``."""
    if max_length is None:
        return values
    return values[:max_length] if mode == "keep_start" else values[-max_length:]


def response_window(prompt_len: int, response_len: int, max_length: int | None, mode: str) -> tuple[int, int, int]:
    """Where a response lands in its collated (truncated) sequence: ``(pos0, lo, hi)``.

    Response tokens ``lo..hi-1`` survive truncation and token ``j`` sits at sequence position
    ``pos0 + j``. Used to map per-position values (e.g. reference log-probs) back to response tokens.
    """
    total = prompt_len + response_len
    offset = 0 if max_length is None or mode == "keep_start" else max(0, total - max_length)
    kept = total if max_length is None else min(total, max_length)
    pos0 = prompt_len - offset
    return pos0, max(0, -pos0), min(response_len, kept - pos0)


@dataclass
class PairCollator:
    """Collate annotated rows into one concatenated batch ``[chosen; rejected]``.

    Input: a list of B rows (dicts with the columns above; see :func:`truncate_pairs`). Each
    ``prompt + response`` sequence is cut to ``max_length`` per TRL 1.16 (:func:`truncate_sequence`),
    with rewards and per-token reference log-probs cut in lockstep. Output (L = longest kept
    sequence, right padded, rounded up to ``pad_to_multiple_of`` if set):

    - ``input_ids`` (2B, L) long: rows ``0..B-1`` = prompt + chosen, rows ``B..2B-1`` = prompt + rejected
    - ``attention_mask`` (2B, L) long
    - ``response_mask`` (2B, L) float32: 1.0 at response-token positions. Position 0 is never a
      response position (it has no context; TRL scores from position 1 as well).
    - ``token_rewards`` (2B, L) float32: r_hat aligned with ``response_mask``, 0 elsewhere; only
      when every row has token rewards
    - ``ref_token_logps`` (2B, L) float32: only when every row has per-token reference log-probs
    - ``ref_chosen_logps`` / ``ref_rejected_logps`` (B,) float32: only when present in every row

    Positions line up with the log-prob contract ``out[:, t] = log p(ids[t] | ids[<t])``.
    """

    pad_token_id: int
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        cut = lambda values: truncate_sequence(values, self.max_length, self.truncation_mode)  # noqa: E731
        has_rewards = all(r.get(REWARDS[s]) is not None for r in rows for s in SIDES)
        has_ref_tok = all(r.get(REF_TOK[s]) is not None for r in rows for s in SIDES)
        seqs, masks, rewards, ref_tok = [], [], [], []
        for side in SIDES:
            for r in rows:
                pad = [0.0] * len(r[PROMPT])
                seqs.append(cut(list(r[PROMPT]) + list(r[IDS[side]])))
                masks.append(cut(pad + [1.0] * len(r[IDS[side]])))
                if has_rewards:
                    rewards.append(cut(pad + list(r[REWARDS[side]])))
                if has_ref_tok:
                    ref_tok.append(cut(pad + list(r[REF_TOK[side]])))
        length = max(map(len, seqs))
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of

        def padded(rows_: list[list], dtype, value=0) -> torch.Tensor:
            out = torch.full((len(rows_), length), value, dtype=dtype)
            for i, row in enumerate(rows_):
                out[i, :len(row)] = torch.tensor(row, dtype=dtype)
            return out

        mask = padded(masks, torch.float32)
        mask[:, 0] = 0.0
        batch = {"input_ids": padded(seqs, torch.long, self.pad_token_id),
                 "attention_mask": padded([[1] * len(s) for s in seqs], torch.long),
                 "response_mask": mask}
        if has_rewards:
            batch["token_rewards"] = padded(rewards, torch.float32) * mask
        if has_ref_tok:
            batch["ref_token_logps"] = padded(ref_tok, torch.float32) * mask
        for side in SIDES:
            if all(r.get(REF_SUM[side]) is not None for r in rows):
                batch[REF_SUM[side]] = torch.tensor([float(r[REF_SUM[side]]) for r in rows], dtype=torch.float32)
        return batch
