"""Faults (issue 13), each ending in one ``treg <cmd>: error:`` line or a rerun identical to an uninterrupted
run:

* a file-size limit (RLIMIT_FSIZE) reached by the settings, a shard or the final write of sample/score (a
  subprocess: the limit is per process), and at the final write of annotate, generate (outputs or meta)
  and show (in-process, the limit set only while that write runs); eval's is in tests/test_bad_inputs.py,
  train's in tests/test_train_cli.py;
* ``kill -9`` of score mid-run and of train after a checkpoint, then the rerun (annotate's and sample's are in
  tests/test_annotate.py and tests/test_sample.py);
* ``--overwrite`` killed mid-way or failing: the old output stays byte-identical;
* a real read-only output directory (eval, sample, annotate, train)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from test_bad_inputs import EV, GE, S, SC, files, fill, models, snapshot  # noqa: E402,F401  (models: the fixture)


@pytest.mark.parametrize("command, limit", [("score", 64), ("score", 1000), ("score", 1600), ("sample", 64),
                                            ("sample", 1600)])
def test_file_size_limit_in_sharded_stages(tmp_path, models, command, limit):
    """RLIMIT_FSIZE hit by a shard, settings or final write of sample/score: one line, exit 2, no temp
    file or directory left (finished shards may stay: they are the resumable part of the run)."""
    for name, content in files(tmp_path).items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (%d, %d)); "
            "from treg.cli import main; sys.exit(main(sys.argv[1:]))" % (limit, limit))
    argv = fill({"score": SC, "sample": S + " --max-new-tokens 4 --n 2"}[command], tmp_path, models).split()
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith(f"treg {command}: error:")]
    assert len(lines) == 1 and "file too large" in lines[0] and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


def test_score_rerun_after_fixing_a_failing_reward_function(tmp_path, capsys):
    """The reward function raised on the first rows; after fixing it the same command simply runs."""
    from treg.cli import main
    for name, content in files(tmp_path).items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    (tmp_path / "fn.py").write_text("def f(prompt, output):\n    raise ValueError('broken')\n")
    argv = fill(SC, tmp_path, {}).split()
    assert main(argv) == 2
    assert "the reward function raised ValueError: broken" in capsys.readouterr().err
    (tmp_path / "fn.py").write_text("def f(prompt, output):\n    return float(len(output))\n")
    assert main(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "pairs" / "treg_meta.json").is_file()


# ----------------------------------------------------------------------------- helpers of the fault tests

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
MAIN = "\nfrom treg.cli import main\nsys.exit(main(sys.argv[1:]))\n"
SLOW_SHARDS = """
import sys, time
import treg.io.shards
_write = treg.io.shards.ShardedWriter.write
def slow_write(self, i, rows):  # widen the window between shards so that the kill lands mid-run
    _write(self, i, rows)
    time.sleep(0.3)
treg.io.shards.ShardedWriter.write = slow_write
"""


def kill_when(argv: list[str], ready, log: Path, prelude: str = SLOW_SHARDS, timeout: float = 300) -> None:
    """Run ``treg argv`` in a subprocess (``prelude`` first) and ``kill -9`` it as soon as ``ready()``."""
    import signal
    import time
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", prelude + MAIN, *argv], env=ENV, stdout=subprocess.DEVNULL,
                                stderr=err)
        try:
            deadline = time.monotonic() + timeout  # generous: a loaded machine imports slowly
            while not ready():
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "the kill point was not reached"
                time.sleep(0.02)
            assert proc.poll() is None, log.read_text()[-3000:]
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def table(path: Path) -> list[dict]:
    import datasets
    return datasets.load_from_disk(str(path)).to_list()


def leftovers(root: Path) -> list[Path]:
    """Temporary files or directories of a failed write (atomic_file / atomic_directory / train's save)."""
    return [p for p in root.rglob("*") if ".tmp-" in p.name or ".old-" in p.name or p.name == ".final-tmp"]


def one_error_line(command: str, err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith(f"treg {command}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def score_inputs(t: Path, n: int = 8) -> Path:
    """``n`` prompts with three responses of distinct lengths, a length reward function, its opposite and
    one that raises."""
    import json
    t.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": f"Q{i}?", "responses": ["a" * (i % 3 + 1), "bb" * (i + 2), "c" * (2 * i + 7)]} for i in range(n)]
    (t / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (t / "fn.py").write_text("def f(prompt, output):\n    return float(len(output))\n")
    (t / "neg.py").write_text("def f(prompt, output):\n    return -float(len(output)) + 0.5 * (output[0] == 'a')\n")
    (t / "bad.py").write_text("def f(prompt, output):\n    raise ValueError('broken')\n")
    return t


def score_argv(t: Path, out: Path, fn: str = "fn.py", *extra: str) -> list[str]:
    return ["score", "--samples", str(t / "samples.jsonl"), "--reward-fn", f"{t / fn}:f", "--output", str(out),
            "--shard-size", "1", "--no-progress", *extra]


# ----------------------------------------------------------------------------- SIGKILL, then rerun

def shard_indices(shard_dir: Path) -> set[int]:
    return {int(p.stem.split("-")[1]) for p in shard_dir.glob("shard-*.parquet")}


@pytest.fixture
def written(monkeypatch) -> list[int]:
    """The shard indices this process writes from now on (to see that a rerun resumes)."""
    from treg.io.shards import ShardedWriter
    done, real = [], ShardedWriter.write
    monkeypatch.setattr(ShardedWriter, "write", lambda self, i, rows: (done.append(i), real(self, i, rows))[1])
    return done


SLOW_FINAL = """
import sys, time
import datasets
_save = datasets.Dataset.save_to_disk
def slow_save(self, path, *args, **kwargs):  # the final dataset is in its temporary directory: wait there
    _save(self, path, *args, **kwargs)
    time.sleep(30)
datasets.Dataset.save_to_disk = slow_save
"""


@pytest.mark.parametrize("point", ["after a shard", "in the final write"])
def test_sigkill_score_mid_run_then_rerun_is_identical(tmp_path, written, point):
    """A real ``kill -9`` of ``treg score`` once a shard is on disk, or while the final dataset is being
    written; the rerun resumes (writes only the missing shards) and equals an uninterrupted run."""
    from treg.cli import main
    t = score_inputs(tmp_path / "in")
    out = tmp_path / "killed"
    if point == "after a shard":
        kill_when(score_argv(t, out), lambda: any((out / ".shards").glob("shard-*.parquet")), tmp_path / "err.txt")
    else:
        kill_when(score_argv(t, out), lambda: any(tmp_path.glob(".killed.tmp-*/state.json")), tmp_path / "err.txt",
                  prelude=SLOW_FINAL)
        assert list(tmp_path.glob(".killed.tmp-*"))  # killed with the temporary final directory in place
    kept = shard_indices(out / ".shards")
    assert 1 <= len(kept) <= 8 and not (out / "treg_meta.json").exists()  # it really died mid-run
    assert main(score_argv(t, out)) == 0
    assert not kept & set(written) and kept | set(written) == set(range(8))
    assert main(score_argv(t, tmp_path / "full")) == 0
    assert table(out) == table(tmp_path / "full") and len(table(out)) == 8
    assert not (out / ".shards").exists() and not leftovers(tmp_path)


SLOW_CHECKPOINT = """
import sys, time, pathlib
from treg.stages.trainer import TRegTrainer
SAY = pathlib.Path(sys.argv.pop())  # where to say it
_save = TRegTrainer._save_checkpoint
def slow_save(self, model, trial):  # say when a checkpoint is complete, then wait to be killed
    _save(self, model, trial)
    SAY.joinpath("saved-%d" % self.state.global_step).write_text("")
    time.sleep(30)
TRegTrainer._save_checkpoint = slow_save
"""


@pytest.fixture(scope="module")
def train_inputs(tmp_path_factory):
    """A tiny llama3-style model and 8 annotated pairs for it."""
    from test_data import write_pairs
    from tiny import save_tiny_model
    from transformers import AutoTokenizer
    root = tmp_path_factory.mktemp("train")
    save_tiny_model(root / "model", "llama3")
    write_pairs(root / "ann", AutoTokenizer.from_pretrained(root / "model"), n=8)
    return root


def train_yaml(t: Path, inputs: Path, out: Path, **extra) -> str:
    lines = [f"model_name_or_path: {inputs / 'model'}", f"dataset_path: {inputs / 'ann'}", f"output_dir: {out}",
             "max_steps: 4", "per_device_train_batch_size: 2", "use_cpu: true", "save_strategy: steps",
             "save_steps: 2", "disable_tqdm: true", "alpha: 0.25", "seed: 5", "dtype: float32"]
    lines += [f"{k}: {v}" for k, v in extra.items()]
    path = t / f"{out.name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_sigkill_train_after_a_checkpoint_then_resume_gives_the_same_weights(tmp_path, train_inputs, capsys):
    """``kill -9`` of ``treg train`` once checkpoint-2 of 4 steps is complete; rerun with
    --resume_from_checkpoint -> the same final weights as an uninterrupted run, and the summary line
    describes the whole run (its mean loss over steps 1-4 equals the uninterrupted run's)."""
    import re

    import torch
    from safetensors.torch import load_file
    from treg.cli import main
    out = tmp_path / "killed"
    argv = ["train", "--config", train_yaml(tmp_path, train_inputs, out)]
    kill_when(argv + [str(tmp_path)], lambda: (tmp_path / "saved-2").exists(), tmp_path / "err.txt",
              prelude=SLOW_CHECKPOINT)
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-4").exists()
    assert not (out / "model.safetensors").exists()  # killed before the end
    capsys.readouterr()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed process (OMP_NUM_THREADS=1): the same summation order
    try:
        assert main(argv + ["--resume_from_checkpoint", str(out / "checkpoint-2")]) == 0
        resumed_line = capsys.readouterr().out.strip().splitlines()[-1]
        assert main(["train", "--config", train_yaml(tmp_path, train_inputs, tmp_path / "straight")]) == 0
        straight_line = capsys.readouterr().out.strip().splitlines()[-1]
    finally:
        torch.set_num_threads(threads)
    assert "4 steps on 8 pairs" in resumed_line and "resumed at step 2" in resumed_line, resumed_line
    whole = re.search(r"mean loss ([\d.]+) over steps 1-4", resumed_line)
    straight = re.search(r"4 steps on 8 pairs .* mean loss ([\d.]+),", straight_line)
    assert whole and straight, (resumed_line, straight_line)
    assert abs(float(whole.group(1)) - float(straight.group(1))) < 1e-3, (resumed_line, straight_line)
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "straight" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == torch.float32
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0, msg=name)
    start = load_file(train_inputs / "model" / "model.safetensors")
    assert any(not torch.allclose(a[k], start[k]) for k in a)  # the weights did train
    assert not leftovers(tmp_path)


# ----------------------------------------------------------------------------- --overwrite keeps the old output

def test_overwrite_killed_or_failing_keeps_the_old_output(tmp_path, capsys, written):
    """``treg score --overwrite`` with another reward function, SIGKILLed mid-way: the old output is
    byte-identical; the rerun completes and swaps the new one in. A failing --overwrite run (the reward
    function raises) leaves the output untouched too."""
    from treg.cli import main
    t = score_inputs(tmp_path / "in")
    out, staging = tmp_path / "pairs", tmp_path / ".pairs.overwrite"
    assert main(score_argv(t, out)) == 0
    old, old_table = snapshot(out), table(out)
    new_argv = score_argv(t, out, "neg.py", "--overwrite")
    kill_when(new_argv, lambda: any(staging.glob("shard-*.parquet")), tmp_path / "err.txt")
    kept = shard_indices(staging)
    assert snapshot(out) == old and 1 <= len(kept) < 8
    written.clear()
    assert main(new_argv) == 0                                      # resumes the staged run, then swaps
    assert not kept & set(written) and kept | set(written) == set(range(8))
    assert main(score_argv(t, tmp_path / "fresh", "neg.py")) == 0   # the new settings, uninterrupted
    assert table(out) == table(tmp_path / "fresh") != old_table
    assert not staging.exists() and not leftovers(tmp_path)
    capsys.readouterr()
    new = snapshot(out)
    assert main(score_argv(t, out, "bad.py", "--overwrite")) == 2
    assert "the reward function raised ValueError: broken" in one_error_line("score", capsys.readouterr().err)
    assert snapshot(out) == new and not leftovers(tmp_path)


# ----------------------------------------------------------------------------- RLIMIT_FSIZE at the final write

@pytest.fixture
def size_limit(monkeypatch):
    """``size_limit(owner, name, when=...)``: while ``owner.name`` runs (and ``when(*args)`` holds), the
    process's file-size limit (RLIMIT_FSIZE, the soft one) is 64 bytes; Python ignores SIGXFSZ, so a
    write past it fails with EFBIG as in a shell after ``ulimit -f``."""
    import resource

    def install(owner, name, when=lambda *a: True):
        real = getattr(owner, name)

        def limited(*args, **kwargs):
            if not when(*args):
                return real(*args, **kwargs)
            soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (64, hard))
            try:
                return real(*args, **kwargs)
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        monkeypatch.setattr(owner, name, limited)
    return install


AN_ARGV = "annotate --model {model} --dataset {t}/pairs.jsonl --output {t}/ann --no-progress --shard-size 1"


@pytest.fixture(scope="module")
def annotated(tmp_path_factory, models):
    """A finished ``treg annotate`` output of the tiny model (the pre-existing output of the tests)."""
    from treg.cli import main
    t = tmp_path_factory.mktemp("annotated")
    (t / "pairs.jsonl").write_text(files(t)["pairs.jsonl"] * 2)
    assert main(fill(AN_ARGV, t, models).split()) == 0
    return t


def test_file_size_limit_at_annotates_final_write_keeps_the_old_output(tmp_path, models, annotated, size_limit,
                                                                     capsys):
    """--overwrite with another beta, the limit reached while the merged dataset is written: one line, exit
    2, no temp dir, the old output byte-identical; the rerun (no limit) swaps the new output in."""
    import shutil

    from treg.cli import main
    from treg.io.shards import ShardedWriter
    shutil.copytree(annotated, tmp_path, dirs_exist_ok=True)
    old = snapshot(tmp_path / "ann")
    argv = fill(AN_ARGV, tmp_path, models).split() + ["--beta", "0.2", "--overwrite"]
    armed = [True]
    size_limit(ShardedWriter, "_merge", when=lambda *a: armed[0])
    capsys.readouterr()
    assert main(argv) == 2
    line = one_error_line("annotate", capsys.readouterr().err)
    assert "file too large" in line and str(tmp_path) in line, line
    assert snapshot(tmp_path / "ann") == old and not leftovers(tmp_path)
    armed[0] = False
    assert main(argv) == 0 and snapshot(tmp_path / "ann") != old
    assert not (tmp_path / ".ann.overwrite").exists()


@pytest.mark.parametrize("failing", ["out.jsonl", "out.jsonl.treg_meta.json"])
def test_file_size_limit_at_generates_final_writes_keeps_the_old_output(tmp_path, models, size_limit, capsys,
                                                                      failing):
    """The limit reached while writing the outputs file, or its meta file after it: the pre-existing pair
    (outputs + meta) stays byte-identical."""
    from treg.cli import main
    t = tmp_path
    for name, content in files(t).items():
        (t / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    (t / "out.jsonl.treg_meta.json").write_text('{"old": true}\n')
    before = snapshot(t)
    size_limit(Path, "write_text", when=lambda p, *a: p.name.startswith(f".{failing}.tmp-"))
    capsys.readouterr()
    assert main(fill(GE, t, models).split() + ["--max-new-tokens", "4"]) == 2
    line = one_error_line("generate", capsys.readouterr().err)
    assert "file too large" in line and str(t) in line, line
    assert snapshot(t) == before and not leftovers(t)


def test_file_size_limit_at_shows_html_keeps_the_old_page(tmp_path, models, annotated, size_limit, capsys):
    from treg.cli import main
    page = tmp_path / "page.html"
    page.write_text("<p>old</p>\n")
    before = snapshot(tmp_path)
    size_limit(Path, "write_text", when=lambda p, *a: p.name.startswith(".page.html.tmp-"))
    capsys.readouterr()
    assert main(["show", str(annotated / "ann"), "--html", str(page)]) == 2
    line = one_error_line("show", capsys.readouterr().err)
    assert "file too large" in line and str(tmp_path) in line, line
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- a real read-only directory

NO_OVERRIDE = ["--bounding-set", "-dac_override,-dac_read_search,-fowner,-chown"]


def read_only_dir(path: Path) -> list[str]:
    """Make ``path`` a directory this test's subprocesses cannot write, for real; return the command prefix
    that runs them so. An ordinary user: mode 0555. Root ignores modes, and ``nobody`` cannot run this
    Python (it lives under /root, mode 0700), so the directory is given to ``nobody`` (mode 0755) and the
    command runs as root without the capabilities that bypass permission bits (``setpriv``): the kernel then
    refuses the writes as it would any other user's."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        path.chmod(0o555)
        return []
    import shutil
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: no way to make a directory read-only for the command")
    for p in [path, *path.rglob("*")]:
        os.chown(p, 65534, 65534, follow_symlinks=False)
    probe = subprocess.run([setpriv, *NO_OVERRIDE, sys.executable, "-c", f"open({str(path / 'probe')!r}, 'w')"],
                           capture_output=True, text=True)
    if probe.returncode == 0 or "PermissionError" not in probe.stderr:
        (path / "probe").unlink(missing_ok=True)
        pytest.skip(f"cannot drop root's permission override here (setpriv: {probe.stderr.strip()[-200:]})")
    return [setpriv, *NO_OVERRIDE]


def run_in_read_only(prefix: list[str], argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-c", "import sys" + MAIN, *argv], capture_output=True,
                          text=True, timeout=600, env=ENV)


@pytest.mark.parametrize("command", ["eval", "sample", "annotate", "train", "train-into"])
def test_read_only_output_directory(tmp_path, models, annotated, train_inputs, command):
    """The output (or, with --overwrite, the old output's) directory is read-only: one line naming the path,
    exit 2, no traceback, the directory and a pre-existing output in it byte-identical."""
    import shutil
    t, ro = tmp_path, tmp_path / "ro"
    for name, content in files(t).items():
        (t / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    ro.mkdir()
    (ro / "report.json").write_text("OLD REPORT\n")
    if command == "annotate":  # a finished output; --overwrite with another beta stages beside it
        shutil.copytree(annotated / "ann", ro / "ann")
    argv = {
        "eval": fill(EV, t, models).replace(f"{t}/report.json", f"{ro}/report.json") + " --bootstrap 50",
        "sample": fill(S, t, models).replace(f"{t}/samples", f"{ro}/samples") + " --max-new-tokens 4 --n 2",
        "annotate": fill(AN_ARGV, t, models).replace(f"{t}/ann", f"{ro}/ann") + " --beta 0.2 --overwrite",
        "train": "train --config " + train_yaml(t, train_inputs, ro / "out", max_steps=1, save_strategy="'no'"),
        "train-into": "train --config " + train_yaml(t, train_inputs, ro, max_steps=1, save_strategy="'no'"),
    }[command].split()
    command = command.split("-")[0]
    prefix = read_only_dir(ro)
    before = snapshot(ro)
    proc = run_in_read_only(prefix, argv)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(command, proc.stderr)
    assert f"error: {ro}" in line and line.endswith("Permission denied"), line
    if command == "eval":  # the report, not the temporary name it would have been written under
        assert line == f"treg eval: error: {ro}/report.json: Permission denied"
    if command == "train":  # refused before the training, not after it
        assert "train_runtime" not in proc.stdout + proc.stderr, proc.stdout[-2000:]
    assert snapshot(ro) == before and not leftovers(t)
