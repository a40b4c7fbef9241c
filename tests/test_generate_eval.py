"""treg generate file formats (AlpacaEval 2, Arena-Hard) and treg eval statistics."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from tiny import save_tiny_model  # noqa: E402

from treg.cli import main as cli  # noqa: E402
from treg.stages.evaluation import win_rate_stats  # noqa: E402

INSTRUCTIONS = ["Hello there", "What is a fox?", "Numbers like 12345", "Say hi"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("policy")
    save_tiny_model(d, "chatml")
    return str(d)


def _gen(model_dir, prompts, out, fmt, *extra):
    return cli(["generate", "--model", model_dir, "--prompts", str(prompts), "--output", str(out), "--format", fmt,
                "--max-new-tokens", "8", "--no-progress", *extra])


def test_alpaca_eval_file(model_dir, tmp_path):
    # the AlpacaEval 2 evaluation set's columns: instruction, dataset (+ reference output, generator)
    src = tmp_path / "alpaca.json"
    src.write_text(json.dumps([{"instruction": t, "dataset": "helpful_base", "output": "ref", "generator": "gpt4"}
                               for t in INSTRUCTIONS]))
    assert _gen(model_dir, src, tmp_path / "a.json", "alpaca_eval", "--generator", "tiny") == 0
    assert _gen(model_dir, src, tmp_path / "b.json", "alpaca_eval", "--generator", "tiny") == 0
    data = json.loads((tmp_path / "a.json").read_text())
    assert isinstance(data, list) and len(data) == len(INSTRUCTIONS)
    for row, inst in zip(data, INSTRUCTIONS):
        assert set(row) == {"instruction", "output", "generator", "dataset"}
        assert row["instruction"] == inst and row["generator"] == "tiny" and row["dataset"] == "helpful_base"
        assert isinstance(row["output"], str)
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()  # greedy: deterministic
    try:  # the alpaca_eval package's own loader, where it is installed (not a treg dependency)
        from alpaca_eval.utils import load_or_convert_to_dataframe
        assert len(load_or_convert_to_dataframe(str(tmp_path / "a.json"))) == len(INSTRUCTIONS)
    except ImportError:
        pass
    import pandas as pd  # that loader, for a .json file, is pandas.read_json
    df = pd.read_json(tmp_path / "a.json")
    assert {"instruction", "output", "generator"} <= set(df.columns) and len(df) == len(INSTRUCTIONS)
    meta = json.loads((tmp_path / "a.json.treg_meta.json").read_text())
    assert meta["stage"] == "generate" and meta["format"] == "alpaca_eval" and meta["fingerprint"]


def test_arena_hard_file_and_eval_with_questions(model_dir, tmp_path):
    q = tmp_path / "question.jsonl"
    q.write_text("".join(json.dumps({"question_id": f"q{i}", "category": "arena-hard-v0.1", "cluster": "c",
                                     "turns": [{"content": t}]}) + "\n" for i, t in enumerate(INSTRUCTIONS)))
    assert _gen(model_dir, q, tmp_path / "m.jsonl", "arena_hard", "--generator", "tiny") == 0
    lines = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [x["question_id"] for x in lines] == [f"q{i}" for i in range(len(INSTRUCTIONS))]
    for x in lines:
        assert {"question_id", "answer_id", "model_id", "choices", "tstamp"} <= set(x)
        assert x["model_id"] == "tiny" and isinstance(x["tstamp"], float)
        (choice,) = x["choices"]
        assert choice["index"] == 0 and isinstance(choice["turns"][0]["content"], str)
        assert isinstance(choice["turns"][0]["token_len"], int)
        assert x["conv_metadata"]["token_len"] == choice["turns"][0]["token_len"]
    rf = tmp_path / "judge.py"
    rf.write_text("def judge(prompt, output):\n    assert isinstance(prompt, str) and prompt\n"
                  "    return float(len(output))\n")
    assert _gen(model_dir, q, tmp_path / "s.jsonl", "arena_hard", "--temperature", "1", "--seed", "3") == 0
    assert cli(["eval", "--outputs", str(tmp_path / "m.jsonl"), "--baseline", str(tmp_path / "s.jsonl"),
                "--questions", str(q), "--reward-fn", f"{rf}:judge", "--report", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["n"] == len(INSTRUCTIONS)


def test_eval_pairs_by_instruction(tmp_path, capsys):
    a = [{"instruction": f"i{k}", "output": "x" * (k + 2), "generator": "a", "dataset": "d"} for k in range(5)]
    b = [{"instruction": f"i{k}", "output": "x" * 3, "generator": "b", "dataset": "d"} for k in reversed(range(6))]
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    rf = tmp_path / "judge.py"
    rf.write_text("def judge(prompt, output):\n    return float(len(output))\n")
    args = ["eval", "--outputs", str(tmp_path / "a.json"), "--baseline", str(tmp_path / "b.json"),
            "--reward-fn", f"{rf}:judge", "--report", str(tmp_path / "r.json"), "--bootstrap", "200"]
    assert cli(args) == 2  # i5 has no partner: different instruction sets are refused by default
    err = capsys.readouterr().err
    assert "different instruction sets" in err and "'i5'" in err and "--allow-unpaired" in err
    assert not (tmp_path / "r.json").exists()
    assert cli(args + ["--allow-unpaired"]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    # outputs of length 2..6 vs 3: one loss, one tie, three wins
    assert (r["n"], r["wins"], r["ties"], r["losses"]) == (5, 3, 1, 1)
    assert r["win_rate"] == pytest.approx(70.0) and r["unpaired_baseline"] == 1
    assert r["ci95_low"] <= 70.0 <= r["ci95_high"]
    assert r["mean_chars_a"] == 4.0 and r["mean_chars_b"] == 3.0


def test_eval_and_generate_bad_input(model_dir, tmp_path, capsys):
    rf = tmp_path / "judge.py"
    rf.write_text("def judge(prompt, output):\n    return float(len(output))\n")
    ok = [{"instruction": f"i{k}", "output": "x", "generator": "a", "dataset": "d"} for k in range(3)]
    (tmp_path / "ok.json").write_text(json.dumps(ok))
    (tmp_path / "dup.json").write_text(json.dumps(ok + [ok[1]]))
    q = tmp_path / "question.jsonl"
    q.write_text(json.dumps({"question_id": "q0", "turns": [{"content": "hi"}]}) + "\n")
    answer = {"question_id": "q0", "answer_id": "a", "model_id": "m",
              "choices": [{"index": 0, "turns": [{"content": "x"}]}]}
    (tmp_path / "m.jsonl").write_text(json.dumps(answer) + "\n")

    def run(*argv):
        code = cli(list(argv))
        return code, capsys.readouterr().err

    judge = ["--reward-fn", f"{rf}:judge"]
    code, err = run("eval", "--outputs", str(tmp_path / "dup.json"), "--baseline", str(tmp_path / "ok.json"), *judge)
    assert code == 2 and "dup.json, row 4" in err and "repeats" in err  # 1-based rows
    code, err = run("eval", "--outputs", str(tmp_path / "m.jsonl"), "--baseline", str(tmp_path / "m.jsonl"), *judge)
    assert code == 2 and "pass --questions" in err
    code, err = run("eval", "--outputs", str(tmp_path / "m.jsonl"), "--baseline", str(tmp_path / "m.jsonl"), *judge,
                    "--questions", str(tmp_path / "nope.jsonl"))
    assert code == 2 and "nope.jsonl: no such file" in err and "Traceback" not in err
    code, err = run("eval", "--outputs", str(tmp_path / "ok.json"), "--baseline", str(tmp_path / "ok.json"),
                    "--judge", "rm", "--reward-fn", f"{rf}:judge")
    assert code == 2 and "not allowed with argument" in err and "usage:" not in err
    code, err = run("eval", "--outputs", str(tmp_path / "ok.json"), *judge)
    assert code == 2 and "--baseline is required" in err
    # AlpacaEval picks its reader by the suffix: an alpaca_eval file must be .json
    code, err = run("generate", "--model", model_dir, "--prompts", str(tmp_path / "ok.json"), "--output",
                    str(tmp_path / "out.jsonl"), "--format", "alpaca_eval")
    assert code == 2 and "must end in .json" in err and not (tmp_path / "out.jsonl").exists()


def test_win_rate_bootstrap_interval():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.3, 1, 400), rng.normal(0, 1, 400)
    lens = rng.integers(50, 500, 400)
    r = win_rate_stats(a, b, lens, lens[::-1], n_boot=500)
    wr = 100 * np.mean(a > b)
    assert r["win_rate"] == pytest.approx(wr)
    se = 100 * np.sqrt(wr / 100 * (1 - wr / 100) / 400)  # binomial standard error
    assert r["ci95_low"] < wr < r["ci95_high"]
    assert r["ci95_high"] - r["ci95_low"] == pytest.approx(2 * 1.96 * se, rel=0.2)


def test_alpaca_eval_path_is_not_faked(tmp_path, capsys, monkeypatch):
    import importlib.util
    (tmp_path / "a.json").write_text("[]")
    if importlib.util.find_spec("alpaca_eval") is not None:
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    code = cli(["eval", "--outputs", str(tmp_path / "a.json"), "--alpaca-eval"])  # baseline: AlpacaEval's own
    err = capsys.readouterr().err
    assert code == 2 and ("alpaca_eval" in err or "OPENAI_API_KEY" in err) and "Traceback" not in err
