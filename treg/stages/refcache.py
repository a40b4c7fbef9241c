"""The reference pass's on-disk cache: fingerprints that key it, the warning for a cache made with other
settings, and merging cached columns into a dataset (:mod:`treg.stages.reference`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from treg.io.meta import META_FILE, path_fingerprint, stable_hash
from treg.io.shards import SETTINGS_FILE, SHARD_DIR, changed_settings
from treg.io.schema import REF_SUM, REF_TOK, REWARDS, SIDES
from treg.stages.sharded import is_sharded

logger = logging.getLogger("treg.stages.reference")

CONTENT_HASH_MAX_BYTES = 2 << 30    # models up to this size are fingerprinted by their weights' content


def _weights(model):
    """(name, tensor) of the reference weights: PEFT adapter weights left out, PEFT prefixes stripped."""
    adapters = list(getattr(model, "peft_config", None) or {})
    for name, p in model.named_parameters():
        if any(f".{a}." in name for a in adapters):
            continue
        yield name.replace("base_model.model.", "", 1).replace(".base_layer", ""), p


def model_fingerprint(model) -> dict:
    """Identity of the reference model: its weights' content when small and unsharded, else its name, hub
    revision and (local directory) file fingerprint. The config and dtypes always join."""
    config = getattr(model, "config", None)
    cfg = {k: v for k, v in (config.to_dict() if config is not None else {}).items()
           if k not in ("_name_or_path", "transformers_version", "_commit_hash")}
    params = list(_weights(model))
    out = {"config": stable_hash(cfg), "dtypes": sorted({str(p.dtype) for _, p in params})}
    size = sum(p.numel() * p.element_size() for _, p in params)
    if not is_sharded(model) and size <= CONTENT_HASH_MAX_BYTES:
        h = hashlib.blake2b(digest_size=16)
        for name, p in sorted(params, key=lambda x: x[0]):
            h.update(f"{name}:{p.dtype}:{tuple(p.shape)}".encode())
            h.update(memoryview(p.detach().cpu().contiguous().view(torch.uint8).numpy()))
        out["weights"] = h.hexdigest()
    else:
        name = getattr(config, "_name_or_path", None) or ""
        out.update(name=name, revision=getattr(config, "_commit_hash", None),
                   files=path_fingerprint(name) if name and os.path.isdir(name) else None)
    return out


def data_fingerprint(dataset, columns: list[str]) -> str:
    """Content hash of ``columns`` (list columns: lengths + flat values; others: their values as JSON)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    table = dataset.with_format("arrow")[:]
    h = hashlib.blake2b(digest_size=16)
    for c in columns:
        col = table[c]
        h.update(c.encode())
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            h.update(np.ascontiguousarray(pc.list_value_length(col).to_numpy(zero_copy_only=False)).tobytes())
            h.update(np.ascontiguousarray(pc.list_flatten(col).to_numpy(zero_copy_only=False)).tobytes())
        else:
            h.update(json.dumps(col.to_pylist(), default=str).encode())
    return h.hexdigest()


def warn_other_caches(out: Path, settings: dict) -> None:
    """A cache for the same dataset made with other settings exists: say what changed (it is not used)."""
    name = settings["dataset"]
    others = [p for p in out.parent.glob(f"{name}-*") if p.is_dir() and p != out]
    if not others:
        return
    latest = max(others, key=lambda p: p.stat().st_mtime)
    old = {}
    for f in (latest / META_FILE, latest / SHARD_DIR / SETTINGS_FILE):
        if f.exists():
            try:
                old = json.loads(f.read_text()).get("settings") or {}
            except (json.JSONDecodeError, OSError):
                pass
            break
    changed = changed_settings(settings, old) or ["unknown"]
    logger.warning("reference cache %s was made for other settings (changed: %s): not used; computing %s",
                   latest, ", ".join(changed), out)


@contextlib.contextmanager
def quiet_datasets():
    """datasets' own "Saving the dataset" bars off while the cache is merged (the pass has its own bar)."""
    import datasets
    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()


def load(out: Path):
    from datasets import load_from_disk
    return load_from_disk(str(out))


def merge(dataset, cached, ref_rows, rewards):
    """Put the cached columns into ``dataset``: whole columns when every row was computed, else row by row."""
    from datasets import concatenate_datasets
    full = []
    if rewards:
        full += [REWARDS[s] for s in SIDES]
    ref_cols = [*REF_SUM.values(), *REF_TOK.values()]
    whole_ref = ref_rows is not None and len(ref_rows) == len(dataset)
    if whole_ref:
        full += ref_cols
    if full:
        if getattr(dataset, "_indices", None) is not None:
            dataset = dataset.flatten_indices()
        dataset = dataset.remove_columns([c for c in full if c in dataset.column_names])
        dataset = concatenate_datasets([dataset, cached.select_columns(full)], axis=1)
    if ref_rows is not None and not whole_ref:      # only the rows truncation invalidated (null ones)
        import pyarrow as pa
        import pyarrow.compute as pc
        if getattr(dataset, "_indices", None) is not None:
            dataset = dataset.flatten_indices()
        mine = np.zeros(len(dataset), dtype=bool)
        mine[ref_rows] = True
        table, fresh = dataset.with_format("arrow")[:], cached.with_format("arrow")[:]
        for column in ref_cols:
            new = fresh[column].combine_chunks()
            old = table[column].combine_chunks() if column in table.column_names else pa.nulls(len(mine), new.type)
            values = pc.if_else(pa.array(mine), new, old.cast(new.type))
            if column in dataset.column_names:
                dataset = dataset.remove_columns(column)
            dataset = dataset.add_column(column, values, feature=cached.features[column])
    return dataset
