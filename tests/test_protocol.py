"""`treg demo --protocol tuned` on a tiny run, and its pick rule and paired bootstrap checked by hand."""

import json
from pathlib import Path

import numpy as np
import pytest

from treg.toy.protocol import TUNE_SEED_OFFSET, grid_for, padded_lrs, paired_bootstrap, paired_vs, pick

LRS, ALPHAS, TUNE_SEEDS, TEST_SEEDS = (5e-5, 1e-4), (0.5, 2.0), 3, 2


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory):
    from treg.cli import main
    out = tmp_path_factory.mktemp("protocol") / "run"
    argv = ["demo", "--quick", "--protocol", "tuned", "--seeds", str(TEST_SEEDS), "--tune-seeds", str(TUNE_SEEDS),
            "--lrs", ",".join(map(str, LRS)), "--alphas", ",".join(map(str, ALPHAS)), "--out", str(out),
            "--train-prompts", "12", "--eval-prompts", "6", "--tune-prompts", "5", "--steps", "3",
            "--batch-size", "4", "--threads", "1", "--quiet"]
    assert main(argv) == 0
    return out, json.loads((out / "results.json").read_text())


def _jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_tuning_and_test_seeds_and_prompts_are_disjoint(tuned_run):
    out, res = tuned_run
    proto = res["protocol"]
    assert proto["name"] == "tuned" and proto["pick_rule"] == "mean"
    assert proto["tune_seeds"] == [TUNE_SEED_OFFSET + k for k in range(TUNE_SEEDS)]
    assert proto["test_seeds"] == list(range(TEST_SEEDS))
    assert not set(proto["tune_seeds"]) & set(proto["test_seeds"])
    test_queries = {r["query"] for r in _jsonl(out / "eval" / "dpo" / "seed0.jsonl")}
    train_queries = {r["query"] for s in proto["test_seeds"] for r in _jsonl(out / "tokens" / f"seed{s}.jsonl")}
    tune_sets = [set(q) for q in proto["tune_prompts"].values()]
    assert len(tune_sets) == TUNE_SEEDS and all(len(q) == 5 for q in tune_sets)
    for i, q in enumerate(tune_sets):
        assert not q & test_queries and not q & train_queries
        assert all(not q & other for other in tune_sets[i + 1:])
    for m in res["methods"].values():  # the picks were evaluated on the test seeds only
        assert [s["seed"] for s in m["seeds"]] == proto["test_seeds"]


def test_every_method_gets_the_same_grid_size_and_the_pick_follows_the_rule(tuned_run):
    _, res = tuned_run
    proto = res["protocol"]
    n = len(LRS) * len(ALPHAS)
    assert proto["grid_size"] == {"dpo": n, "dpo_reg": n}
    assert sorted(tuple(p) for p in proto["grid"]["dpo_reg"]) == [(lr, a) for lr in LRS for a in ALPHAS]
    dpo_lrs = [p[0] for p in proto["grid"]["dpo"]]
    assert len(set(dpo_lrs)) == n and all(p[1] == 0.0 for p in proto["grid"]["dpo"])  # padded with lrs
    assert min(dpo_lrs) == pytest.approx(min(LRS)) and max(dpo_lrs) == pytest.approx(max(LRS))
    for name, trials in proto["tuning"].items():
        assert len(trials) == n and all(len(t["rewards"]) == TUNE_SEEDS for t in trials)
        means = [np.mean(t["rewards"]) for t in trials]
        best = trials[int(np.argmax(means))]
        assert (proto["picks"][name]["lr"], proto["picks"][name]["alpha"]) == (best["lr"], best["alpha"])
        chosen = res["config"]["chosen_hyperparameters"][name]
        assert (chosen["lr"], chosen["alpha"]) == (best["lr"], best["alpha"])


def test_paired_differences_are_recomputed_from_the_eval_files(tuned_run):
    out, res = tuned_run
    p = res["paired_vs_dpo"]["dpo_reg"]
    diffs = []
    for s in range(TEST_SEEDS):
        a = {r["prompt_id"]: r["reward"] for r in _jsonl(out / "eval" / "dpo_reg" / f"seed{s}.jsonl")}
        b = {r["prompt_id"]: r["reward"] for r in _jsonl(out / "eval" / "dpo" / f"seed{s}.jsonl")}
        diffs.append([a[k] - b[k] for k in sorted(a)])  # --quick: one sample per prompt
    assert p["mean"] == pytest.approx(np.mean(diffs))
    assert p["per_seed"] == pytest.approx(np.mean(diffs, axis=1).tolist())
    assert (p["n_seeds"], p["n_prompts"]) == (TEST_SEEDS, 6)
    assert p["ci95"][0] <= p["mean"] <= p["ci95"][1]


def test_report_draws_the_sensitivity_plot_and_the_tables(tuned_run):
    out, res = tuned_run
    html = (out / "report.html").read_text()
    assert 'class="sensitivity" src="data:image/png;base64,' in html
    md = (out / "report.md").read_text()
    assert "## Tuning grid (protocol `tuned`" in md and "## Difference to DPO, paired" in md
    assert md.count("| dpo_reg |") == len(LRS) * len(ALPHAS)
    p = res["paired_vs_dpo"]["dpo_reg"]
    assert f"[{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]" in md


def test_pick_rule_by_hand():
    def trials():
        return [{"lr": 1.0, "alpha": 0.0, "rewards": [0.9, 0.9, 0.3]},   # mean 0.70, std 0.3464
                {"lr": 2.0, "alpha": 0.0, "rewards": [0.68, 0.68, 0.68]},  # mean 0.68, std 0
                {"lr": 3.0, "alpha": 0.0, "rewards": [0.5, 0.9, 0.7]}]   # mean 0.70, std 0.2
    t = trials()
    assert pick(t, "mean")["lr"] == 1.0  # tie at 0.70 with lr 3: the first grid point wins
    assert [x["score"] for x in t] == pytest.approx([0.70, 0.68, 0.70])
    t = trials()
    assert pick(t, "mean-minus-std")["lr"] == 2.0
    assert [x["score"] for x in t] == pytest.approx([0.70 - 0.6 / 3 ** 0.5, 0.68, 0.5])


def test_grids_are_equal_in_size():
    assert padded_lrs([1e-4], 3) == pytest.approx([5e-5, 1e-4, 2e-4])
    assert padded_lrs([1e-4, 4e-4], 3) == pytest.approx([1e-4, 2e-4, 4e-4])
    for lrs, alphas in (([1e-4], [0.5]), ([1e-4], [0.1, 0.5]), ([5e-5, 1e-4, 2e-4], [0.5, 2.0])):
        reg, plain = grid_for(True, lrs, alphas), grid_for(False, lrs, alphas)
        assert len(reg) == len(plain) == len(lrs) * len(alphas) == len(set(plain))


def test_paired_bootstrap_by_hand():
    const = paired_bootstrap([[0.2, 0.2], [0.2, 0.2]])
    assert const["mean"] == pytest.approx(0.2) and const["ci95"] == pytest.approx([0.2, 0.2])
    # one seed, two prompts with differences 0 and 1: bootstrap means are 0, 0.5, 1 (p = 1/4, 1/2, 1/4)
    one = paired_bootstrap([[0.0, 1.0]])
    assert one["mean"] == 0.5 and one["ci95"] == [0.0, 1.0] and one["per_seed"] == [0.5]
    # differences that vary only by seed: the interval spans the seed means
    seeds = paired_bootstrap([[-0.1, -0.1], [0.3, 0.3]])
    assert seeds["ci95"] == pytest.approx([-0.1, 0.3]) and seeds["seeds_better"] == 1
    # 3 seeds x 4 prompts: the bootstrap distribution's centre is the mean, the interval is narrower
    # than the range of the cells and wider than zero
    d = np.array([[0.1, 0.0, 0.2, -0.1], [0.3, 0.1, 0.0, 0.2], [0.0, 0.1, 0.1, 0.1]])
    r = paired_bootstrap(d)
    assert r["mean"] == pytest.approx(d.mean())
    assert d.min() < r["ci95"][0] < d.mean() < r["ci95"][1] < d.max()
    assert paired_bootstrap(d) == r  # seeded: reproducible
    with pytest.raises(ValueError):
        paired_bootstrap([])


def test_paired_vs_pairs_by_seed_and_prompt():
    def recs(values):
        return [{"prompt_id": f"p{i}", "reward": v, "sample": j} for i, vs in enumerate(values)
                for j, v in enumerate(vs)]
    per = {"dpo": {0: recs([[0.5, 0.7], [0.2, 0.2]]), 1: recs([[0.1, 0.1], [0.4, 0.6]])},
           "x": {0: recs([[0.8, 0.8], [0.2, 0.4]]), 1: list(reversed(recs([[0.0, 0.2], [0.5, 0.5]])))}}
    r = paired_vs(per)["x"]
    # per prompt means: seed 0: x (0.8, 0.3) - dpo (0.6, 0.2) = (0.2, 0.1); seed 1: (0.1, 0.5) - (0.1, 0.5) = 0
    assert r["per_seed"] == pytest.approx([0.15, 0.0]) and r["mean"] == pytest.approx(0.075)
    assert r["seeds"] == [0, 1] and r["n_prompts"] == 2 and r["seeds_better"] == 1


def test_protocol_user_errors(tmp_path, capsys):
    from treg.cli import main
    assert main(["demo", "--protocol", "tuned", "--tune-seeds", "0", "--out", str(tmp_path / "d")]) == 2
    assert "--tune-seeds" in capsys.readouterr().err
    assert main(["demo", "--protocol", "nope", "--out", str(tmp_path / "d")]) == 2
    assert main(["demo", "--pick", "median", "--out", str(tmp_path / "d")]) == 2
    assert not (tmp_path / "d").exists()
