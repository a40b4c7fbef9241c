"""`treg probe` (issue 11): planted corruptions, the AUROC on exactly the planted tokens, the CLI on the
toy checkpoint (AUROC >= 0.9), the pipeline's probe gate, bad input."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from treg.cli import main as cli
from treg.io.chat import ChatFormat, PreferenceRow, preference_rows
from treg.method.corrupt import Corruption, STRATEGIES, corrupt, name_pool, names, planted_tokens
from treg.stages.probe import NOISE, SIGNAL, MethodResult, Planted, auroc, metrics, plant
from treg.toy import checkpoint_path, pipeline, template_path, world


def toy_records(n: int, seed: int = 0) -> list[dict]:
    return pipeline.reference_pairs(n, seed)


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# ------------------------------------------------------------------------------------------- AUROC
def test_auroc_hand_computed():
    # pos 0.3 beats both (2); 0.2 ties 0.2 (0.5) and beats 0.0 (1); 0.1 beats 0.0 (1) -> 4.5 / 6
    assert auroc([0.3, 0.2, 0.1], [0.2, 0.0]) == pytest.approx(0.75)
    assert auroc([1.0], [0.0]) == 1.0 and auroc([0.0], [1.0]) == 0.0
    assert auroc([], [1.0]) is None


def _planted(n_text: int, idx: list[int], strategy: str = "number") -> Planted:
    row = PreferenceRow(0, 1, [{"role": "user", "content": "q"}], "c", "r")
    return Planted(row, Corruption(strategy, "x", (0, 1), "y", "x"), idx, n_text)


def test_metrics_use_exactly_the_planted_tokens_and_leave_out_end_of_turn():
    # response A: 4 text tokens + 1 end-of-turn token, token 1 planted;
    # response B: 3 text tokens + 1 end-of-turn token, tokens 0 and 1 planted.
    planted = [_planted(4, [1]), _planted(3, [0, 1])]
    corrupted = [np.array([0.4, -0.3, 0.2, 0.1, -0.5]), np.array([0.0, 0.1, 0.3, -0.9])]
    res = MethodResult("contrastive:x", {"corrupted": corrupted,
                                          "chosen": [np.array([1.0]), np.array([0.0])],
                                          "rejected": [np.array([0.5]), np.array([0.0])]})
    out = metrics(planted, res, bootstrap=50, seed=0, min_auroc=0.6)
    # rest = {0.4, 0.2, 0.1 | 0.3}, planted = {-0.3 | 0.0, 0.1}: 3 + 3 + (1 + 1 + 0.5) + 3 = 11.5 of 12
    assert out["auroc"] == pytest.approx(11.5 / 12, abs=1e-4)
    assert out["agreement"] == pytest.approx(0.75)          # pair 1 chosen wins, pair 2 ties
    assert out["clean_beats_corrupted"] == 1.0  # sums over all tokens: 1.0 > -0.1 and 0.0 > -0.5
    assert out["verdict"] == SIGNAL and out["auroc_ci"][0] <= out["auroc"] <= out["auroc_ci"][1]
    # the same rewards with the planted labels moved by one token give a different AUROC
    shifted = metrics([_planted(4, [2]), _planted(3, [1, 2])], res, bootstrap=10)
    assert shifted["auroc"] != pytest.approx(out["auroc"])
    flipped = MethodResult("contrastive:x", {**res.rewards, "corrupted": [-c for c in corrupted]})
    assert metrics(planted, flipped, bootstrap=50)["verdict"] == NOISE
    assert metrics(planted, MethodResult("random", res.rewards), bootstrap=10)["verdict"] is None
    # a chosen response that loses to rejected on the user's pairs: no signal, whatever the AUROC
    losing = MethodResult("contrastive:x", {**res.rewards, "chosen": [np.array([0.0]), np.array([-1.0])]})
    lost = metrics(planted, losing, bootstrap=50)
    assert lost["auroc"] == out["auroc"] and lost["agreement"] == 0.0 and lost["verdict"] == NOISE


def test_auroc_is_the_mean_over_strategies():
    # number: planted 0.0 below 0.5, 0.5 -> 1.0; offtopic: planted {0.3, 0.2, 0.4} above {0.1, 0.0} -> 0.0
    planted = [_planted(3, [0], "number"), _planted(5, [1, 2, 3], "offtopic")]
    corrupted = [np.array([0.0, 0.5, 0.5, 0.0]), np.array([0.1, 0.3, 0.2, 0.4, 0.0, 0.0])]
    res = MethodResult("contrastive:x", {"corrupted": corrupted, "chosen": [np.ones(1)] * 2,
                                          "rejected": [np.zeros(1)] * 2})
    out = metrics(planted, res, bootstrap=20)
    assert out["auroc_by_strategy"] == {"number": 1.0, "offtopic": 0.0}
    assert out["auroc"] == 0.5
    # pooled: 0.5, 0.5 beat all four planted (8); 0.1 beats 0.0 (1); 0.0 ties 0.0 (0.5) -> 9.5 / 16
    assert out["auroc_pooled"] == pytest.approx(9.5 / 16, abs=1e-4)
    assert out["verdict"] == NOISE


# ------------------------------------------------------------------------------------- corruptions
TEXT = "The capital of France is Paris. It has 2145 bridges and the Seine flows through Paris."


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_strategy_plants_the_recorded_span(strategy):
    pool = ["Berlin", "Rome", "Madrid", "New York"]
    c = corrupt(TEXT, strategy, random.Random(3), pool=pool)
    assert c is not None and c.strategy == strategy
    s, e = c.span
    assert c.text[s:e] == c.planted
    # outside the span the text is unchanged
    assert c.text[:s] + c.original + c.text[e:] == TEXT
    if strategy == "number":
        assert c.original == "2145" and len(c.planted) == 4 and c.planted[0] != "2"
    elif strategy == "entity":
        assert c.original in ("France", "Paris", "Seine") and c.planted in pool
    elif strategy == "negation":
        assert c.planted == " not" and c.original == "" and c.text[:s].endswith(("is", "has"))
    else:
        assert c.original == "" and c.planted.startswith(" ") and c.text[s - 1] == "."


def test_strategies_that_do_not_apply_return_none():
    rng = random.Random(0)
    assert corrupt("no digits here", "number", rng) is None
    assert corrupt("all lower case words", "entity", rng, pool=["Paris"]) is None
    assert corrupt("The sky looks blue", "negation", rng) is None
    assert corrupt("a 3 b 4", "entity", rng, pool=[]) is None
    assert names("Paris is big. London is not in France.") == [(31, 37, "France")]  # sentence-initial names skipped
    assert name_pool(["We met in New York and Rome.", "Rome again."]) == ["New York", "Rome"]


def test_planted_tokens_by_offsets():
    offsets = [(0, 3), (3, 11), (11, 14), (14, 21), (21, 24), (24, 30), (30, 31)]  # "The capital of France is Paris."
    assert planted_tokens(offsets, (25, 30)) == [5]
    assert planted_tokens(offsets, (24, 30)) == [5]
    assert planted_tokens(offsets, (20, 26)) == [3, 4, 5]
    assert planted_tokens(offsets, (31, 31)) == []


def test_plant_on_a_bpe_tokenizer_labels_the_tokens_of_the_planted_text():
    from tests.tiny import tiny_tokenizer
    tok = tiny_tokenizer("chatml")
    fmt = ChatFormat(tok)
    rows = preference_rows([{"prompt": f"Question {i}?", "chosen": TEXT, "rejected": "The capital is Rome."}
                            for i in range(12)])
    for strategy in STRATEGIES:
        got = plant(rows, fmt, strategies=[strategy], n_pairs=12, seed=1)
        assert len(got) == 12
        for x in got:
            ids = fmt.response_ids(x.corruption.text)[:x.n_text]
            text = tok.decode([ids[i] for i in x.planted])
            assert x.corruption.planted.strip() in text
            rest = tok.decode([t for i, t in enumerate(ids) if i not in x.planted])
            assert x.corruption.planted.strip() not in rest or strategy == "negation"
            assert x.planted == sorted(x.planted) and x.planted[-1] - x.planted[0] == len(x.planted) - 1


def test_plant_on_the_toy_uses_numbers_only_and_draws_n_pairs():
    from transformers import AutoTokenizer
    fmt = ChatFormat(AutoTokenizer.from_pretrained(checkpoint_path()))
    rows = preference_rows(toy_records(30))
    got = plant(rows, fmt, n_pairs=20, seed=0)
    assert len(got) == 20 and {x.corruption.strategy for x in got} == {"number"}  # English is unknown words
    for x in got:
        assert len(x.planted) == 1 and x.corruption.planted in world.DIGITS
        words = x.corruption.text.split()
        assert words[x.planted[0]] == x.corruption.planted  # one toy token per word
    assert [x.row.index for x in got] == [x.row.index for x in plant(rows, fmt, n_pairs=20, seed=0)]


# ------------------------------------------------------------------------------------- CLI on the toy
def test_cli_on_the_toy_carries_signal(tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", toy_records(60))
    out = tmp_path / "probe" / "report.json"
    rc = cli(["probe", "--model", checkpoint_path(), "--dataset", data, "--template", template_path("instruction"),
              "--n-pairs", "40", "--bootstrap", "200", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    by = {r["method"]: r for r in report["results"]}
    toy = by["contrastive:toy_instruction"]
    assert report["n_pairs"] == 40 and report["strategies"]["number"] == 40
    assert report["n_planted_tokens"] == 40
    assert toy["auroc"] >= 0.9 and toy["auroc_ci"][0] > 0.5 and toy["verdict"] == SIGNAL
    assert toy["agreement"] >= 0.8
    assert set(by) == {"contrastive:toy_instruction", "surprisal", "random"}
    assert 0.3 <= by["random"]["auroc"] <= 0.7
    assert SIGNAL in printed and "surprisal (baseline)" in printed


def test_bad_input_is_one_line(tmp_path, capsys):
    no_digits = [{"prompt": "copy a 1", "chosen": "a b c d", "rejected": "a b"}] * 3
    data = write_jsonl(tmp_path / "nodigits.jsonl", no_digits)
    rc = cli(["probe", "--model", checkpoint_path(), "--dataset", data, "--template", template_path("instruction")])
    err = capsys.readouterr().err
    assert rc == 2 and "no usable pair" in err and len(err.strip().splitlines()) == 1
    good = write_jsonl(tmp_path / "good.jsonl", toy_records(3))
    for argv, needle in [(["--template", str(tmp_path / "nope.yaml")], "no such template"),
                         (["--n-pairs", "0"], "n-pairs"), (["--min-auroc", "2"], "min-auroc"),
                         (["--source", "dpo"], "dpo-model"), (["--strategies", "typo"], "invalid choice")]:
        rc = cli(["probe", "--model", checkpoint_path(), "--dataset", good, *argv])
        err = capsys.readouterr().err
        assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, (argv, err)
    rc = cli(["probe", "--model", checkpoint_path(), "--dataset", str(tmp_path / "missing.jsonl")])
    assert rc == 2 and "no such file" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- pipeline gate
def test_pipeline_probe_stops_or_warns(tmp_path, capsys):
    """A random tiny model's rewards are noise: the probe stage stops the pipeline (default on_fail) or,
    with on_fail: warn, warns and annotate runs; the probe template defaults to annotate's."""
    import yaml
    from tests.tiny import save_tiny_model
    from treg.stages.pipeline import load_config, plan
    save_tiny_model(tmp_path / "policy", "llama3")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Say {w} now."}) + "\n"
                                                    for w in ("hi", "yes", "no", "maybe", "fox", "dog")))
    (tmp_path / "reward.py").write_text("def reward(prompt, response):\n    return float(len(response))\n")
    cfg = {"workdir": str(tmp_path / "run"), "model": str(tmp_path / "policy"),
           "sample": {"prompts": str(tmp_path / "prompts.jsonl"), "n": 2, "max_new_tokens": 10},
           "score": {"reward_fn": f"{tmp_path / 'reward.py'}:reward"},
           "probe": {"min_auroc": 0.99, "bootstrap": 50},
           "annotate": {"template": "instruction", "no_progress": True}}
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    stages = plan(load_config(str(path)))
    assert [s.name for s in stages] == ["sample", "score", "probe", "annotate"]
    probe = stages[2]
    assert probe.on_fail == "stop" and probe.argv[probe.argv.index("--template") + 1] == "instruction"
    assert cli(["pipeline", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # (earlier lines: other stages' progress bars)
    assert last.startswith("treg pipeline: error: probe: ") and "near or below chance" in last
    assert not (tmp_path / "run" / "annotated").exists()
    assert json.loads((tmp_path / "run" / "probe.json").read_text())["results"]
    cfg["probe"]["on_fail"] = "warn"
    path.write_text(yaml.safe_dump(cfg))
    assert cli(["pipeline", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "skip probe" in out and "warning: probe:" in out  # probe output reused; on_fail is not an argument
    assert (tmp_path / "run" / "annotated").exists()
    cfg["probe"]["on_fail"] = "ignore"
    path.write_text(yaml.safe_dump(cfg))
    assert cli(["pipeline", "--config", str(path)]) == 2
    assert "probe.on_fail" in capsys.readouterr().err


# ------------------------------------------------------------------------- the anchored template option
def test_anchored_template_puts_the_draft_in_x_worse_only():
    from treg.method.templates import load_template, render
    t = load_template("anchored")
    assert t.mode == "revision"
    better, worse = render(t, query="What is the capital of France?", draft="It is Madrid.")
    assert "It is Madrid." not in "".join(m["content"] for m in better)
    assert "It is Madrid." in worse[-1]["content"] and "capital of France" in better[-1]["content"]


@pytest.mark.parametrize("text,msg", [
    ("mode: revision\ndraft: worse\nbetter: [{role: user, content: '{query} {draft}'}]\n"
     "worse: [{role: user, content: '{query} {draft}'}]\n", "puts it in 'worse' only"),
    ("mode: revision\ndraft: worse\nbetter: [{role: user, content: '{query}'}]\n"
     "worse: [{role: user, content: '{query}'}]\n", "missing placeholder {draft}"),
    ("mode: instruction\ndraft: worse\nbetter: [{role: user, content: '{query}'}]\n"
     "worse: [{role: user, content: '{query}'}]\n", "revision mode only"),
    ("mode: revision\ndraft: sideways\nbetter: [{role: user, content: '{query} {draft}'}]\n"
     "worse: [{role: user, content: '{query} {draft}'}]\n", "'both', 'better' or 'worse'"),
])
def test_bad_draft_key(tmp_path, text, msg):
    from treg.errors import TregError
    from treg.method.templates import load_template
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(TregError, match=msg.replace("{", r"\{").replace("}", r"\}")):
        load_template(str(path))


def test_annotate_with_the_anchored_template_scores_the_same_response_ids():
    from treg.stages.annotate import annotate
    from treg.toy import load
    model, tok = load()
    ds = annotate(model, tok, toy_records(3), template="anchored", progress=False)
    plain = annotate(model, tok, toy_records(3), template="revision", progress=False)
    assert ds["chosen_input_ids"] == plain["chosen_input_ids"]
    for a, b in zip(ds["ref_chosen_token_logps"], plain["ref_chosen_token_logps"]):  # batching may differ
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert not np.allclose(np.concatenate(list(ds["chosen_token_rewards"])),
                           np.concatenate(list(plain["chosen_token_rewards"])), atol=1e-3)
