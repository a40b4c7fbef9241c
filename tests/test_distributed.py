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
if __name__ == "__main__":  # the launched processes only: a hang shows its stack instead of timing out silently
    faulthandler.dump_traceback_later(170, exit=True)  # (never in pytest, which exec()s this for one process)
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


# ------------------------------------------------------------------------------------------------
# The reference pass (treg.stages.reference) with 2 processes: cache, resume, lockstep on sharded weights.
#
# FSDP note: accelerate 1.16 enables FSDP only on accelerator devices (cuda, xpu, npu, ...); with use_cpu
# a `distributed_type: FSDP` config runs as MULTI_CPU (gloo DDP). So the trainer test below runs DDP over
# gloo, and the FSDP2 lockstep is tested directly: the script shards the model with torch's own
# `fully_shard` (gloo, CPU) and runs the trainer's reference pass over it.
# ------------------------------------------------------------------------------------------------
REF_SCRIPT = r'''
import faulthandler, json, os, sys
if __name__ == "__main__":  # as above: not in the pytest process
    faulthandler.dump_traceback_later(170, exit=True)
sys.path.insert(0, TESTS)
import torch
torch.set_num_threads(1)


def run(mode, out, per_device):
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from test_data import make_pairs
    from tiny import tiny_llama, tiny_tokenizer
    import treg.method.seqscore as seqscore
    from treg.stages import reference
    from treg.stages.config import TRegConfig
    from treg.stages.trainer import TRegTrainer
    from treg.cli.train import shutdown
    reference.SHARD_ROWS = 2 if mode == "fsdp" else 4
    state = PartialState(cpu=True)
    kill_at = int(os.environ.get("KILL_AT", "0"))
    if kill_at and state.process_index == 0:
        real, scored = seqscore.score_sequences, []

        def dies(*a, **kw):
            scored.append(1)
            if len(scored) == kill_at:
                os._exit(17)                       # a kill in the middle of the reference pass
            return real(*a, **kw)
        seqscore.score_sequences = dies
    tok = tiny_tokenizer("llama3")
    model = tiny_llama(len(tok))
    if mode == "fsdp" and state.num_processes > 1:
        from torch.distributed.fsdp import fully_shard
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    args = TRegConfig(output_dir=f"{out}/run", ref_cache_dir=f"{out}/cache", max_steps=3,
                      per_device_train_batch_size=per_device, learning_rate=1e-3, logging_steps=1, seed=0,
                      save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, alpha=0.25,
                      lr_scheduler_type="constant", max_length=14, precompute_ref_batch_size=1)
    trainer = TRegTrainer(model, args=args, train_dataset=make_pairs(7 if mode == "fsdp" else 16), processing_class=tok)
    info = {"forwards": len(calls), **trainer.reference_info["train"]}
    if mode == "train":
        trainer.train()
    result = {"world": state.num_processes, "info": gather_object([info]),
              "loss": [h["loss"] for h in trainer.state.log_history if "loss" in h],
              "ref": [*trainer.train_dataset["ref_chosen_logps"], *trainer.train_dataset["ref_rejected_logps"]],
              "rewards": [v for r in trainer.train_dataset["chosen_token_rewards"] for v in r]}
    if state.is_main_process:
        with open(f"{out}/result.json", "w") as fh:
            json.dump(result, fh)
    del trainer
    shutdown()
    return result


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2], int(sys.argv[3]))
'''.replace("TESTS", repr(TESTS))


def _launch(script, *argv, env=None, timeout=200):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", **(env or {})}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(script), *map(str, argv)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_reference_pass_two_processes_cache_resume_and_steps(tmp_path):
    """2 processes: a kill during the reference pass + rerun resumes from the cache; the reference pass and
    3 steps match one process; a third run re-uses the cache (no reference forward on any process)."""
    script = tmp_path / "ref.py"
    script.write_text(REF_SCRIPT)
    out = tmp_path / "two"
    killed = _launch(script, "train", out, 2, env={"KILL_AT": "2"})
    assert killed.returncode != 0 and not (out / "result.json").exists()
    assert list((out / "cache").glob("train-*/.shards/shard-*.parquet"))       # finished shards survived
    resumed = _launch(script, "train", out, 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    two = json.loads((out / "result.json").read_text())
    assert sum(i["resumed_shards"] > 0 for i in two["info"]) >= 1
    assert sum(i["computed_rows"] for i in two["info"]) < 16                    # not everything again

    namespace: dict = {"__name__": "ref_script"}
    exec(compile(REF_SCRIPT, str(script), "exec"), namespace)
    one = namespace["run"]("train", str(tmp_path / "one"), 4)
    assert two["world"] == 2 and one["world"] == 1
    assert two["ref"] == pytest.approx(one["ref"], rel=1e-5, abs=1e-5)
    assert two["rewards"] == pytest.approx(one["rewards"], abs=1e-5)
    assert len(two["loss"]) == len(one["loss"]) == 3
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-4)

    again = _launch(script, "train", out, 2)
    assert again.returncode == 0, again.stderr[-3000:]
    info = json.loads((out / "result.json").read_text())["info"]
    assert [i["forwards"] for i in info] == [0, 0] and all(i["reused"] for i in info)


@pytest.mark.slow
def test_reference_pass_on_fsdp2_sharded_model_runs_in_lockstep(tmp_path):
    """The model is sharded with FSDP2 `fully_shard` (gloo, CPU): every forward is collective. 7 pairs in
    shards of 2 give the processes different amounts of work; the pass completes (dummy forwards on the
    process with less) and equals the unsharded one-process values."""
    script = tmp_path / "ref.py"
    script.write_text(REF_SCRIPT)
    proc = _launch(script, "fsdp", tmp_path / "two", 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    namespace: dict = {"__name__": "ref_script"}
    exec(compile(REF_SCRIPT, str(script), "exec"), namespace)
    one = namespace["run"]("fsdp", str(tmp_path / "one"), 2)
    forwards = [i["forwards"] + i["dummy_forwards"] for i in two["info"]]
    assert forwards[0] == forwards[1] and any(i["dummy_forwards"] > 0 for i in two["info"])
    assert two["ref"] == pytest.approx(one["ref"], rel=1e-5, abs=1e-5)
    assert two["rewards"] == pytest.approx(one["rewards"], abs=1e-5)


def test_deepspeed_zero3_reference_pass():
    pytest.importorskip("deepspeed", reason="deepspeed is not installed here (no CPU accelerator to test ZeRO-3 "
                        "with); benchmarks/gpu_check.sh runs the ZeRO-3 reference pass + steps on a GPU")
    pytest.skip("ZeRO-3 needs a GPU for DeepSpeed's inference engine: run benchmarks/gpu_check.sh")
