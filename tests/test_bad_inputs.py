"""The bad-input corpus (issue 13, docs/errors.md): every command, run in-process through ``treg.cli.main``,
given a bad file, field or flag, must exit 2 with exactly one ``treg <cmd>: error:`` line on stderr naming
the culprit, print no traceback, write nothing and leave a pre-existing output byte-identical.

Almost every case fails before any model loads (parse time, input reading), so the file stays fast; the
tiny model of tests/tiny.py is built once for the cases that need a real model directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from treg.cli import main  # noqa: E402

GOOD_YAML = "model_name_or_path: {model}\ndataset_path: {t}/ann\noutput_dir: {t}/trainout\nmax_steps: 2\nuse_cpu: true\n"
PIPE_YAML = "workdir: {t}/work\nmodel: {model}\n"
PRE_EXISTING = {"report.json": "OLD REPORT\n", "out.jsonl": "OLD OUTPUTS\n", "page.html": "<p>old</p>\n"}


def files(t: Path) -> dict[str, str | bytes]:
    """The inputs every case can use (written fresh for each case)."""
    js = lambda rows: "".join(json.dumps(r) + "\n" for r in rows)  # noqa: E731
    return {
        "prompts.jsonl": js([{"prompt": "Hi"}, {"prompt": "Sum?"}]),
        "latin1.jsonl": b'{"prompt": "Hi"}\n{"prompt": "caf\xe9"}\n',
        "empty.jsonl": "",
        "blank.jsonl": "\n  \n",
        "bad.jsonl": '{"prompt": "Hi"}\n{"prompt": \n',
        "prompts.txt": "Hi\n",
        "samples.jsonl": js([{"prompt": "Hi", "responses": ["a", "bb"]}]),
        "one_response.jsonl": js([{"prompt": "Hi", "responses": ["a"]}]),
        "pairs.jsonl": js([{"prompt": "Hi", "chosen": "a", "rejected": "b"}]),
        "outputs.jsonl": js([{"prompt": "Hi", "output": "a"}]),
        "baseline.jsonl": js([{"prompt": "Hi", "output": "bb"}]),
        "latin1_outputs.jsonl": b'{"prompt": "Hi", "output": "\xff"}\n',
        "answers.jsonl": js([{"question_id": "q1", "choices": [{"turns": [{"content": "a"}]}]}]),
        "latin1_questions.jsonl": b'{"question_id": "q1", "turns": [{"content": "\xe9"}]}\n',
        "fn.py": "def f(prompt, output):\n    return float(len(output))\n",
        "latin1.yaml": b"mode: revision\nbetter: caf\xe9\n",
        "list.yaml": "- a\n- b\n",
        "not_a_dir": "a file\n",
        **PRE_EXISTING,
    }


S = "sample --model {model} --prompts {t}/prompts.jsonl --output {t}/samples --no-progress"
SC = "score --samples {t}/samples.jsonl --reward-fn {t}/fn.py:f --output {t}/pairs --no-progress"
AN = "annotate --model {model} --dataset {t}/pairs.jsonl --output {t}/ann --no-progress"
TR = "train --config {t}/run.yaml"
GE = "generate --model {model} --prompts {t}/prompts.jsonl --output {t}/out.jsonl --no-progress"
EV = "eval --outputs {t}/outputs.jsonl --baseline {t}/baseline.jsonl --reward-fn {t}/fn.py:f --report {t}/report.json"
PI = "pipeline --config {t}/pipe.yaml --dry-run"
SH = "show {t}/ann --html {t}/page.html"
DE = "demo --quick --out {t}/demo"
TB = "toy build --out {t}/toyout"
TC = "toy check"
PR = "probe --model {model} --dataset {t}/pairs.jsonl --json {t}/report.json"

# (id, argv, what the error line must name, extra files {name: text})
CASES = [
    # -- sample
    ("sample-n1", S + " --n 1", "--n", {}),
    ("sample-temp-nan", S + " --temperature nan", "--temperature", {}),
    ("sample-temp-inf", S + " --temperature inf", "--temperature", {}),
    ("sample-temp-zero", S + " --temperature 0", "--temperature", {}),
    ("sample-top-p", S + " --top-p 1.5", "--top-p", {}),
    ("sample-batch0", S + " --batch-size 0", "--batch-size", {}),
    ("sample-shard0", S + " --shard-size 0", "--shard-size", {}),
    ("sample-max-new0", S + " --max-new-tokens 0", "--max-new-tokens", {}),
    ("sample-limit0", S + " --limit 0", "--limit", {}),
    ("sample-seed-neg", S + " --seed -1", "--seed", {}),
    ("sample-gpu-mem", S + " --gpu-memory-utilization 2", "--gpu-memory-utilization", {}),
    ("sample-int-flag", S + " --n two", "--n", {}),
    ("sample-latin1", S.replace("prompts.jsonl", "latin1.jsonl"), "latin1.jsonl: not valid UTF-8", {}),
    ("sample-latin1-where", S.replace("prompts.jsonl", "latin1.jsonl"), "line 2, byte offset 32", {}),
    ("sample-empty", S.replace("prompts.jsonl", "empty.jsonl"), "empty.jsonl: empty file", {}),
    ("sample-blank", S.replace("prompts.jsonl", "blank.jsonl"), "blank.jsonl: empty file", {}),
    ("sample-malformed", S.replace("prompts.jsonl", "bad.jsonl"), "bad.jsonl, row 2", {}),
    ("sample-missing", S.replace("prompts.jsonl", "nope.jsonl"), "nope.jsonl", {}),
    ("sample-txt", S.replace("prompts.jsonl", "prompts.txt"), "prompts.txt", {}),
    ("sample-pickle", S.replace("{model}", "{pickle}"), "pytorch_model.bin", {}),
    # -- score
    ("score-batch0", SC + " --batch-size 0", "--batch-size", {}),
    ("score-margin-nan", SC + " --min-margin nan", "--min-margin", {}),
    ("score-margin-neg", SC + " --min-margin -1", "--min-margin", {}),
    ("score-shard0", SC + " --shard-size 0", "--shard-size", {}),
    ("score-latin1", SC.replace("samples.jsonl", "latin1.jsonl"), "latin1.jsonl: not valid UTF-8", {}),
    ("score-empty", SC.replace("samples.jsonl", "empty.jsonl"), "empty.jsonl: empty file", {}),
    ("score-one-response", SC.replace("samples.jsonl", "one_response.jsonl"), "responses", {}),
    ("score-fn-missing", SC.replace("fn.py:f", "nofn.py:f"), "nofn.py", {}),
    ("score-output-under-file", SC.replace("{t}/pairs", "{t}/not_a_dir/pairs"), "not_a_dir", {}),
    # -- annotate
    ("annotate-beta0", AN + " --beta 0", "--beta", {}),
    ("annotate-beta-nan", AN + " --beta nan", "--beta", {}),
    ("annotate-max-length1", AN + " --max-length 1", "--max-length", {}),
    ("annotate-batch-tokens0", AN + " --batch-tokens 0", "--batch-tokens", {}),
    ("annotate-shard0", AN + " --shard-size 0", "--shard-size", {}),
    ("annotate-latin1", AN.replace("pairs.jsonl", "latin1.jsonl"), "latin1.jsonl: not valid UTF-8", {}),
    ("annotate-empty", AN.replace("pairs.jsonl", "empty.jsonl"), "empty.jsonl: empty file", {}),
    ("annotate-template-latin1", AN + " --template {t}/latin1.yaml", "latin1.yaml: not valid UTF-8", {}),
    ("annotate-pickle", AN.replace("{model}", "{pickle}"), "pytorch_model.bin", {}),
    # -- train (all before any model loads)
    ("train-yaml-list-int", TR, "run.yaml, field 'per_device_train_batch_size'",
     {"run.yaml": GOOD_YAML + "per_device_train_batch_size: [1, 2]\n"}),
    ("train-yaml-nan-lr", TR, "run.yaml, field 'learning_rate'", {"run.yaml": GOOD_YAML + "learning_rate: .nan\n"}),
    ("train-yaml-list-beta", TR, "run.yaml, field 'beta'", {"run.yaml": GOOD_YAML + "beta: [0.1]\n"}),
    ("train-yaml-neg-alpha", TR, "run.yaml, field 'alpha'", {"run.yaml": GOOD_YAML + "alpha: -1\n"}),
    ("train-yaml-str-int", TR, "run.yaml, field 'max_steps'", {"run.yaml": GOOD_YAML.replace("max_steps: 2", "max_steps: two")}),
    ("train-yaml-dict-str", TR, "run.yaml, field 'method'", {"run.yaml": GOOD_YAML + "method: {a: 1}\n"}),
    ("train-cli-nan-lr", TR + " --learning_rate nan", "'learning_rate'", {"run.yaml": GOOD_YAML}),
    ("train-cli-inf-lr", TR + " --learning_rate inf", "'learning_rate'", {"run.yaml": GOOD_YAML}),
    ("train-cli-neg-lr", TR + " --learning_rate -1", "'learning_rate'", {"run.yaml": GOOD_YAML}),
    ("train-cli-lora-dropout", TR + " --lora_dropout 1.5", "'lora_dropout'", {"run.yaml": GOOD_YAML}),
    ("train-cli-grad-acc0", TR + " --gradient_accumulation_steps 0", "'gradient_accumulation_steps'",
     {"run.yaml": GOOD_YAML}),
    ("train-yaml-latin1", TR, "run.yaml: not valid UTF-8", {"run.yaml": GOOD_YAML.encode() + b"# caf\xe9\n"}),
    ("train-yaml-list", TR, "run.yaml", {"run.yaml": "- a\n- b\n"}),
    # -- generate
    ("generate-temp-neg", GE + " --temperature -1", "--temperature", {}),
    ("generate-top-p0", GE + " --top-p 0", "--top-p", {}),
    ("generate-latin1", GE.replace("prompts.jsonl", "latin1.jsonl"), "latin1.jsonl: not valid UTF-8", {}),
    ("generate-empty", GE.replace("prompts.jsonl", "empty.jsonl"), "empty.jsonl: empty file", {}),
    ("generate-pickle", GE.replace("{model}", "{pickle}"), "pytorch_model.bin", {}),
    # -- eval
    ("eval-bootstrap0", EV + " --bootstrap 0", "--bootstrap", {}),
    ("eval-bootstrap-neg", EV + " --bootstrap -5", "--bootstrap", {}),
    ("eval-batch0", EV + " --batch-size 0", "--batch-size", {}),
    ("eval-outputs-empty", EV.replace("outputs.jsonl", "empty.jsonl"), "empty.jsonl: empty outputs file", {}),
    ("eval-baseline-empty", EV.replace("baseline.jsonl", "empty.jsonl"), "empty.jsonl: empty outputs file", {}),
    ("eval-outputs-latin1", EV.replace("outputs.jsonl", "latin1_outputs.jsonl"), "latin1_outputs.jsonl: not valid UTF-8", {}),
    ("eval-questions-latin1", EV.replace("outputs.jsonl", "answers.jsonl") + " --questions {t}/latin1_questions.jsonl",
     "latin1_questions.jsonl: not valid UTF-8", {}),
    ("eval-lc-gamed-latin1", EV + " --lc-gamed {t}/gamed.csv", "gamed.csv: not valid UTF-8",
     {"gamed.csv": b"index,preference,std_delta_len,instruction_difficulty,not_gamed_baseline\n0,0.5,0,1,caf\xe9\n"}),
    ("eval-judge-pickle", EV.replace("--reward-fn {t}/fn.py:f", "--judge {pickle_rm}"), "pytorch_model.bin", {}),
    ("eval-report-is-dir", EV.replace("{t}/report.json", "{t}/adir"), "adir", {"adir/keep": "x"}),
    # -- pipeline
    ("pipeline-latin1", PI, "pipe.yaml: not valid UTF-8", {"pipe.yaml": PIPE_YAML.encode() + b"# \xe9\n"}),
    ("pipeline-list", PI, "pipe.yaml", {"pipe.yaml": "- a\n"}),
    ("pipeline-duplicate", PI, "two stages named 'generate:a'",
     {"pipe.yaml": PIPE_YAML + "generate:\n  - {name: a, model: reference, prompts: {t}/prompts.jsonl}\n"
                     "  - {name: a, model: reference, prompts: {t}/prompts.jsonl}\n"}),
    ("pipeline-launcher", PI, "no-such-launcher",
     {"pipe.yaml": PIPE_YAML + "sample: {n: 2, prompts: {t}/prompts.jsonl, launch: no-such-launcher --x}\n"}),
    ("pipeline-stage-value", PI, "pipe.yaml, field 'sample.n'", {"pipe.yaml": PIPE_YAML + "sample: {n: 1, prompts: {t}/prompts.jsonl}\n"}),
    ("pipeline-stage-nan", PI, "pipe.yaml, field 'sample.temperature'", {"pipe.yaml": PIPE_YAML + "sample: {temperature: .nan, prompts: {t}/prompts.jsonl}\n"}),
    # -- show
    ("show-missing", SH, "ann", {}),
    ("show-index-neg", SH + " --index -1", "--index", {}),
    ("show-worst0", SH + " --worst 0", "--worst", {}),
    ("show-top-neg", SH + " --top -1", "--top", {}),
    # -- demo
    ("demo-seeds0", DE + " --seeds 0", "--seeds", {}),
    ("demo-train-prompts0", DE + " --train-prompts 0", "--train-prompts", {}),
    ("demo-eval-prompts0", DE + " --eval-prompts 0", "--eval-prompts", {}),
    ("demo-lrs-nan", DE + " --lrs 1e-3,nan", "--lrs", {}),
    ("demo-temp-neg", DE + " --temperature -1", "--temperature", {}),
    ("demo-threads0", DE + " --threads 0", "--threads", {}),
    # -- toy
    ("toy-build-steps0", TB + " --steps 0", "--steps", {}),
    ("toy-build-lr-nan", TB + " --lr nan", "--lr", {}),
    ("toy-check-prompts0", TC + " --prompts 0", "--prompts", {}),
    ("toy-check-pickle", TC + " --model {pickle}", "pytorch_model.bin", {}),
    # -- probe
    ("probe-n-pairs0", PR + " --n-pairs 0", "n-pairs", {}),
    ("probe-min-auroc", PR + " --min-auroc 2", "min-auroc", {}),
    ("probe-dpo-without-model", PR + " --source dpo", "dpo-model", {}),
    ("probe-missing-dataset", PR.replace("pairs.jsonl", "missing.jsonl"), "missing.jsonl", {}),
    ("probe-latin1", PR.replace("pairs.jsonl", "latin1.jsonl"), "latin1.jsonl: not valid UTF-8", {}),
    ("probe-no-usable-pair", PR + " --strategies number", "no usable pair", {}),
    ("probe-pickle", PR.replace("{model}", "{pickle}"), "pytorch_model.bin", {}),
    # -- model
    ("model-get-unknown", "model get nosuchmodel", "nosuchmodel", {}),
    ("model-path-unknown", "model path nosuch", "nosuch", {}),
    ("model-convert-missing", "model convert-gguf {t}/missing.gguf {t}/conv", "missing.gguf", {}),
    ("model-convert-onto-file", "model convert-gguf {t}/gguf/m.gguf {t}/not_a_dir", "not_a_dir", {"gguf/m.gguf": "GGUF"}),
    ("annotate-gguf-dir", AN.replace("{model}", "{t}/gguf"), "convert-gguf", {"gguf/m.gguf": "GGUF"}),
    ("sample-gguf-file", S.replace("{model}", "{t}/gguf/m.gguf"), "convert-gguf", {"gguf/m.gguf": "GGUF"}),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny safetensors model and a copy whose only weights are a pickle (pytorch_model.bin)."""
    import torch
    from tiny import save_tiny_model
    from transformers import AutoModelForCausalLM
    good = tmp_path_factory.mktemp("model")
    save_tiny_model(good, "chatml")
    pickle_dir = tmp_path_factory.mktemp("pickle-model")
    for f in good.iterdir():
        if not f.name.endswith(".safetensors"):
            (pickle_dir / f.name).write_bytes(f.read_bytes())
    torch.save(AutoModelForCausalLM.from_pretrained(good).state_dict(), pickle_dir / "pytorch_model.bin")
    pickle_rm = tmp_path_factory.mktemp("pickle-reward-model")  # a reward model's config, pickle weights
    for f in pickle_dir.iterdir():
        (pickle_rm / f.name).write_bytes(f.read_bytes())
    config = json.loads((pickle_rm / "config.json").read_text())
    config.update(architectures=["LlamaForSequenceClassification"], num_labels=1)
    (pickle_rm / "config.json").write_text(json.dumps(config))
    return {"model": str(good), "pickle": str(pickle_dir), "pickle_rm": str(pickle_rm)}


def fill(text: str, t: Path, models: dict) -> str:
    for key, value in {"t": str(t), **models}.items():
        text = text.replace("{" + key + "}", value)
    return text


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def run_case(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("case_id, template, named, extra", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case_id, template, named, extra, tmp_path, models, capsys):
    t = tmp_path / "w"
    for name, content in {**files(t), **extra}.items():
        p = t / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else fill(content, t, models).encode())
    argv = fill(template, t, models).split()
    before = snapshot(t)
    rc, err = run_case(argv, capsys)
    lines = [line for line in err.splitlines() if line.startswith(f"treg {argv[0]}: error:")]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert fill(named, t, models) in lines[0], lines[0]
    assert "Traceback" not in err
    assert snapshot(t) == before  # nothing written, the pre-existing outputs byte-identical


def test_corpus_size_and_coverage():
    commands = {c[1].split()[0] for c in CASES}
    assert len(CASES) >= 60
    from treg.cli import COMMANDS
    assert commands == set(COMMANDS)


# ----------------------------------------------------------------------------- OS faults
# (a real read-only output directory, for eval, sample, annotate and train: tests/test_faults.py)

def test_file_size_limit_during_the_final_write(tmp_path):
    """RLIMIT_FSIZE reached while writing the report: one line naming the cause, no temp file left."""
    for name, content in files(tmp_path).items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    before = snapshot(tmp_path)
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64)); "
            "from treg.cli import main; sys.exit(main(sys.argv[1:]))")
    argv = fill(EV, tmp_path, {}).split() + ["--bootstrap", "50"]
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("treg eval: error:")]
    assert len(lines) == 1 and "file too large" in lines[0] and "Traceback" not in proc.stderr
    assert snapshot(tmp_path) == before

