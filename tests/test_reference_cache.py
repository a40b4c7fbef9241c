"""The trainer's reference pass (treg.stages.reference): cache re-use, refusal of foreign caches, resume after a
kill, exact truncation, in-trainer token rewards equal to `treg annotate`'s."""
import logging
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_data import make_pairs  # noqa: E402
from tiny import tiny_llama, tiny_tokenizer  # noqa: E402

from treg.errors import TregError  # noqa: E402
from treg.io.schema import REF_COLUMNS, REF_SUM, REF_TOK, REWARD_COLUMNS, REWARDS, SIDES  # noqa: E402
from treg.stages import reference  # noqa: E402
from treg.stages.config import TRegConfig  # noqa: E402
from treg.stages.trainer import TRegTrainer  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer("llama3")


def _args(out, **kw):
    base = dict(output_dir=str(out), max_steps=1, per_device_train_batch_size=2, learning_rate=1e-3,
                save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, alpha=0.0, seed=0)
    return TRegConfig(**{**base, **kw})


def _trainer(tok, data, out, *, seed=0, **kw):
    """A trainer built on a fresh tiny model whose forward calls are counted in ``trainer.forwards``."""
    model = tiny_llama(len(tok), seed=seed)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    trainer = TRegTrainer(model, args=_args(out, **kw), train_dataset=data, processing_class=tok)
    trainer.forwards = len(calls)
    return trainer


def _columns(ds, names):
    return {c: ds[c] for c in names}


def test_second_run_reuses_the_cache_without_a_forward(tok, tmp_path):
    data = make_pairs(12)
    first = _trainer(tok, data, tmp_path / "run")
    assert first.forwards > 0 and not first.reference_info["train"]["reused"]
    second = _trainer(tok, data, tmp_path / "run")
    assert second.forwards == 0 and second.reference_info["train"]["reused"]
    for c in REF_COLUMNS:
        assert second.train_dataset[c] == first.train_dataset[c]
    assert first.train_dataset[REF_SUM["chosen"]][0] < 0


def test_cache_for_another_model_tokenizer_or_max_length_is_never_used(tok, tmp_path, caplog):
    data = make_pairs(8)
    base = _trainer(tok, data, tmp_path / "run")
    for change, kw, other_tok in (("model", {"seed": 1}, tok), ("max_length", {"max_length": 9}, tok),
                                  ("tokenizer", {}, tiny_tokenizer("chatml"))):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="treg.stages.reference"):
            t = _trainer(other_tok, data, tmp_path / "run", **kw)
        assert t.forwards > 0, change                      # recomputed, not read from the other cache
        assert any("other settings" in r.message and change in r.message for r in caplog.records), change
        if change == "model":
            assert t.train_dataset[REF_SUM["chosen"]] != base.train_dataset[REF_SUM["chosen"]]


def test_kill_during_reference_pass_then_rerun_resumes(tok, tmp_path, monkeypatch):
    import treg.method.seqscore as seqscore
    monkeypatch.setattr(reference, "SHARD_ROWS", 4)
    data = make_pairs(16)                                   # 4 shards
    whole = _trainer(tok, data, tmp_path / "whole")
    real, calls = seqscore.score_sequences, []

    def dies_on_third_shard(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt                          # killed while scoring shard 2
        return real(*a, **kw)

    monkeypatch.setattr(seqscore, "score_sequences", dies_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        _trainer(tok, data, tmp_path / "killed")
    monkeypatch.setattr(seqscore, "score_sequences", real)
    resumed = _trainer(tok, data, tmp_path / "killed")
    info = resumed.reference_info["train"]
    assert info["resumed_shards"] == 2 and info["computed_rows"] == 8   # only the unfinished half
    for c in REF_COLUMNS:
        got, want = resumed.train_dataset[c], whole.train_dataset[c]
        np.testing.assert_allclose(np.concatenate([np.ravel(x) for x in got]),
                                   np.concatenate([np.ravel(x) for x in want]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_truncation_recomputes_only_what_it_invalidates(tok, tmp_path, mode):
    data = make_pairs(10, prompt=(3, 6), response=(2, 9))
    full = _trainer(tok, data, tmp_path / "full", max_length=None).train_dataset     # stored, uncut values
    max_length = 11
    fresh = _trainer(tok, data, tmp_path / "fresh", max_length=max_length, truncation_mode=mode).train_dataset
    kept = _trainer(tok, full, tmp_path / "kept", max_length=max_length, truncation_mode=mode)
    plen = np.array([len(p) for p in full["prompt_input_ids"]])
    cut = np.zeros(len(full), dtype=bool)
    for side in SIDES:
        cut |= plen + np.array([len(r) for r in full[f"{side}_input_ids"]]) > max_length
    if mode == "keep_start":
        assert cut.any() and kept.forwards == 0              # exact from the stored per-token values
    else:
        assert kept.reference_info["train"]["sequences"] == 2 * int(cut.sum()) > 0   # only the cut rows
    for c in (*REF_SUM.values(),):
        np.testing.assert_allclose(kept.train_dataset[c], fresh[c], rtol=1e-5, atol=1e-5)
    for side in SIDES:                                       # per-token values inside the kept window
        from treg.io.data import response_window
        for r_kept, r_fresh in zip(kept.train_dataset, fresh):
            _, lo, hi = response_window(len(r_kept["prompt_input_ids"]), len(r_kept[f"{side}_input_ids"]),
                                        max_length, mode)
            np.testing.assert_allclose(r_kept[REF_TOK[side]][lo + 1:hi], r_fresh[REF_TOK[side]][lo + 1:hi],
                                       atol=1e-5)


ROWS = [
    {"prompt": "How can I help you today?", "chosen": " Sure, here is a concise answer.", "rejected": "\nNo."},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 3"}],
     "chosen": [{"role": "assistant", "content": "5"}],
     "rejected": [{"role": "assistant", "content": "It is 2025-11-27 and the lazy dog jumps."}]},
    {"prompt": "def add(a, b):", "chosen": "    return a + b\n", "rejected": "ing merges café 🙂"},
    {"prompt": "Fox?", "chosen": "The quick brown fox.", "rejected": "The lazy dog."},
]


def test_in_trainer_token_rewards_equal_treg_annotate(tok, tmp_path):
    from treg.stages.annotate import annotate
    annotated = annotate(tiny_llama(len(tok)), tok, ROWS, template="revision", progress=False)
    bare = annotated.remove_columns([*REWARD_COLUMNS, *REF_COLUMNS])
    t = _trainer(tok, bare, tmp_path / "run", alpha=0.5)
    assert t.forwards > 0
    for c in (*REWARD_COLUMNS, *REF_TOK.values()):
        for got, want in zip(t.train_dataset[c], annotated[c]):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(t.train_dataset[REF_SUM["chosen"]], annotated[REF_SUM["chosen"]], atol=1e-4)
    assert max(abs(v) for r in t.train_dataset[REWARDS["chosen"]] for v in r) > 1e-5
    again = _trainer(tok, bare, tmp_path / "run", alpha=0.5)           # cached with the reference values
    assert again.forwards == 0 and again.train_dataset[REWARDS["rejected"]] == t.train_dataset[REWARDS["rejected"]]
    t.train()                                                           # and it trains on them


def test_in_trainer_rewards_need_texts(tok, tmp_path):
    bare = make_pairs(4).remove_columns(REWARD_COLUMNS)
    with pytest.raises(TregError, match="no texts to compute them"):
        _trainer(tok, bare, tmp_path / "run", alpha=0.5)
    assert _trainer(tok, bare, tmp_path / "ok", alpha=0.0).forwards > 0   # alpha 0: no rewards needed


def test_progress_bar_counts_sequences(tok, tmp_path, monkeypatch):
    seen = {}

    class Bar:
        def __init__(self, total, desc, unit, enabled=True):
            seen.update(total=total, unit=unit, desc=desc, done=0)

        def update(self, n):
            seen["done"] += n

        def set_postfix_str(self, s):
            seen["postfix"] = s

        def close(self):
            pass

    import treg.progress
    monkeypatch.setattr(treg.progress, "progress_bar", Bar)
    _trainer(tok, make_pairs(6), tmp_path / "run")
    assert seen["unit"] == "seq" and seen["total"] == seen["done"] == 12 and "tok/s" in seen["postfix"]


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_truncate_pairs_keeps_every_exact_value(mode):
    from treg.io.data import truncate_pairs
    data = make_pairs(12, prompt=(3, 5), response=(2, 9), ref=True)
    out, dropped = truncate_pairs(data, 10, mode)
    assert dropped == 0 and all(c in out.column_names for c in REF_COLUMNS)   # never a whole column thrown away
    n_cut = 0
    for before, after in zip(data, out):
        plen = len(before["prompt_input_ids"])
        cut = any(plen + len(before[f"{s}_input_ids"]) > 10 for s in SIDES)
        n_cut += cut
        for side in SIDES:
            if not cut:
                assert after[REF_SUM[side]] == before[REF_SUM[side]] and after[REF_TOK[side]] == before[REF_TOK[side]]
            elif mode == "keep_end":                                           # prefix changed: recompute
                assert after[REF_SUM[side]] is None and after[REF_TOK[side]] is None
            else:                                                              # exact: sum of the kept tokens
                kept = before[REF_TOK[side]][:10 - plen]
                assert after[REF_SUM[side]] == pytest.approx(sum(kept), abs=1e-5)
                assert after[REF_TOK[side]] == before[REF_TOK[side]]
    assert 0 < n_cut < len(data)
    sums_only = data.remove_columns([REF_TOK["chosen"], REF_TOK["rejected"]])
    out, _ = truncate_pairs(sums_only, 10, mode)                 # no per-token values: the cut rows are recomputed
    assert sum(v is None for v in out[REF_SUM["chosen"]]) == n_cut


def test_in_trainer_rewards_from_trl_columns_equal_treg_annotate(tok, tmp_path):
    """A dataset carrying TRL's prompt/chosen/rejected (conversational here) instead of treg's text columns."""
    from treg.io.schema import TEXT
    from treg.stages.annotate import annotate
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in (ROWS[0], ROWS[2], ROWS[3])]
    annotated = annotate(tiny_llama(len(tok)), tok, rows, template="revision", progress=False)
    bare = annotated.remove_columns([*REWARD_COLUMNS, *REF_COLUMNS, *TEXT.values()])
    for key in ("prompt", "chosen", "rejected"):
        bare = bare.add_column(key, [r[key] for r in rows])
    t = _trainer(tok, bare, tmp_path / "run", alpha=0.5)
    for c in REWARD_COLUMNS:
        for got, want in zip(t.train_dataset[c], annotated[c]):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
