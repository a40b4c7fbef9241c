"""Tests for `treg train` (treg/cli/train.py) through the in-process CLI `treg.cli.main`."""

from __future__ import annotations

import json
import math
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from test_data import make_pairs, write_pairs  # noqa: E402
from treg.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tiny import save_tiny_model
    from transformers import AutoTokenizer
    path = tmp_path_factory.mktemp("tiny-model")
    save_tiny_model(path, "llama3")
    return path, AutoTokenizer.from_pretrained(path)


def run_yaml(tmp_path, model_dir, data, **extra):
    lines = [f"model_name_or_path: {model_dir[0]}", f"dataset_path: {data}", f"output_dir: {tmp_path / 'out'}",
             "max_steps: 2", "per_device_train_batch_size: 4", "use_cpu: true", "save_strategy: 'no'",
             "disable_tqdm: true", "alpha: 0.25"]
    lines += [f"{k}: {v}" for k, v in extra.items()]
    (tmp_path / "run.yaml").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "run.yaml")


def test_train_cli_happy_path_yaml_and_overrides(tmp_path, model_dir, capsys):
    data = write_pairs(tmp_path / "ann", model_dir[1], n=8)
    rc = main(["train", "--config", run_yaml(tmp_path, model_dir, data), "--alpha", "0.5", "--max_steps", "3"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    assert out[-1].startswith("treg train: dpo-REG alpha=0.5 3 steps on 8 pairs (0 dropped)")
    saved = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= saved
    assert not any(name.startswith(".final-tmp") for name in saved)


def _corrupt(dataset, column, row, fn):
    values = list(dataset[column])
    values[row] = fn(values[row])
    return dataset.remove_columns(column).add_column(column, values)


@pytest.mark.parametrize("case, row, field", [
    ("missing_column", None, "chosen_token_rewards"),
    ("reward_length", 2, "rejected_token_rewards"),
    ("nan_reward", 1, "chosen_token_rewards"),
    ("inf_reward", 3, "rejected_token_rewards"),
    ("fingerprint", None, "tokenizer_fingerprint"),
    ("empty", None, None),
])
def test_bad_input_one_line_exit_2_no_checkpoint(tmp_path, model_dir, capsys, case, row, field):
    d = make_pairs(6)
    if case == "missing_column":
        d = d.remove_columns(field)
    elif case == "reward_length":
        d = _corrupt(d, field, row, lambda v: v[:-1])
    elif case == "nan_reward":
        d = _corrupt(d, field, row, lambda v: v[:-1] + [float("nan")])
    elif case == "inf_reward":
        d = _corrupt(d, field, row, lambda v: [float("inf")] + v[1:])
    elif case == "empty":
        d = d.select([])
    tok = model_dir[1]
    if case == "fingerprint":
        from tiny import tiny_tokenizer
        tok = tiny_tokenizer("chatml")
    data = write_pairs(tmp_path / "ann", tok, d)
    capsys.readouterr()  # drop the dataset-saving progress output
    rc = main(["train", "--config", run_yaml(tmp_path, model_dir, data)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("treg train: error: ")
    assert str(data) in err[0]
    if row is not None:
        assert f"row {row}" in err[0]
    if field is not None:
        assert f"field '{field}'" in err[0]
    if case == "empty":
        assert "empty dataset" in err[0]
    assert not (tmp_path / "out").exists()


def test_config_mistakes_are_one_line_errors(tmp_path, model_dir, capsys):
    from transformers.integrations import get_available_reporting_integrations
    data = write_pairs(tmp_path / "ann", model_dir[1], n=4)
    capsys.readouterr()
    cfg = run_yaml(tmp_path, model_dir, data, alhpa=0.1)
    assert main(["train", "--config", cfg]) == 2
    err = capsys.readouterr().err
    assert "field 'alhpa'" in err and cfg in err and "unknown option" in err
    cfg = run_yaml(tmp_path, model_dir, data)
    assert main(["train", "--config", cfg, "--alpha", "-1"]) == 2
    assert "'alpha': must be >= 0" in capsys.readouterr().err
    assert main(["train", "--config", cfg, "--method", "orpo"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "no such config file" in capsys.readouterr().err
    missing = next((n for n in ("tensorboard", "wandb") if n not in get_available_reporting_integrations()), None)
    if missing:  # a report_to integration that is not installed
        assert main(["train", "--config", cfg, "--report_to", missing]) == 2
        assert "field 'report_to'" in capsys.readouterr().err
    assert main(["train", "--dataset_path", str(data)]) == 2
    assert "--model_name_or_path is required" in capsys.readouterr().err
    # a bad value in the YAML names the file and the key (it used to name only '--alpha')
    bad = run_yaml(tmp_path, model_dir, data, alpha="abc")
    assert main(["train", "--config", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{bad}, field 'alpha': invalid float value" in err and len(err.splitlines()) == 1
    # a misspelled command-line option is named as such, without blaming the YAML file
    cfg = run_yaml(tmp_path, model_dir, data)
    assert main(["train", "--config", cfg, "--alpah", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown option(s) --alpah 0.5" in err and cfg not in err
    # a local model path that does not exist: one line at once, no hub lookup
    assert main(["train", "--config", cfg, "--model_name_or_path", str(tmp_path / "nope")]) == 2
    assert "no such model directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_help_is_short_grouped_and_help_all_lists_every_field(capsys):
    import dataclasses
    import re
    from transformers import TrainingArguments
    from treg.stages.config import TRL_NAMES, TRegConfig
    assert main(["train", "--help"]) == 0
    short = capsys.readouterr().out
    assert len(short.splitlines()) < 120
    text = " ".join(short.split())
    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    own = [f for f in dataclasses.fields(TRegConfig) if f.init and f.name not in base and not f.name.startswith("_")]
    for f in own:  # TRL DPOConfig names: listed by name (their help in --help-all)
        if f.name in TRL_NAMES:
            assert f"--{f.name}," in text or f"--{f.name}." in text, f.name
    for f in (f for f in own if f.name not in TRL_NAMES):  # every T-REG field, with its whole help text
        assert f"--{f.name}" in text, f.name
        assert " ".join(f.metadata["help"].split())[:60] in text, f.name
    for name in ("output_dir", "per_device_train_batch_size", "learning_rate", "num_train_epochs", "bf16",
                 "gradient_accumulation_steps", "report_to", "push_to_hub", "save_steps"):
        assert f"--{name} " in short, name
    assert "Method (T-REG):" in short and "`treg train --help-all`" in short.splitlines()[-1]
    assert "--torch_compile_mode" not in short and "\n  --no_" not in short
    assert main(["train", "--help-all"]) == 0
    full = capsys.readouterr().out
    for f in dataclasses.fields(TRegConfig):
        if f.init and not f.name.startswith("_"):
            assert re.search(rf"^  --{f.name}\b", full, re.MULTILINE), f.name
    for entry in re.split(r"\n  --", full):  # one option per entry, its default said at most once
        assert entry.count("(default:") <= 1, entry
        assert not re.match(r"[\w]+ .*, --", entry.splitlines()[0]), entry  # no dash-spelled alias repeated


def test_summary_after_resume_describes_the_whole_run(tmp_path, model_dir, capsys):
    data = write_pairs(tmp_path / "ann", model_dir[1], n=8)
    config = run_yaml(tmp_path, model_dir, data, save_strategy="steps", save_steps=2, lr_scheduler_type="constant")
    assert main(["train", "--config", config]) == 0
    assert (tmp_path / "out" / "checkpoint-2").is_dir()
    capsys.readouterr()
    assert main(["train", "--config", config, "--max_steps", "4",
                 "--resume_from_checkpoint", str(tmp_path / "out" / "checkpoint-2")]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "4 steps on 8 pairs" in line and "resumed at step 2, mean loss" in line and "over steps 1-4" in line
    # the whole run's mean equals that of an uninterrupted 4-step run (same data order and updates)
    resumed = float(re.search(r"mean loss ([\d.]+) over steps 1-4", line).group(1))
    assert main(["train", "--config", config, "--max_steps", "4", "--output_dir", str(tmp_path / "straight"),
                 "--save_strategy", "no"]) == 0
    straight = float(re.search(r"mean loss ([\d.]+)", capsys.readouterr().out.strip().splitlines()[-1]).group(1))
    assert abs(resumed - straight) < 1e-3, (resumed, straight)
    record = json.loads((tmp_path / "out" / "checkpoint-2" / "treg_run_loss.json").read_text())
    assert record["steps"] == 2 and math.isfinite(record["loss_sum"])


def test_file_size_limit_while_saving_leaves_no_temp_dir(tmp_path, model_dir):
    """RLIMIT_FSIZE reached by the final save: one line, exit 2, no .final-tmp left behind."""
    import subprocess
    data = write_pairs(tmp_path / "ann", model_dir[1], n=8)
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); "
            "from treg.cli import main; sys.exit(main(sys.argv[1:]))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code, "train", "--config", run_yaml(tmp_path, model_dir, data)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": root})
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("treg train: error:")]
    assert len(lines) == 1 and "file too large" in lines[0] and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "out" / ".final-tmp").exists()
