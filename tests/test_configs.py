"""The paper's recipes (configs/) load and validate against the code they drive, so they cannot drift:
TRegConfig (HfArgumentParser), accelerate's config dataclass and launch options, the DeepSpeed JSON as
the HF Trainer fills it, the pipeline planner and every command-line option in the run scripts."""

import json
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
TRAIN = sorted(CONFIGS.glob("*/train.yaml"))
ACCEL = sorted((CONFIGS / "accelerate").glob("*.yaml"))
DS = sorted((CONFIGS / "deepspeed").glob("*.json"))
PIPES = sorted(CONFIGS.glob("*/pipeline.yaml"))
SCRIPTS = sorted(CONFIGS.glob("*/run.sh"))


def _train_config(path, *extra):
    import torch
    from treg.stages.config import parse_config
    cpu = [] if torch.cuda.is_available() else ["--use_cpu", "true"]  # bf16: true needs a GPU otherwise
    return parse_config(["--config", str(path), *cpu, *extra])


def test_recipes_present():
    assert {p.parent.name for p in TRAIN} == {"llama3-8b-instruct-dpo-reg", "gemma2-9b-it-simpo-reg"}
    assert len(PIPES) == len(SCRIPTS) == 2 and ACCEL and DS


@pytest.mark.parametrize("path", TRAIN, ids=lambda p: p.parent.name)
def test_train_yaml_is_a_valid_tregconfig(path):
    cfg = _train_config(path)
    assert cfg.alpha in (0.1, 0.25, 0.5) and cfg.weighting == "sequence"
    assert cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * 8 == 128  # METHOD.md §6
    assert cfg.num_train_epochs == 1 and cfg.max_length == 2048 and cfg.bf16
    if "simpo" in path.parent.name:  # SimPO's public gemma-2-9b-it config: beta 10, gamma/beta 0.5, lr 8e-7
        assert (cfg.method, cfg.beta, cfg.gamma, cfg.learning_rate) == ("simpo", 10.0, 5.0, 8e-7)
    else:
        assert cfg.method == "dpo" and cfg.gamma == 0.0
    assert _train_config(path, "--alpha", "0.5").alpha == 0.5  # the sweep override works


@pytest.mark.parametrize("path", ACCEL, ids=lambda p: p.name)
def test_accelerate_yaml(path):
    import yaml
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser
    cfg = ClusterConfig.from_yaml_file(str(path))  # unknown keys raise here
    raw = yaml.safe_load(path.read_text())
    dests = {a.dest for a in launch_command_parser()._actions}
    ds = raw.get("deepspeed_config") or {}
    assert set(ds) <= dests, set(ds) - dests
    if ds.get("deepspeed_config_file"):
        assert (ROOT / ds["deepspeed_config_file"]).is_file()
        # accelerate refuses these beside a deepspeed_config_file (they belong in the JSON)
        assert not set(ds) & {"gradient_accumulation_steps", "gradient_clipping", "zero_stage",
                              "offload_optimizer_device", "offload_param_device", "zero3_save_16bit_model"}
        assert raw.get("mixed_precision") is None
        assert str(cfg.distributed_type).endswith("DEEPSPEED")
    assert cfg.num_processes == 8


@pytest.mark.parametrize("path", DS, ids=lambda p: p.name)
@pytest.mark.parametrize("train", TRAIN, ids=lambda p: p.parent.name)
def test_deepspeed_json_is_filled_by_the_trainer(path, train, monkeypatch):
    from types import SimpleNamespace
    import transformers.integrations.deepspeed as hf_ds
    from accelerate.utils.deepspeed import HfDeepSpeedConfig as AccelerateDeepSpeedConfig
    raw = json.loads(path.read_text())
    assert raw["zero_optimization"]["stage"] == 3
    args = _train_config(train)
    # deepspeed is not installed here (transformers then gives its config class a dummy base): skip only the
    # version check and supply accelerate's base, so that the Trainer's real "auto"-filling code runs
    monkeypatch.setattr(hf_ds, "dep_version_check", lambda *a, **k: None)
    filler = type("Filler", (hf_ds.HfTrainerDeepSpeedConfig, AccelerateDeepSpeedConfig), {})
    try:
        ds = filler(str(path))
        ds.trainer_config_process(args)
        ds.trainer_config_finalize(args, SimpleNamespace(config=SimpleNamespace(hidden_size=4096)), 100)
    finally:
        hf_ds.unset_hf_deepspeed_config()
    assert "auto" not in json.dumps(ds.config)  # every "auto" is resolved from TRegConfig / the model
    assert ds.config["train_micro_batch_size_per_gpu"] == args.per_device_train_batch_size
    assert ds.config["bf16"]["enabled"] is True


def _known_options(command):
    from treg.stages.pipeline import known_options
    return known_options(command)


@pytest.mark.parametrize("path", PIPES, ids=lambda p: p.parent.name)
def test_pipeline_yaml_plans_with_known_options(path):
    from treg.stages.pipeline import load_config, plan
    stages = plan(load_config(str(path)))
    assert [s.command for s in stages][:4] == ["sample", "score", "annotate", "train"]
    assert {s.command for s in stages} >= {"generate", "eval"}
    for s in stages:
        known = _known_options(s.command)
        flags = [a for a in s.argv if a.startswith("--")]
        assert set(flags) <= known, (s.name, set(flags) - known)
        if s.launch:
            conf = shlex.split(s.launch)[shlex.split(s.launch).index("--config_file") + 1]
            assert (ROOT / conf).is_file()
    train = next(s for s in stages if s.command == "train")
    _train_config(ROOT / train.argv[train.argv.index("--config") + 1])


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.parent.name)
def test_run_script_commands_use_known_options(path):
    """A recipe's run.sh sets its own RECIPE/MODEL/... and sources the shared stages: check both, as run."""
    stages = CONFIGS / "recipe_stages.sh"
    for script in (path, stages):
        subprocess.run(["bash", "-n", str(script)], check=True)
    own = path.read_text()
    assert f"RECIPE={path.parent.name}\n" in own and 'source "$(dirname "$0")/../recipe_stages.sh"' in own
    assert (CONFIGS / path.parent.name / "train.yaml").is_file()  # what stage 4's --config resolves to
    text = (own + "\n" + stages.read_text()).replace("\\\n", " ")
    calls = 0
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        words = line.split()
        for i, w in enumerate(words[:-1]):
            if w == "treg" and words[i + 1] in {"sample", "score", "annotate", "train", "generate", "eval"}:
                flags = {x for x in words[i + 2:] if x.startswith("--")}
                assert flags <= _known_options(words[i + 1]), (words[i + 1], flags - _known_options(words[i + 1]))
                calls += 1
    assert calls >= 6
