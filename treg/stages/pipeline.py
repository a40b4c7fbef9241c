"""``treg pipeline``: sample -> score -> annotate -> train -> generate -> eval from one YAML file.

Config (docs/recipes.md has complete examples; configs/*/pipeline.yaml are the paper's recipes)::

    workdir: runs/exp            # every stage writes under it
    model: path-or-hub-name      # the reference / starting policy
    sample:   {prompts: ..., n: 5, temperature: 0.8, ...}     # options of `treg sample`
    score:    {reward_fn: mod:fn}  or  {reward_model: RM, trust_remote_code: true}
    probe:    {min_auroc: 0.6, on_fail: stop}                 # optional: `treg probe` before annotate
    annotate: {template: revision}                            # options of `treg annotate`
    train:    {config: train.yaml, alpha: 0.25, ...}          # TRegConfig fields (underscores)
    generate:                                                 # one or more benchmark files
      - {name: alpaca, prompts: ..., format: alpaca_eval}
      - {name: base_alpaca, model: reference, prompts: ..., format: alpaca_eval}
    eval:
      - {name: alpaca, outputs: "@alpaca", baseline: "@base_alpaca", reward_fn: mod:fn}

Every stage mapping holds the stage's command-line options (``max_new_tokens`` -> ``--max-new-tokens``;
``true`` -> a flag; train keeps TRegConfig's underscore names) plus two reserved keys: ``launch``
(a command prefix such as ``accelerate launch --config_file X``: the stage then runs as a
subprocess ``<launch> -m treg <stage> ...``) and ``skip: true``. The pipeline adds the wiring
options (model, inputs, outputs). ``"@name"`` refers to the output file of generate item ``name``.

Probe (issue 11): a ``probe`` mapping runs ``treg probe`` on the scored pairs before annotate
(``workdir/probe.json``), with annotate's ``template`` unless it names its own. ``on_fail`` (reserved
key; ``stop`` by default, or ``warn``): what to do when a probed method's verdict is "near or below
chance" (AUROC under ``min_auroc`` or its CI not above 0.5). The check also runs when the probe
stage is skipped as complete, so a failing probe keeps stopping the pipeline until changed.

Skipping: after a stage succeeds, ``workdir/pipeline_state.json`` records the stage's *key* (a hash
of its arguments and of the fingerprints of every input path among them) and the *fingerprint of
its output* (``treg_meta.json``'s ``fingerprint`` for datasets; ``<file>.treg_meta.json`` for
generate files; file sizes and times for a trained model or report). A stage is skipped when its
key is unchanged and its output is complete with the recorded fingerprint; the reason is printed.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from treg.errors import TregError
from treg.io.meta import META_FILE, stable_hash

STATE_FILE = "pipeline_state.json"
SINGLE = ("sample", "score", "probe", "annotate", "train")
ON_FAIL = ("stop", "warn")
EXTENSIONS = {"alpaca_eval": "json", "arena_hard": "jsonl", "jsonl": "jsonl"}


@dataclass
class Stage:
    """One planned stage: ``command`` (a treg command), ``argv`` and its ``output`` path."""
    name: str
    command: str
    argv: list[str]
    output: str
    launch: str | None = None
    on_fail: str | None = None   # probe only: "stop" or "warn" when a method is near or below chance


# --------------------------------------------------------------------------- fingerprints

def output_fingerprint(path: str) -> str | None:
    """Fingerprint of a complete stage output, or None when it is missing / incomplete."""
    from treg.stages.sampling import path_fingerprint
    p = Path(path)
    if p.is_dir():
        if (p / META_FILE).exists():
            try:
                return json.loads((p / META_FILE).read_text()).get("fingerprint")
            except json.JSONDecodeError:
                return None
        if (p / "config.json").exists() or (p / "adapter_config.json").exists():  # a saved model
            if any(p.glob("*.safetensors")) or any(p.glob("*.bin")):
                return path_fingerprint(str(p))
        return None
    if p.is_file():
        side = Path(f"{p}.treg_meta.json")
        if side.exists():
            try:
                return json.loads(side.read_text()).get("fingerprint")
            except json.JSONDecodeError:
                return None
        return path_fingerprint(str(p))
    return None


def _input_paths(argv: list[str], output: str) -> list[str]:
    """Arguments that name existing local paths (``file.py:fn`` counts by its file), output excluded."""
    found = []
    for a in argv:
        for cand in (a, a.rpartition(":")[0]):
            if cand and cand != output and os.path.exists(cand) and cand not in found:
                found.append(cand)
                break
    return found


def stage_key(stage: Stage) -> str:
    """Hash of the stage's arguments and of the fingerprints of its input paths."""
    from treg.stages.sampling import path_fingerprint
    inputs = {p: output_fingerprint(p) or path_fingerprint(p) for p in _input_paths(stage.argv, stage.output)}
    return stable_hash({"command": stage.command, "argv": stage.argv, "inputs": inputs})


# --------------------------------------------------------------------------- planning

def _options(opts: dict, *, underscores: bool) -> list[str]:
    argv = []
    for key, val in opts.items():
        flag = "--" + (key if underscores else key.replace("_", "-"))
        if isinstance(val, bool) and not underscores:
            if val:
                argv.append(flag)
        elif isinstance(val, (list, tuple)):
            argv += [flag, *map(str, val)]
        elif val is not None:
            argv += [flag, str(val).lower() if isinstance(val, bool) else str(val)]
    return argv


def load_config(path: str) -> dict:
    """Read and check the pipeline YAML (TregError names the file and key)."""
    from treg.io.fsutil import read_yaml_mapping
    cfg = read_yaml_mapping(path, what="pipeline config")
    known = {"workdir", "model", *SINGLE, "generate", "eval"}
    for key in cfg:
        if key not in known:
            raise TregError(f"unknown key (known: {', '.join(sorted(known))})", file=path, field=str(key))
    for key in ("workdir", "model"):
        if not cfg.get(key):
            raise TregError("missing key", file=path, field=key)
    for key in SINGLE:
        if key in cfg and not isinstance(cfg[key], dict):
            raise TregError("must be a mapping of options", file=path, field=key)
    for key in ("generate", "eval"):
        items = cfg.get(key) or []
        cfg[key] = [items] if isinstance(items, dict) else items
        for i, item in enumerate(cfg[key]):
            if not isinstance(item, dict) or not item.get("name"):
                raise TregError("each item needs a 'name'", file=path, field=f"{key}[{i}]")
    return cfg


def plan(cfg: dict) -> list[Stage]:
    """The stages of a config, in data-path order, with the wiring options filled in."""
    work, model = str(cfg["workdir"]), str(cfg["model"])
    out = {"sample": f"{work}/samples", "score": f"{work}/pairs", "probe": f"{work}/probe.json",
           "annotate": f"{work}/annotated", "train": f"{work}/model"}
    wiring = {
        "sample": ["--model", model, "--output", out["sample"]],
        "score": ["--samples", out["sample"], "--output", out["score"]],
        "probe": ["--model", model, "--dataset", out["score"], "--json", out["probe"]],
        "annotate": ["--model", model, "--dataset", out["score"], "--output", out["annotate"]],
        "train": ["--model_name_or_path", model, "--dataset_path", out["annotate"], "--output_dir", out["train"]],
    }
    stages = []
    for name in SINGLE:
        opts = dict(cfg.get(name) or {})
        launch = opts.pop("launch", None)
        on_fail = opts.pop("on_fail", "stop") if name == "probe" else None
        if name not in cfg or opts.pop("skip", False):
            continue
        if on_fail not in (None, *ON_FAIL):
            raise TregError(f"must be one of {', '.join(ON_FAIL)}", field="probe.on_fail")
        if name == "probe" and "template" not in opts and "source" not in opts:
            opts["template"] = (cfg.get("annotate") or {}).get("template")
        argv = _options(opts, underscores=name == "train") + wiring[name]
        stages.append(Stage(name, name, argv, out[name], launch, on_fail))
    files = {}
    for item in cfg.get("generate", []):
        opts = dict(item)
        name, launch = opts.pop("name"), opts.pop("launch", None)
        source = opts.pop("model", "policy")
        gen_model = {"policy": out["train"], "reference": model}.get(source, source)
        fmt = opts.get("format", "jsonl")
        files[name] = f"{work}/outputs/{name}.{EXTENSIONS.get(fmt, 'jsonl')}"
        if opts.pop("skip", False):
            continue
        argv = _options(opts, underscores=False) + ["--model", gen_model, "--output", files[name]]
        stages.append(Stage(f"generate:{name}", "generate", argv, files[name], launch))
    for item in cfg.get("eval", []):
        opts = dict(item)
        name, launch = opts.pop("name"), opts.pop("launch", None)
        if opts.pop("skip", False):
            continue
        for key in ("outputs", "baseline"):
            val = str(opts.get(key, ""))
            if val.startswith("@"):
                if val[1:] not in files:
                    raise TregError(f"'{val}' names no generate item", field=f"eval.{name}.{key}")
                opts[key] = files[val[1:]]
        opts.setdefault("outputs", files.get(name))
        report = f"{work}/eval/{name}.json"
        stages.append(Stage(f"eval:{name}", "eval", _options(opts, underscores=False) + ["--report", report],
                            report, launch))
    return stages


def known_options(command: str) -> set[str]:
    """The ``--flags`` a stage's command accepts (train: every TRegConfig field plus ``--config``)."""
    import dataclasses
    import importlib
    if command == "train":
        from treg.stages.config import TRegConfig
        return {"--" + f.name for f in dataclasses.fields(TRegConfig) if f.init} | {"--config"}
    parser = importlib.import_module(f"treg.cli.{command}").build_parser()
    return {s for a in parser._actions for s in a.option_strings}


def check_options(stages: list[Stage], config_path: str) -> None:
    """Refuse, before the first stage runs (not hours later): two stages of one name, a launcher that is not
    an executable on PATH, an unknown option in any stage, and (except train) an option value its command's
    parser refuses (type, finiteness, range)."""
    import importlib
    import shutil
    seen = set()
    for stage in stages:
        if stage.name in seen:
            raise TregError(f"two stages named '{stage.name}' (their outputs would collide)", file=config_path,
                            field=stage.name.replace(":", "."))
        seen.add(stage.name)
        if stage.launch and (not shlex.split(stage.launch) or not shutil.which(shlex.split(stage.launch)[0])):
            raise TregError(f"launcher '{stage.launch}' is not an executable on PATH", file=config_path,
                            field=f"{stage.name.replace(':', '.')}.launch")
        bad = [a for a in stage.argv if a.startswith("--") and a not in known_options(stage.command)]
        if bad:
            key = bad[0][2:] if stage.command == "train" else bad[0][2:].replace("-", "_")
            raise TregError(f"unknown option of treg {stage.command} (see treg {stage.command} --help)",
                            file=config_path, field=f"{stage.name.replace(':', '.')}.{key}")
        if stage.command != "train":
            try:
                importlib.import_module(f"treg.cli.{stage.command}").build_parser().parse_args(list(stage.argv))
            except TregError as err:  # a value check names the option as the YAML key (sample.top_p)
                if err.field:
                    key = f"{stage.name.replace(':', '.')}.{err.field.lstrip('-').replace('-', '_')}"
                    raise TregError(err.bare_message, file=config_path, field=key) from None
                raise TregError(f"stage {stage.name}: {err.bare_message}", file=config_path) from None


# --------------------------------------------------------------------------- running

def _read_state(work: str) -> dict:
    p = Path(work) / STATE_FILE
    try:
        return json.loads(p.read_text()) if p.exists() else {}
    except json.JSONDecodeError:
        return {}


def _write_state(work: str, state: dict) -> None:
    from treg.io.fsutil import atomic_write_text
    atomic_write_text(Path(work) / STATE_FILE, json.dumps(state, indent=2, sort_keys=True))


def decide(stage: Stage, state: dict) -> tuple[bool, str]:
    """``(run?, reason)`` for one stage given the recorded state."""
    rec = state.get(stage.name)
    fp = output_fingerprint(stage.output)
    if rec is None:
        return True, "no previous run recorded"
    if rec.get("key") != stage_key(stage):
        return True, "its arguments or inputs changed"
    if fp is None:
        return True, "its output is missing or incomplete"
    if fp != rec.get("output"):
        return True, "its output changed since it was recorded"
    return False, f"output complete, fingerprint {fp} matches"


def run_stage(stage: Stage) -> None:
    """Run one stage in-process (TregErrors are re-raised naming the stage) or under ``launch``."""
    if stage.launch:
        cmd = shlex.split(stage.launch) + ["-m", "treg", stage.command, *stage.argv]
        code = subprocess.call(cmd)
        if code != 0:
            raise TregError(f"stage {stage.name} failed (exit {code}): {' '.join(map(shlex.quote, cmd))}")
        return
    from treg.cli import COMMANDS
    import importlib
    from treg.io.loading import allow_pickle_weights
    module = importlib.import_module(COMMANDS[stage.command][0])
    allow_pickle_weights(False)  # per stage, as per command
    try:
        code = int(module.main(list(stage.argv)) or 0)
    except TregError as err:
        raise TregError(f"stage {stage.name}: {err}") from None
    if code != 0:
        raise TregError(f"stage {stage.name} exited with {code}")


def run_pipeline(config_path: str, *, dry_run: bool = False, force: tuple[str, ...] = (),
                 until: str | None = None, log=print) -> list[tuple[str, str, str]]:
    """Run (or with ``dry_run`` only plan) the pipeline; returns ``[(stage, "run"|"skip", reason)]``."""
    cfg = load_config(config_path)
    stages = plan(cfg)
    check_options(stages, config_path)
    names = [s.name for s in stages]
    for f in (*force, *([until] if until else [])):
        if f not in names and f not in {s.command for s in stages}:
            raise TregError(f"no stage '{f}' in this pipeline (have: {', '.join(names)})")
    work = str(cfg["workdir"])
    state = _read_state(work)
    done, earlier_runs = [], False
    for stage in stages:
        go, why = decide(stage, state)
        if stage.name in force or stage.command in force:
            go, why = True, "forced (--force)"
        if dry_run and not go and earlier_runs:
            why += " (now; it may rerun after an earlier stage runs)"
        earlier_runs |= go
        done.append((stage.name, "run" if go else "skip", why))
        log(f"treg pipeline: {'run ' if go else 'skip'} {stage.name}: {why}")
        if go and not dry_run:
            key = stage_key(stage)
            run_stage(stage)
            fp = output_fingerprint(stage.output)
            if fp is None:
                raise TregError(f"stage {stage.name} finished but its output is incomplete", file=stage.output)
            state[stage.name] = {"key": key, "output": fp}
            Path(work).mkdir(parents=True, exist_ok=True)
            _write_state(work, state)
        if stage.command == "probe" and not dry_run:
            check_probe(stage, log)
        if until and until in (stage.name, stage.command):
            break
    return done


def check_probe(stage: Stage, log=print) -> None:
    """Stop (TregError) or warn when a method in the probe report is near or below chance."""
    from treg.stages.probe import NOISE
    report = json.loads(Path(stage.output).read_text())
    bad = [f"{r['method']} AUROC {r['auroc']:.3f} (CI {r['auroc_ci'][0]:.2f}-{r['auroc_ci'][1]:.2f})"
           for r in report["results"] if r.get("verdict") == NOISE]
    if not bad:
        return
    msg = (f"probe: {'; '.join(bad)} is near or below chance (min_auroc {report['min_auroc']}): alpha > 0 "
           f"would regularize toward noise (report: {stage.output})")
    if stage.on_fail == "warn":
        log(f"treg pipeline: warning: {msg}")
        return
    raise TregError(f"{msg}; try another template, or set probe.on_fail: warn to continue")


def describe(stages: list[Stage]) -> str:
    """The planned commands, one per line (for --dry-run)."""
    return "\n".join(f"  {s.launch + ' -m ' if s.launch else ''}treg {s.command} "
                     + " ".join(map(shlex.quote, s.argv)) for s in stages)

