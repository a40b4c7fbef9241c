"""Tests for treg/io/data.py: the annotated-dataset contract (validation, TRL-1.16 truncation, collator).

``make_pairs`` / ``write_pairs`` are also used by the trainer, CLI and distributed tests.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from treg.io.data import (PairCollator, load_annotated, response_window, truncate_pairs,  # noqa: E402
                       truncate_sequence, write_annotated)
from treg.errors import TregError  # noqa: E402
from treg.io.meta import tokenizer_fingerprint  # noqa: E402


def make_pairs(n: int = 8, *, seed: int = 0, vocab: int = 400, prompt=(3, 7), response=(2, 9), ref=False):
    """n random tokenized pairs with token rewards in (-0.5, 0.5) (+ reference columns if ``ref``)."""
    from datasets import Dataset
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        k = int(torch.randint(lo, hi + 1, (1,), generator=g))
        return torch.randint(10, vocab, (k,), generator=g).tolist()

    rows = {k: [] for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids",
                            "chosen_token_rewards", "rejected_token_rewards")}
    if ref:
        rows.update({k: [] for k in ("ref_chosen_logps", "ref_rejected_logps",
                                     "ref_chosen_token_logps", "ref_rejected_token_logps")})
    for _ in range(n):
        rows["prompt_input_ids"].append([1] + ids(*prompt))
        for side in ("chosen", "rejected"):
            r = ids(*response)
            rows[f"{side}_input_ids"].append(r)
            rows[f"{side}_token_rewards"].append((torch.rand(len(r), generator=g) - 0.5).tolist())
            if ref:
                tok = (-torch.rand(len(r), generator=g) * 5).tolist()
                rows[f"ref_{side}_token_logps"].append(tok)
                rows[f"ref_{side}_logps"].append(sum(tok))
    return Dataset.from_dict(rows)


def write_pairs(path, tokenizer, dataset=None, **kw):
    write_annotated(make_pairs(**kw) if dataset is None else dataset, path,
                    {"tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "source": "test",
                     "template": "revision"})
    return path


@pytest.fixture(scope="module")
def tok():
    from tiny import tiny_tokenizer
    return tiny_tokenizer("llama3")


def test_roundtrip_and_meta(tmp_path, tok):
    write_pairs(tmp_path / "ann", tok, n=5)
    data, meta = load_annotated(tmp_path / "ann", tok)
    assert len(data) == 5 and meta["stage"] == "annotate" and meta["num_pairs"] == 5
    assert meta["tokenizer_fingerprint"] == tokenizer_fingerprint(tok)


def _edit(dataset, column, row, value):
    values = list(dataset[column])
    values[row] = value
    return dataset.remove_columns(column).add_column(column, values)


@pytest.mark.parametrize("case, field, row", [
    ("missing_column", "rejected_token_rewards", None),
    ("reward_length", "chosen_token_rewards", 3),
    ("nan_reward", "rejected_token_rewards", 2),
    ("inf_ref_token", "ref_chosen_token_logps", 4),
    ("nan_ref_sum", "ref_rejected_logps", 1),
    ("empty_response", "chosen_input_ids", 5),
])
def test_bad_rows_name_row_and_field(tmp_path, tok, case, field, row):
    d = make_pairs(8, ref=True)
    if case == "missing_column":
        d = d.remove_columns(field)
    elif case == "reward_length":
        d = _edit(d, field, row, d[field][row] + [0.1])
    elif case == "nan_reward":
        d = _edit(d, field, row, [0.1] * (len(d["rejected_input_ids"][row]) - 1) + [float("nan")])
    elif case == "inf_ref_token":
        d = _edit(d, field, row, [float("-inf")] + d[field][row][1:])
    elif case == "nan_ref_sum":
        d = _edit(d, field, row, float("nan"))
    elif case == "empty_response":
        d = _edit(_edit(_edit(d, field, row, []), "chosen_token_rewards", row, []), "ref_chosen_token_logps", row, [])
    write_pairs(tmp_path / "bad", tok, d)
    with pytest.raises(TregError) as err:
        load_annotated(tmp_path / "bad", tok)
    assert err.value.field == field and err.value.row == row and err.value.file == str(tmp_path / "bad")


def test_fingerprint_empty_and_need_rewards(tmp_path, tok):
    from tiny import tiny_tokenizer
    write_pairs(tmp_path / "ann", tok, n=3)
    with pytest.raises(TregError, match="another tokenizer") as err:
        load_annotated(tmp_path / "ann", tiny_tokenizer("chatml"))
    assert err.value.field == "tokenizer_fingerprint"
    write_pairs(tmp_path / "empty", tok, make_pairs(3).select([]))
    with pytest.raises(TregError, match="empty dataset"):
        load_annotated(tmp_path / "empty", tok)
    write_pairs(tmp_path / "norew", tok, make_pairs(3).remove_columns(["chosen_token_rewards",
                                                                        "rejected_token_rewards"]))
    assert len(load_annotated(tmp_path / "norew", tok, need_rewards=False).dataset) == 3
    with pytest.raises(TregError, match="no such"):
        load_annotated(tmp_path / "nowhere", tok)


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_collator_truncates_exactly_like_trl(mode):
    """Ids, masks and lengths equal TRL 1.16 DataCollatorForPreference; rewards move in lockstep."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    d = make_pairs(6, seed=3, prompt=(2, 9), response=(1, 12), ref=True)
    long_prompts = sum(len(p) >= 9 for p in d["prompt_input_ids"])
    d, dropped = truncate_pairs(d, 9, mode)
    rows = list(d)
    ours = PairCollator(pad_token_id=0, max_length=9, truncation_mode=mode)(rows)
    trl = DataCollatorForPreference(pad_token_id=0, max_length=9, truncation_mode=mode)(
        [{"prompt_ids": r["prompt_input_ids"], "chosen_ids": r["chosen_input_ids"],
          "rejected_ids": r["rejected_input_ids"]} for r in rows])
    assert torch.equal(ours["input_ids"], trl["input_ids"])
    assert torch.equal(ours["attention_mask"], trl["attention_mask"])
    expected_mask = trl["completion_mask"].float()
    expected_mask[:, 0] = 0  # TRL never scores position 0 either (it shifts by one)
    assert torch.equal(ours["response_mask"], expected_mask)
    if mode == "keep_start":  # kept tokens keep their prefix: stored values stay, sums follow the kept tokens
        assert torch.allclose(ours["ref_token_logps"][:len(rows)].sum(1), ours["ref_chosen_logps"], atol=1e-4)
    else:                     # keep_end cut the prompt's head: those rows are nulled for recomputation
        assert "ref_chosen_logps" not in ours and any(r["ref_chosen_logps"] is None for r in rows)
    if mode == "keep_start":
        assert dropped == long_prompts
    b = len(rows)
    for i, r in enumerate(rows):  # the reward of each kept token is the one annotated for that token
        for k, side in enumerate(("chosen", "rejected")):
            resp, rew = r[f"{side}_input_ids"], r[f"{side}_token_rewards"]
            pos0, lo, hi = response_window(len(r["prompt_input_ids"]), len(resp), 9, mode)
            for j in range(lo, hi):
                assert ours["input_ids"][k * b + i, pos0 + j] == resp[j]
                expected = rew[j] if pos0 + j > 0 else 0.0  # position 0 has no context: never scored
                assert ours["token_rewards"][k * b + i, pos0 + j] == pytest.approx(expected)
            assert int(ours["response_mask"][k * b + i].sum()) == hi - lo - (pos0 + lo == 0)


def test_keep_start_drops_pairs_whose_prompt_fills_max_length(caplog):
    d = make_pairs(4, prompt=(3, 3), response=(2, 2))  # prompts: 4 tokens
    prompts = list(d["prompt_input_ids"])
    prompts[1] = prompts[1] + [5, 6, 7]                  # row 1 prompt: 7 tokens
    d = d.remove_columns("prompt_input_ids").add_column("prompt_input_ids", prompts)
    kept, dropped = truncate_pairs(d, 7, "keep_start")
    assert dropped == 1 and len(kept) == 3
    kept_end, dropped_end = truncate_pairs(d, 7, "keep_end")
    assert dropped_end == 0 and len(kept_end) == 4
    caplog.clear()
    with pytest.raises(TregError, match="every pair was dropped"):
        truncate_pairs(d, 3, "keep_start")
    assert not caplog.records  # the error is the one line: no "dropped N of N" warning before it
    assert truncate_sequence([1, 2, 3], 2, "keep_end") == [2, 3]


def test_collator_without_truncation_keeps_reference_and_pads_right():
    d = make_pairs(3, ref=True)
    d2, dropped = truncate_pairs(d, 1024, "keep_start")
    assert dropped == 0 and "ref_chosen_logps" in d2.column_names
    batch = PairCollator(pad_token_id=0, pad_to_multiple_of=8)(list(d2))
    assert batch["input_ids"].shape[0] == 6 and batch["input_ids"].shape[1] % 8 == 0
    for i, r in enumerate(d2):
        assert batch["ref_chosen_logps"][i] == pytest.approx(r["ref_chosen_logps"])
        assert batch["ref_token_logps"][i].sum() == pytest.approx(r["ref_chosen_logps"], rel=1e-5)
        n = len(r["prompt_input_ids"]) + len(r["chosen_input_ids"])
        assert batch["attention_mask"][i].sum() == n and (batch["input_ids"][i, n:] == 0).all()
