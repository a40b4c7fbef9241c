"""Weights are safetensors only by default (treg.io.loading.check_weights): a pickle-only model directory is
refused in one line, --allow-pickle-weights loads it with weights_only=True, code in a pickle never runs,
and ``python -m treg.io.weights DIR`` converts a directory to safetensors."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from treg.cli import main  # noqa: E402
from treg.errors import TregError  # noqa: E402
from treg.io.loading import allow_pickle_weights, load_causal_lm  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


class Payload:
    """Unpickling this runs ``touch <marker>`` (what a malicious checkpoint would do)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from tiny import save_tiny_model
    from transformers import AutoModelForCausalLM
    good = tmp_path_factory.mktemp("good")
    save_tiny_model(good, "chatml")
    state = AutoModelForCausalLM.from_pretrained(good).state_dict()

    def pickle_only(name, payload):
        d = tmp_path_factory.mktemp(name)
        for f in good.iterdir():
            if not f.name.endswith(".safetensors"):
                (d / f.name).write_bytes(f.read_bytes())
        payload(d / "pytorch_model.bin")
        return d

    plain = pickle_only("plain", lambda p: torch.save(state, p))
    marker = tmp_path_factory.mktemp("marker") / "PWNED"
    evil = pickle_only("evil", lambda p: p.write_bytes(pickle.dumps({"model.embed_tokens.weight": Payload(marker)})))
    return {"good": good, "plain": plain, "evil": evil, "marker": marker, "state": state}


@pytest.fixture(autouse=True)
def reset_opt_in():
    allow_pickle_weights(False)
    yield
    allow_pickle_weights(False)


def one_error_line(err: str, cmd: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith(f"treg {cmd}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_pickle_only_refused_by_default(dirs, capsys):
    with pytest.raises(TregError, match=r"only pickle weights \(pytorch_model.bin\).*python -m treg.io.weights"):
        load_causal_lm(str(dirs["plain"]))
    assert main(["toy", "check", "--model", str(dirs["plain"]), "--prompts", "1"]) == 2
    line = one_error_line(capsys.readouterr().err, "toy")
    assert str(dirs["plain"]) in line and "--allow-pickle-weights" in line


def test_opt_in_loads_the_same_weights(dirs):
    allow_pickle_weights(True)
    model = load_causal_lm(str(dirs["plain"]))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, dirs["state"][name])


@pytest.mark.parametrize("opt_in", [False, True])
def test_code_in_a_pickle_never_runs(dirs, capsys, opt_in):
    argv = ["toy", "check", "--model", str(dirs["evil"]), "--prompts", "1"] + (["--allow-pickle-weights"] if opt_in else [])
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err, "toy")
    assert ("could run code" if opt_in else "only pickle weights") in line
    assert not dirs["marker"].exists()


def test_converter(dirs, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    for f in dirs["plain"].iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "treg.io.weights", str(d)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (d / "model.safetensors").is_file()
    model = load_causal_lm(str(d))  # now loads by default
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, dirs["state"][name])
    evil = subprocess.run([sys.executable, "-m", "treg.io.weights", str(dirs["evil"])], capture_output=True,
                          text=True, env=env, timeout=300)
    assert evil.returncode == 2 and "Traceback" not in evil.stderr
    assert len(evil.stderr.strip().splitlines()) == 1 and "could run code" in evil.stderr
    assert not dirs["marker"].exists() and not (dirs["evil"] / "model.safetensors").exists()


def test_train_config_opt_in_field():
    from treg.stages.config import parse_config
    argv = ["--model_name_or_path", "m", "--dataset_path", "d", "--output_dir", "o", "--use_cpu", "true"]
    assert parse_config(argv).allow_pickle_weights is False
    assert parse_config(argv + ["--allow_pickle_weights", "true"]).allow_pickle_weights is True
