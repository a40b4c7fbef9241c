"""End to end on a tiny local model: sample -> score -> annotate -> train -> generate -> eval via
`treg pipeline`, every stage's output checked against its schema; a rerun skips complete stages."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from tiny import save_tiny_model  # noqa: E402

from treg.cli import main as cli  # noqa: E402

PROMPTS = ["Hello there", "What is a fox?", "Numbers like 12345", "def add(a, b):", "Say hi", "Rewrite this",
           "Leading spaces matter", "Quotes like this"]
REWARD = "def reward(prompt, response):\n    return float(sum(c in 'aeiou ' for c in response)) + 0.01 * len(response)\n"


def _config(tmp_path, eval_boot=100):
    import yaml
    rf = f"{tmp_path / 'reward.py'}:reward"
    return {
        "workdir": str(tmp_path / "run"),
        "model": str(tmp_path / "policy"),
        "sample": {"prompts": str(tmp_path / "prompts.jsonl"), "n": 3, "temperature": 1.0, "max_new_tokens": 12,
                   "shard_size": 4, "batch_size": 12},
        "score": {"reward_fn": rf},
        "annotate": {"template": "revision", "no_progress": True},
        "train": {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-3, "alpha": 0.25,
                  "beta": 0.1, "logging_steps": 1, "report_to": "none", "save_strategy": "no", "max_length": 256,
                  "dtype": "float32", "seed": 0},
        "generate": [{"name": "policy", "prompts": str(tmp_path / "alpaca.json"), "format": "alpaca_eval",
                      "max_new_tokens": 8},
                     {"name": "base", "model": "reference", "prompts": str(tmp_path / "alpaca.json"),
                      "format": "alpaca_eval", "max_new_tokens": 8, "temperature": 1.0}],
        "eval": [{"name": "policy", "outputs": "@policy", "baseline": "@base", "reward_fn": rf,
                  "bootstrap": eval_boot}],
    }, yaml


@pytest.fixture
def setup(tmp_path):
    save_tiny_model(tmp_path / "policy", "llama3")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    (tmp_path / "alpaca.json").write_text(json.dumps([{"instruction": p, "dataset": "t"} for p in PROMPTS[:4]]))
    (tmp_path / "reward.py").write_text(REWARD)
    return tmp_path


def _write(cfg, yaml, path):
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_end_to_end_then_skip(setup, capsys):
    tmp = setup
    cfg, yaml = _config(tmp)
    path = _write(cfg, yaml, tmp / "pipe.yaml")
    assert cli(["pipeline", "--config", path]) == 0
    run = tmp / "run"
    import datasets
    # sample: prompt, prompt_id, N responses
    samples = datasets.load_from_disk(str(run / "samples"))
    assert {"prompt", "prompt_id", "responses", "response_tokens", "finish_reasons"} <= set(samples.column_names)
    assert len(samples) == len(PROMPTS) and all(len(r) == 3 for r in samples["responses"])
    # score: TRL preference format + scores, readable by annotate's reader
    pairs = datasets.load_from_disk(str(run / "pairs"))
    assert {"prompt", "chosen", "rejected", "score_chosen", "score_rejected", "all_scores"} <= set(pairs.column_names)
    assert all(c > r for c, r in zip(pairs["score_chosen"], pairs["score_rejected"]))
    # annotate: the annotated-dataset contract of treg.io.data
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from treg.io.data import load_annotated
    tok = AutoTokenizer.from_pretrained(tmp / "policy")
    ann = load_annotated(str(run / "annotated"), tok, need_rewards=True).dataset
    assert len(ann) == len(pairs)
    # train: a loadable model that differs from the start
    trained = AutoModelForCausalLM.from_pretrained(run / "model")
    start = AutoModelForCausalLM.from_pretrained(tmp / "policy")
    assert any((a - b).abs().max() > 0 for a, b in zip(trained.parameters(), start.parameters()))
    # generate: AlpacaEval files
    for name in ("policy", "base"):
        rows = json.loads((run / "outputs" / f"{name}.json").read_text())
        assert [r["instruction"] for r in rows] == PROMPTS[:4]
        assert all(set(r) == {"instruction", "output", "generator", "dataset"} for r in rows)
    # eval: the report
    rep = json.loads((run / "eval" / "policy.json").read_text())
    assert rep["n"] == 4 and 0 <= rep["win_rate"] <= 100 and rep["ci95_low"] <= rep["win_rate"] <= rep["ci95_high"]
    assert rep["wins"] + rep["ties"] + rep["losses"] == 4 and "lc_win_rate" in rep
    capsys.readouterr()

    # unchanged: everything skipped, with the reason
    assert cli(["pipeline", "--config", path]) == 0
    out = capsys.readouterr().out
    assert out.count("skip") >= 7 and "fingerprint" in out and "ran 0 stage(s)" in out

    # an eval option changed: only eval reruns
    cfg2, _ = _config(tmp, eval_boot=150)
    path2 = _write(cfg2, yaml, tmp / "pipe2.yaml")
    assert cli(["pipeline", "--config", path2]) == 0
    out = capsys.readouterr().out
    assert "run  eval:policy: its arguments or inputs changed" in out and "ran 1 stage(s)" in out


def test_bad_pipeline_configs(tmp_path, capsys):
    import yaml
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"workdir": str(tmp_path / "w"), "model": "m", "sampel": {}}))
    assert cli(["pipeline", "--config", str(bad)]) == 2
    assert "sampel" in capsys.readouterr().err
    bad.write_text(yaml.safe_dump({"workdir": str(tmp_path / "w"), "model": "m",
                                   "eval": [{"name": "x", "outputs": "@nope", "baseline": "b.json"}]}))
    assert cli(["pipeline", "--config", str(bad)]) == 2
    assert "@nope" in capsys.readouterr().err
    # a misspelled stage option is refused before any stage runs
    bad.write_text(yaml.safe_dump({"workdir": str(tmp_path / "w"), "model": "m",
                                   "sample": {"prompts": "p.jsonl", "max_new_tokns": 8},
                                   "train": {"max_steps": 1}}))
    assert cli(["pipeline", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "field 'sample.max_new_tokns'" in err and "unknown option of treg sample" in err
    assert not (tmp_path / "w").exists()
