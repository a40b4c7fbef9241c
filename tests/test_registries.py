"""The registries are the single source of truth (issue 10): every variant axis is one table that config
choices, CLI help, trainer decisions and docs read; a new entry works without touching the trainer."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from test_data import make_pairs  # noqa: E402
from test_trainer import config  # noqa: E402
from tiny import tiny_llama, tiny_tokenizer  # noqa: E402
from treg.errors import TregError  # noqa: E402
from treg.io import schema  # noqa: E402
from treg.io.formats import OUTPUT_FORMATS, format_records  # noqa: E402
from treg.io.shards import ShardedWriter  # noqa: E402
from treg.method.losses import PREFERENCE_LOSSES, WEIGHTINGS, PairwiseLoss, needs_token_rewards  # noqa: E402
from treg.method.token_rewards import TOKEN_REWARD_SOURCES, sigmoid_half  # noqa: E402
from treg.stages.config import TRegConfig  # noqa: E402
from treg.stages.trainer import TRegTrainer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _config(tmp_path, **kw) -> TRegConfig:
    return config(tmp_path, **{"max_steps": 2, **kw})


# ------------------------------------------------------------------------------ derived surfaces
def test_cli_choices_and_help_come_from_the_registries():
    from treg.cli.annotate import build_parser as annotate_parser
    from treg.cli.generate import build_parser as generate_parser
    from treg.stages.config import TRegConfig
    fields = TRegConfig.__dataclass_fields__
    assert fields["method"].metadata["choices"] == list(PREFERENCE_LOSSES)
    assert fields["weighting"].metadata["choices"] == list(WEIGHTINGS)
    for name, entry in PREFERENCE_LOSSES.items():
        assert entry.doc in fields["method"].metadata["help"], name
    actions = {a.dest: a for a in annotate_parser()._actions}
    assert list(actions["source"].choices) == list(TOKEN_REWARD_SOURCES)
    for name, src in TOKEN_REWARD_SOURCES.items():
        assert src.doc in actions["source"].help, name
    actions = {a.dest: a for a in generate_parser()._actions}
    assert list(actions["format"].choices) == list(OUTPUT_FORMATS)


def test_docs_tables_list_every_entry():
    """docs/losses.md has one table row per loss and weighting, docs/annotate.md per token-reward source,
    docs/evaluation.md per output format (a new entry without its docs line fails here)."""
    for doc, registry in (("losses.md", PREFERENCE_LOSSES), ("losses.md", WEIGHTINGS),
                          ("annotate.md", TOKEN_REWARD_SOURCES), ("evaluation.md", OUTPUT_FORMATS)):
        text = (ROOT / "docs" / doc).read_text(encoding="utf-8")
        rows = set(re.findall(r"^\| `([\w-]+)` \|", text, re.M))
        missing = set(registry) - rows
        assert not missing, f"docs/{doc} has no table row for {sorted(missing)}"


def test_no_variant_string_comparisons_outside_the_registries():
    """grep '== "dpo"' / '== "simpo"' / '"sft-chosen"' in treg/ finds only the registry entries."""
    pattern = re.compile(r'== "dpo"|== "simpo"|"sft-chosen"|method in \("dpo"|source in \(')
    allowed = {ROOT / "treg/method/losses.py", ROOT / "treg/method/token_rewards.py"}
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "treg").rglob("*.py") if p not in allowed
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


# ------------------------------------------------------------------------------ losses
def test_gamma_is_refused_for_a_loss_without_margin(tmp_path):
    for name, entry in PREFERENCE_LOSSES.items():
        if entry.uses_gamma:
            assert _config(tmp_path, method=name, gamma=0.5).gamma == 0.5
        else:
            with pytest.raises(TregError, match="no target margin"):
                _config(tmp_path, method=name, gamma=0.5)


def test_needs_token_rewards_is_the_one_rule():
    assert needs_token_rewards(0.25) and not needs_token_rewards(0.0)
    assert schema.required_columns(need_token_rewards=True) == schema.REQUIRED + schema.REWARD_COLUMNS
    assert schema.required_columns(need_token_rewards=False) == schema.REQUIRED


@pytest.mark.parametrize("method", sorted(PREFERENCE_LOSSES))
def test_trainer_reference_pass_follows_needs_ref(method, tmp_path):
    """The trainer computes reference log-probs exactly for entries with needs_ref (IPO included), and
    trains every entry; nothing in the trainer names a loss."""
    tok = tiny_tokenizer("llama3")
    beta = 2.0 if method == "simpo" else 0.1
    trainer = TRegTrainer(tiny_llama(len(tok)), args=_config(tmp_path, method=method, beta=beta, alpha=0.25),
                          train_dataset=make_pairs(8), processing_class=tok)
    has_ref = all(c in trainer.train_dataset.column_names for c in schema.REF_SUM.values())
    assert has_ref == PREFERENCE_LOSSES[method].needs_ref
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_a_new_loss_is_one_entry(tmp_path):
    """Register a loss at run time (length-normalised DPO with a reference): the trainer runs its
    reference pass and trains it, with no other change."""
    dpo = PREFERENCE_LOSSES["dpo"]
    PREFERENCE_LOSSES["dpo_norm_test"] = PairwiseLoss(doc="test", token_scale=lambda n, beta: beta / n,
                                                      needs_ref=True, link=dpo.link, link_weight=dpo.link_weight)
    try:
        tok = tiny_tokenizer("llama3")
        trainer = TRegTrainer(tiny_llama(len(tok)), args=_config(tmp_path, method="dpo_norm_test", alpha=0.1),
                              train_dataset=make_pairs(8), processing_class=tok)
        assert schema.REF_SUM["chosen"] in trainer.train_dataset.column_names
        trainer.train()
        assert any("loss" in h for h in trainer.state.log_history)
    finally:
        del PREFERENCE_LOSSES["dpo_norm_test"]


# ------------------------------------------------------------------------------ token-reward sources
def test_token_reward_rules_by_hand():
    lp = {("plain", "ref"): np.array([-1.0, -2.0], np.float32), ("better", "ref"): np.array([-1.0, -3.0], np.float32),
          ("worse", "ref"): np.array([-2.0, -1.0], np.float32), ("plain", "dpo"): np.array([0.0, -2.0], np.float32)}
    s = 1 / (1 + np.exp(-1.0)) - 0.5  # sigmoid(1) - 0.5
    got = TOKEN_REWARD_SOURCES["contrastive"].rewards(lp, "chosen", 0.1, 2)
    assert got == pytest.approx([s, 1 / (1 + np.exp(2.0)) - 0.5], abs=1e-6)
    got = TOKEN_REWARD_SOURCES["dpo"].rewards(lp, "rejected", 2.0, 2)  # sigmoid(2 * (0 - -1)), sigmoid(0)
    assert got == pytest.approx([1 / (1 + np.exp(-2.0)) - 0.5, 0.0], abs=1e-6)
    assert TOKEN_REWARD_SOURCES["sft-chosen"].rewards({}, "chosen", 0.1, 3).tolist() == [0.5] * 3
    assert TOKEN_REWARD_SOURCES["sft-chosen"].rewards({}, "rejected", 0.1, 2).tolist() == [0.0] * 2
    assert sigmoid_half(np.array([0.0])).dtype == np.float32
    for src in TOKEN_REWARD_SOURCES.values():  # declared passes are exactly what the rule reads
        needed = {("plain", "ref"), *src.scores}
        src.rewards({k: v for k, v in lp.items() if k in needed}, "chosen", 0.1, 2)


def test_annotate_runs_only_the_passes_a_source_declares():
    from treg.io.chat import ChatFormat, preference_rows
    from treg.stages.annotate import annotate_pairs, build_pairs, make_config
    tok = tiny_tokenizer("llama3")
    rows = preference_rows([{"prompt": "add 2 and 3", "chosen": "5", "rejected": "six"}])
    calls = []

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = tiny_llama(len(tok))
            self.config = self.inner.config

        def forward(self, *a, **kw):
            calls.append(1)
            return self.inner(*a, **kw)

    for name, src in TOKEN_REWARD_SOURCES.items():
        cfg = make_config(template="instruction", source=name, beta=0.1, max_length=None, batch_tokens=4096,
                          use_chat_template=True, dpo_model=object() if src.needs_dpo_model else None)
        pairs = build_pairs(rows, ChatFormat(tok), cfg)
        contexts = {key[1] for key in pairs[0].ctx}
        assert contexts == ({"plain", "better", "worse"} if src.needs_template else {"plain"}), name
        dpo = tiny_llama(len(tok), seed=1).eval() if src.needs_dpo_model else None
        out = annotate_pairs(pairs, tiny_llama(len(tok)).eval(), cfg, pad_id=0, dpo_model=dpo)
        got = {k[1:] for k in pairs[0].out}
        assert got == {("plain", "ref"), *src.scores}, name
        assert len(out[0][schema.REWARDS["chosen"]]) == len(out[0][schema.IDS["chosen"]])


# ------------------------------------------------------------------------------ formats, shards, loader
def test_every_output_format_renders_and_checks_its_suffix(tmp_path):
    rec = [{"prompt": "hi", "prompt_id": "p1", "output": "**yo**", "n_tokens": 2, "finish_reason": "stop"}]
    for name, fmt in OUTPUT_FORMATS.items():
        text = format_records(rec, name, "gen")
        assert "yo" in text and "gen" in text, name
        if fmt.suffix == ".json":
            assert json.loads(text)[0]["generator"] == "gen"
    with pytest.raises(TregError, match="unknown output format"):
        format_records(rec, "csv", "gen")


def test_sharded_stage_plan_resume_and_ranks(tmp_path):
    rows = list(range(7))
    ranks = [SimpleNamespace(process_index=r, num_processes=2, wait_for_everyone=lambda: None) for r in (0, 1)]
    seen = {}
    for state in ranks:  # two "processes" in turn: each does its own shards (i % 2 == rank)
        w = ShardedWriter.for_rows(tmp_path / "out", rows, shard_size=3, settings={"s": 1}, state=state)
        assert w.num_shards == 3 and w.shard_rows(2) == [6]
        w.run(lambda i, chunk: [{"x": v} for v in chunk], after_shard=lambda i: seen.setdefault(i, state.process_index))
    assert seen == {0: 0, 1: 1, 2: 0}
    w = ShardedWriter.for_rows(tmp_path / "out", rows, shard_size=3, settings={"s": 1})
    assert w.pending_shards() == [] and w.pending_rows() == 0  # resumed: all done
    w.finalize({"stage": "test"})
    from datasets import load_from_disk
    assert load_from_disk(str(tmp_path / "out"))["x"] == rows


def test_loader_errors_and_dtype(tmp_path):
    from treg.io.loading import load_causal_lm, load_tokenizer, pad_token_id, resolve_dtype
    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(TregError, match="unknown dtype"):
        resolve_dtype("float8")
    with pytest.raises(TregError, match="no such model directory"):
        load_causal_lm(str(tmp_path / "missing"), field="model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TregError) as err:
        load_tokenizer(str(tmp_path / "empty"), field="model")
    assert "cannot load a tokenizer" in str(err.value) and str(tmp_path / "empty") in str(err.value)
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=7)) == 7
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0


def test_layers_import_only_downwards():
    """treg/io and treg/method import nothing from stages, toy or cli; stages nothing from toy or cli
    (lazy imports inside functions included); and no import cycle among modules at import time."""
    import ast
    upper = {"io": ("treg.stages", "treg.toy", "treg.cli"), "method": ("treg.stages", "treg.toy", "treg.cli"),
             "stages": ("treg.toy", "treg.cli")}
    bad = []
    for layer, banned in upper.items():
        for path in (ROOT / "treg" / layer).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                    [a.name for a in node.names] if isinstance(node, ast.Import) else []
                bad += [f"{path.relative_to(ROOT)} imports {n}" for n in names if n.startswith(banned)]
    # pipeline.py may look up the CLI's command table lazily (it runs commands); nothing else may
    bad = [b for b in bad if not b.startswith("treg/stages/pipeline.py imports treg.cli")]
    assert not bad, bad
