"""treg eval's length-controlled win rate against AlpacaEval 0.6.6's own
``alpaca_eval.metrics.glm_winrate.get_length_controlled_winrate`` on the same annotations."""

import json
import sys
import types

import numpy as np
import pytest

from treg.cli import main as cli
from treg.errors import TregError
from treg.stages.lc import lc_win_rate, read_gamed


def _alpaca_eval_glm(monkeypatch):
    """alpaca_eval's glm_winrate module, importable offline: its utils import ``pkg_resources``
    (gone from recent setuptools; only used for version checks) — stubbed when missing."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        monkeypatch.setitem(sys.modules, "pkg_resources", types.ModuleType("pkg_resources"))
    try:
        from alpaca_eval.metrics import glm_winrate
    except Exception as err:  # noqa: BLE001 - not installed, or its imports fail here
        pytest.skip(f"alpaca_eval not importable: {err}")
    return glm_winrate


def _synthetic(seed: int, n: int, tmp_path):
    """One annotation set: per-instruction difficulty, AlpacaEval-style df_gamed.csv (two gamed
    baselines, one verbose one concise, rows in instruction order), baseline/model lengths and the
    judge's outcomes. Even seeds are length-gamed: the model is ~3x longer and the judge rewards length."""
    rng = np.random.default_rng(seed)
    diff = rng.normal(0, 1, n)
    rows = []
    for model, sign in (("gpt4_gamed_verbose", 1.0), ("gpt4_gamed_concise", -1.0)):
        sdl = rng.normal(-sign, 0.5, n)
        pref = 1 / (1 + np.exp(-(0.8 * np.tanh(-sdl) - 0.5 * diff)))
        rows += [{"model": model, "index": i, "preference": float(pref[i]), "std_delta_len": float(sdl[i]),
                  "instruction_difficulty": float(diff[i]), "not_gamed_baseline": False} for i in range(n)]
    header = list(rows[0])
    gamed = tmp_path / f"df_gamed_{seed}.csv"
    gamed.write_text(",".join(header) + "\n" + "".join(",".join(str(r[k]) for k in header) + "\n" for r in rows))
    len_b = rng.integers(100, 1500, n)
    gamed_len = seed % 2 == 0
    len_m = len_b * (3 if gamed_len else 1) + rng.integers(-80, 400, n)
    d = (len_m - len_b) / np.std(len_m - len_b)
    z = 0.25 * (seed - 6) - 0.6 * diff + (2.0 * np.tanh(d) if gamed_len else 0.3 * np.tanh(d))
    outcome = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(float)
    outcome[rng.random(n) < 0.05] = 0.5
    return gamed, len_m, len_b, outcome


def test_lc_equals_alpaca_eval_066(tmp_path, monkeypatch):
    glm_winrate = _alpaca_eval_glm(monkeypatch)
    rf = tmp_path / "judge.py"  # a reward function replaying the synthetic judge's outcomes
    rf.write_text("import json, pathlib\nS = json.loads((pathlib.Path(__file__).parent / 'scores.json').read_text())\n"
                  "def judge(prompt, output):\n    return S[output]\n")
    n, diffs, rates = 120, [], {(g, x): [] for g in ("length_controlled_v1", "length_controlled_minimal")
                                for x in (True, False)}
    for seed in range(12):
        gamed, len_m, len_b, outcome = _synthetic(seed, n, tmp_path)
        out_m = [f"{i}:m:".ljust(int(len_m[i]), "y") for i in range(n)]
        out_b = [f"{i}:b:".ljust(int(len_b[i]), "x") for i in range(n)]
        scores = {}
        for i in range(n):
            scores[out_m[i]], scores[out_b[i]] = float(outcome[i]), 1.0 - float(outcome[i]) if outcome[i] != 0.5 else 0.5
        (tmp_path / "scores.json").write_text(json.dumps(scores))
        (tmp_path / "m.json").write_text(json.dumps([{"instruction": f"q{i}", "output": out_m[i], "generator": "m",
                                                      "dataset": "d"} for i in range(n)]))
        # the baseline file in another order: treg pairs by instruction, the position is the model file's
        (tmp_path / "b.json").write_text(json.dumps([{"instruction": f"q{i}", "output": out_b[i], "generator": "b",
                                                      "dataset": "d"} for i in reversed(range(n))]))
        annotations = [{"instruction": f"q{i}", "output_1": out_b[i], "output_2": out_m[i], "generator_1": "b",
                        "generator_2": "m", "annotator": "judge", "preference": 1.0 + outcome[i]} for i in range(n)]
        monkeypatch.setattr(glm_winrate, "hf_hub_download", lambda *a, _p=str(gamed), **k: _p)
        for glm, extra in (("length_controlled_v1", ["--lc-gamed", str(gamed)]), ("length_controlled_minimal", [])):
            report = tmp_path / "r.json"
            assert cli(["eval", "--outputs", str(tmp_path / "m.json"), "--baseline", str(tmp_path / "b.json"),
                        "--reward-fn", f"{rf}:judge", "--bootstrap", "50", "--no-progress", "--report", str(report),
                        *extra]) == 0
            r = json.loads(report.read_text())
            ae = glm_winrate.get_length_controlled_winrate(annotations, glm_name=glm, save_weights_dir=None,
                                                           is_warn_extreme_changes=False)
            assert r["lc_glm"] == glm
            assert r["win_rate"] == pytest.approx(ae["win_rate"], abs=1e-9)
            assert r["discrete_win_rate"] == pytest.approx(ae["discrete_win_rate"], abs=1e-9)
            assert r["standard_error"] == pytest.approx(ae["standard_error"], abs=1e-9)
            assert abs(r["lc_win_rate"] - ae["length_controlled_winrate"]) <= 0.5, (seed, glm)
            assert abs(r["lc_standard_error"] - ae["lc_standard_error"]) <= 0.05, (seed, glm)
            diffs.append(abs(r["lc_win_rate"] - ae["length_controlled_winrate"]))
            rates[glm, seed % 2 == 0].append(r["win_rate"] - r["lc_win_rate"])
    # on the length-gamed sets LC takes back part of the length-bought wins (v1, with the gamed baselines)
    assert min(rates["length_controlled_v1", True]) > 2, rates
    print(f"max |LC treg - LC alpaca_eval| over {len(diffs)} runs: {max(diffs):.2e} pp")


def test_lc_removes_pure_length_bias(tmp_path):
    gamed, _, _, _ = _synthetic(1, 400, tmp_path)
    rng = np.random.default_rng(3)
    len_b = rng.integers(100, 1500, 400)
    len_m = len_b + rng.normal(400, 400, 400).astype(int)
    d = (len_m - len_b) / np.std(len_m - len_b)
    outcome = (rng.random(400) < 1 / (1 + np.exp(-3 * np.tanh(d)))).astype(float)  # a judge that only counts chars
    assert outcome.mean() > 0.7
    r = lc_win_rate(outcome, len_m, len_b)  # minimal GLM: the length term alone
    assert abs(r["lc_win_rate"] - 50) < 6, r
    # v1 also fits the gamed baselines' (weaker) length effect, so it removes less, but still some
    r = lc_win_rate(outcome, len_m, len_b, gamed=read_gamed(str(gamed)))
    assert r["lc_win_rate"] < 100 * outcome.mean() - 5, r


def test_lc_refusals_and_degenerate_inputs(tmp_path):
    r = lc_win_rate([1, 0, 1], [5, 6, 7], [1, 1, 1])
    assert r["lc_win_rate"] is None and "5 prompts" in r["lc_note"]
    r = lc_win_rate([1, 0, 1, 1, 0, 1], [5] * 6, [1] * 6)
    assert r["lc_win_rate"] is None and "same length difference" in r["lc_note"]
    with pytest.raises(TregError, match="--lc-gamed"):
        lc_win_rate([1, 0, 1, 1, 0, 1], range(6), [1] * 6, glm="length_controlled_v1")
    bad = tmp_path / "bad.csv"
    bad.write_text("index,preference\n0,0.5\n")
    with pytest.raises(TregError, match="missing column"):
        read_gamed(str(bad))
    gamed, len_m, len_b, outcome = _synthetic(0, 20, tmp_path)
    with pytest.raises(TregError, match="position 20 has no difficulty"):
        lc_win_rate(list(outcome) * 2, list(len_m) * 2, list(len_b) * 2, gamed=read_gamed(str(gamed)))
