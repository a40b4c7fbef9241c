"""Packaging: core dependencies are what training needs; optional packages are extras, and a missing
one stops with one line naming the extra. (A fresh-venv `pip install .` is checked by hand: see the
report; here a missing package is simulated by blocking its import.)"""

import json
import sys
import tomllib
import types
from pathlib import Path

import pytest

from treg.cli import main as cli
from treg.errors import TregError

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    assert project["requires-python"] == ">=3.11"
    for heavy in ("matplotlib", "vllm", "deepspeed", "wandb", "liger", "peft", "trl", "pytest"):
        assert heavy not in core, heavy
    extras = project["optional-dependencies"]
    assert {"plots", "vllm", "deepspeed", "wandb", "liger", "peft", "test"} <= set(extras) and "trl" not in extras
    assert any(d.startswith("matplotlib") for d in extras["plots"])
    for need in ("pytest", "trl", "peft", "matplotlib", "alpaca_eval"):  # what the tests import
        assert any(d.startswith(need) for d in extras["test"]), need


def test_missing_optional_package_names_its_extra(monkeypatch):
    from treg.extras import EXTRAS, require
    for module, extra in EXTRAS.items():
        monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
        with pytest.raises(TregError) as err:
            require(module, what="this")
        msg = str(err.value)
        assert f"pip install 'treg[{extra}]'" in msg and "\n" not in msg
    from treg.stages.trainer import check_report_to, lora_config
    args = types.SimpleNamespace(report_to="none", deepspeed="ds.json", use_liger_kernel=False)
    with pytest.raises(TregError, match=r"treg\[deepspeed\]"):
        check_report_to(args)
    args = types.SimpleNamespace(report_to="none", deepspeed=None, use_liger_kernel=True)
    with pytest.raises(TregError, match=r"treg\[liger\]"):
        check_report_to(args)
    with pytest.raises(TregError, match=r"treg\[peft\]"):
        lora_config(types.SimpleNamespace())


def test_eval_and_help_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    assert cli(["--help"]) == 0
    assert "documentation:" in capsys.readouterr().out
    rows = [{"instruction": f"q{i}", "output": "y" * (10 + 7 * i % 50), "generator": "m", "dataset": "d"}
            for i in range(12)]
    base = [{**r, "output": "x" * 30, "generator": "b"} for r in rows]
    (tmp_path / "m.json").write_text(json.dumps(rows))
    (tmp_path / "b.json").write_text(json.dumps(base))
    (tmp_path / "judge.py").write_text("def judge(prompt, output):\n    return float(len(output) % 5)\n")
    assert cli(["eval", "--outputs", str(tmp_path / "m.json"), "--baseline", str(tmp_path / "b.json"),
                "--reward-fn", f"{tmp_path / 'judge.py'}:judge", "--report", str(tmp_path / "r.json"),
                "--no-progress"]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["n"] == 12 and r["lc_glm"] == "length_controlled_minimal"
