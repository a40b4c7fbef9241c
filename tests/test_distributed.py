"""Two-process CPU DDP through `accelerate launch` trains like one process with the same global batch.

The script below runs in both settings: in-process (1 process, batch 4) and under accelerate
(2 processes x batch 2, gradients averaged by DDP over gloo). Reference log-probs are precomputed in
both (under DDP each process scores half the rows, then they are gathered), alpha > 0.

Launcher note: in accelerate 1.15, `accelerate launch --cpu --num_processes 2` starts ONE process
(its CPU multi-process mode needs an MPI hostfile); `--multi_gpu --num_processes 2` starts two
torch.distributed workers, and `use_cpu=True` in the config makes them CPU/gloo DDP workers.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))

SCRIPT = r'''
import faulthandler, json, sys
faulthandler.dump_traceback_later(170, exit=True)  # a hang shows its stack instead of timing out silently
sys.path.insert(0, TESTS)
import torch
from treg.cli.train import shutdown


def run(out, per_device, grad_acc=1):
    from test_data import make_pairs
    from tiny import tiny_llama, tiny_tokenizer
    from treg.stages.config import TRegConfig
    from treg.stages.trainer import TRegTrainer
    tok = tiny_tokenizer("llama3")
    args = TRegConfig(output_dir=out, max_steps=4, per_device_train_batch_size=per_device,
                      gradient_accumulation_steps=grad_acc, learning_rate=1e-3, logging_steps=1, seed=0,
                      save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, alpha=0.25,
                      lr_scheduler_type="constant")
    trainer = TRegTrainer(tiny_llama(len(tok)), args=args, train_dataset=make_pairs(16), processing_class=tok)
    trainer.train()
    world = trainer.accelerator.num_processes
    result = {"world": world, "loss": [h["loss"] for h in trainer.state.log_history if "loss" in h],
              "ref": list(trainer.train_dataset["ref_chosen_logps"]),
              "params": [float(p.detach().double().sum()) for p in trainer.model.parameters()]}
    if trainer.is_world_process_zero():
        with open(f"{out}/result.json", "w") as fh:
            json.dump(result, fh)
    del trainer
    shutdown()
    return result


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]))
'''.replace("TESTS", repr(TESTS))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_accelerate_matches_one_process(tmp_path):
    script = tmp_path / "dist_train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(script), str(tmp_path), "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "result.json").read_text())

    namespace: dict = {"__name__": "dist_train"}
    exec(compile(SCRIPT, str(script), "exec"), namespace)
    one = namespace["run"](str(tmp_path / "one"), 4)

    assert two["world"] == 2 and one["world"] == 1
    assert len(two["loss"]) == len(one["loss"]) == 4
    assert two["ref"] == pytest.approx(one["ref"], rel=1e-5)      # sharded + gathered reference pass
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-4)
    assert two["params"] == pytest.approx(one["params"], rel=1e-4, abs=1e-4)


@pytest.mark.slow
def test_treg_train_cli_under_accelerate_two_processes(tmp_path):
    """The documented launcher line: `accelerate launch --multi_gpu --num_processes 2 -m treg.cli train`."""
    sys.path.insert(0, TESTS)
    from test_data import write_pairs
    from tiny import save_tiny_model
    from transformers import AutoTokenizer
    save_tiny_model(tmp_path / "model", "llama3")
    data = write_pairs(tmp_path / "ann", AutoTokenizer.from_pretrained(tmp_path / "model"), n=8)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "treg.cli", "train",
           "--model_name_or_path", str(tmp_path / "model"), "--dataset_path", str(data),
           "--output_dir", str(tmp_path / "out"), "--use_cpu", "--max_steps", "2",
           "--per_device_train_batch_size", "2", "--save_strategy", "no", "--disable_tqdm", "true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = [line for line in proc.stdout.splitlines() if line.startswith("treg train:")]
    assert len(summary) == 1 and "2 steps on 8 pairs" in summary[0]   # printed by rank 0 only
    assert (tmp_path / "out" / "model.safetensors").is_file()
