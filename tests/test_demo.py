"""`treg demo` end to end (reduced sizes): the three files, and every reported number recomputed."""

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from treg.cli import main
    out = tmp_path_factory.mktemp("demo") / "run"
    argv = ["demo", "--quick", "--ablations", "--seeds", "2", "--out", str(out), "--train-prompts", "24",
            "--eval-prompts", "12", "--steps", "3", "--batch-size", "4", "--quiet"]
    assert main(argv) == 0
    return out


def _jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_demo_writes_the_three_files_with_the_schema(demo_run):
    for name in ("results.json", "report.md", "report.html"):
        assert (demo_run / name).stat().st_size > 0
    res = json.loads((demo_run / "results.json").read_text())
    assert set(res["methods"]) == {"dpo", "dpo_reg", "dpo_reg_static", "dpo_sft", "dpo_reg_dpo_reward",
                                   "simpo", "simpo_reg"}
    for m in res["methods"].values():
        assert {"eval_reward_mean", "eval_reward_std", "exact_match", "mean_length", "seeds"} <= set(m)
        assert [s["seed"] for s in m["seeds"]] == [0, 1]
    assert set(res["token_reward_auroc"]) == {"contrastive", "dpo_implicit"}
    assert all(0.0 <= v <= 1.0 for v in res["token_reward_auroc"].values())
    assert res["wall_seconds"] > 0 and res["config"]["seeds"] == 2
    html = (demo_run / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 1 and "<span style=" in html


def test_reported_numbers_are_recomputed_from_saved_outputs(demo_run):
    from sklearn.metrics import roc_auc_score
    from treg.toy import world
    res = json.loads((demo_run / "results.json").read_text())
    report = (demo_run / "report.md").read_text()
    for name, m in res["methods"].items():
        per_seed = []
        for s in (0, 1):
            recs = _jsonl(demo_run / "eval" / name / f"seed{s}.jsonl")
            assert len(recs) == 12
            for r in recs:  # the saved judgement is the verifier's
                v = world.verify(r["query"], r["response"])
                assert (r["reward"], r["exact"], r["length"]) == (v.reward, v.exact, v.length)
            per_seed.append((np.mean([r["reward"] for r in recs]), np.mean([r["exact"] for r in recs]),
                             np.mean([r["length"] for r in recs])))
        per_seed = np.array(per_seed)
        assert m["eval_reward_mean"] == pytest.approx(per_seed[:, 0].mean())
        assert m["eval_reward_std"] == pytest.approx(per_seed[:, 0].std(ddof=1))
        assert m["exact_match"] == pytest.approx(per_seed[:, 1].mean())
        assert m["mean_length"] == pytest.approx(per_seed[:, 2].mean())
        row = f"{per_seed[:, 0].mean():.3f} ± {per_seed[:, 0].std(ddof=1):.3f}"
        assert re.search(rf"\(`{name}`\) \| {re.escape(row)} \|", report), (name, row)
    for key, suffix in (("contrastive", "contrastive"), ("dpo_implicit", "dpo")):
        aucs = []
        for s in (0, 1):
            labels, scores = [], []
            for rec in _jsonl(demo_run / "tokens" / f"seed{s}.jsonl"):
                for side in ("chosen", "rejected"):
                    for lab, r in zip(world.verify(rec["query"], rec[side]).labels, rec[f"{side}_{suffix}"]):
                        labels.append(lab == "correct")
                        scores.append(r)
            aucs.append(roc_auc_score(labels, scores))
        assert res["token_reward_auroc"][key] == pytest.approx(np.mean(aucs))
        assert f"{np.mean(aucs):.3f} ± {np.std(aucs, ddof=1):.3f}" in report


def test_demo_token_rewards_follow_each_method(demo_run):
    """Contrastive r_hat lies in (-0.5, 0.5) and is aligned 1:1 with the response tokens (+ end of turn)."""
    for rec in _jsonl(demo_run / "tokens" / "seed0.jsonl"):
        for side in ("chosen", "rejected"):
            assert len(rec[f"{side}_contrastive"]) == len(rec[side].split()) + 1 == len(rec[f"{side}_ids"])
            assert all(-0.5 < r < 0.5 for r in rec[f"{side}_contrastive"] + rec[f"{side}_dpo"])


def test_demo_user_errors(tmp_path, capsys):
    from treg.cli import main
    assert main(["demo", "--seeds", "0", "--out", str(tmp_path / "d")]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert main(["demo", "--model", str(tmp_path), "--out", str(tmp_path / "d")]) == 2
    assert not (tmp_path / "d" / "results.json").exists()
    (tmp_path / "file").write_text("x")
    assert main(["demo", "--quick", "--out", str(tmp_path / "file" / "sub")]) == 2
    assert "output directory" in capsys.readouterr().err


def test_rerun_replaces_previous_outputs(tmp_path):
    """A run never mixes with an earlier run's per-seed files, and leaves no staging directory."""
    from treg.cli import main
    out = tmp_path / "run"
    (out / "eval" / "dpo").mkdir(parents=True)
    (out / "eval" / "dpo" / "seed7.jsonl").write_text('{"reward": 99}\n')
    (out / "notes.txt").write_text("mine")
    assert main(["demo", "--quick", "--seeds", "1", "--out", str(out), "--train-prompts", "16",
                 "--eval-prompts", "8", "--steps", "2", "--quiet"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [s["seed"] for s in res["methods"]["dpo"]["seeds"]] == [0]
    assert sorted(p.name for p in (out / "eval" / "dpo").iterdir()) == ["seed0.jsonl"]
    assert (out / "notes.txt").read_text() == "mine"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_report_without_matplotlib_says_which_extra(demo_run, monkeypatch, capsys):
    from treg.toy.report import html_report
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as in a plain `pip install treg`
    res = json.loads((demo_run / "results.json").read_text())
    html = html_report(demo_run, res)
    assert "data:image/png;base64," not in html and "pip install &#x27;treg[plots]&#x27;" in html
    assert "treg[plots]" in capsys.readouterr().err
