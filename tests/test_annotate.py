"""treg annotate: exact token rewards / reference log-probs, resume, refusal, bad input, 2 processes."""
import json
import os
import socket
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from tiny import tiny_llama, tiny_tokenizer  # noqa: E402

from treg.stages.annotate import AnnotateConfig, annotate, annotate_to_disk  # noqa: E402
from treg.io.chat import ChatFormat, messages_to_text, preference_rows  # noqa: E402
from treg.cli import main as cli  # noqa: E402
from treg.io.data import load_annotated  # noqa: E402
from treg.errors import TregError  # noqa: E402
from treg.method.templates import load_template, render  # noqa: E402

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Add 2 and 3"}]
ROWS = [
    {"prompt": "How can I help you today?", "chosen": " Sure, here is a concise answer.", "rejected": "\nNo."},
    {"prompt": CONV, "chosen": [{"role": "assistant", "content": "5"}],
     "rejected": [{"role": "assistant", "content": "It is 2025-11-27 and the lazy dog jumps."}]},
    {"prompt": "def add(a, b):", "chosen": "    return a + b\n", "rejected": "ing merges café 🙂"},
    {"prompt": "Numbers?", "chosen": "12345", "rejected": "3.14159 or 2025"},
    {"prompt": "Fox?", "chosen": "The quick brown fox.", "rejected": "The lazy dog."},
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer("llama3")


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(len(tok))


def _naive(model, ctx, resp):
    """One unbatched forward with full logits: log p(resp_t | ctx, resp_<t)."""
    ids = torch.tensor([ctx + resp])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    pos = torch.arange(len(ctx) - 1, len(ctx) + len(resp) - 1)
    return logp[pos, torch.tensor(resp)].numpy()


@pytest.mark.parametrize("mode", ["revision", "instruction"])
def test_matches_direct_unbatched_computation(tok, model, mode):
    ds = annotate(model, tok, ROWS, template=mode, batch_tokens=300, progress=False)  # several padded batches
    fmt, tmpl = ChatFormat(tok), load_template(mode)
    for row, out in zip(preference_rows(ROWS), ds):
        assert out["prompt_input_ids"] == fmt.context_ids(row.prompt)
        for side in ("chosen", "rejected"):
            text = getattr(row, side)
            resp = fmt.response_ids(text)
            assert out[f"{side}_input_ids"] == resp and resp[-1] == tok.convert_tokens_to_ids("<|eot_id|>")
            better, worse = render(tmpl, query=messages_to_text(row.prompt), draft=text)
            lb, lw = (_naive(model, fmt.context_ids(m), resp) for m in (better, worse))
            ref = _naive(model, fmt.context_ids(row.prompt), resp)
            r_hat = 1 / (1 + np.exp(-(lb - lw))) - 0.5  # METHOD.md §1
            np.testing.assert_allclose(out[f"{side}_token_rewards"], r_hat, atol=1e-5, rtol=0)
            np.testing.assert_allclose(out[f"ref_{side}_token_logps"], ref, atol=1e-5, rtol=0)
            assert abs(out[f"ref_{side}_logps"] - ref.sum()) < 1e-4
            assert np.abs(r_hat).max() > 1e-5  # better/worse prompts really differ
    if mode == "revision":  # the draft is in the context: chosen and rejected contexts differ
        assert out["chosen_text"] in tok.decode(fmt.context_ids(render(tmpl, query="q", draft=out["chosen_text"])[0]))


def test_dpo_and_sft_sources(tok, model):
    dpo = tiny_llama(len(tok), seed=1)
    ds = annotate(model, tok, ROWS[:2], source="dpo", dpo_model=dpo, beta=0.5, progress=False)
    fmt = ChatFormat(tok)
    for row, out in zip(preference_rows(ROWS[:2]), ds):
        ctx, resp = fmt.context_ids(row.prompt), fmt.response_ids(row.rejected)
        want = 1 / (1 + np.exp(-0.5 * (_naive(dpo, ctx, resp) - _naive(model, ctx, resp)))) - 0.5
        np.testing.assert_allclose(out["rejected_token_rewards"], want, atol=1e-5, rtol=0)
    sft = annotate(model, tok, ROWS[:2], source="sft-chosen", progress=False)
    assert all(v == 0.5 for r in sft["chosen_token_rewards"] for v in r)
    assert all(v == 0.0 for r in sft["rejected_token_rewards"] for v in r)
    np.testing.assert_allclose(sft["ref_chosen_logps"], ds["ref_chosen_logps"], atol=1e-4)
    with pytest.raises(TregError, match="dpo-model"):
        annotate(model, tok, ROWS[:1], source="dpo", progress=False)


def test_stored_reference_sums_the_tokens_the_trainer_scores(tok, model, tmp_path):
    """annotate's ref_*_logps cover exactly the response tokens the trainer's policy sums (end-of-turn
    included): the trainer's own reference pass gives the same numbers, and with the annotated columns
    the untrained policy has zero implicit rewards (policy == reference)."""
    import copy
    from treg.stages.config import TRegConfig
    from treg.stages.trainer import TRegTrainer
    ds = annotate(model, tok, ROWS, progress=False)
    stored = [c for c in ds.column_names if c.startswith("ref_")]
    args = TRegConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", alpha=0.25, disable_tqdm=True,
                      per_device_eval_batch_size=5)
    trainer = TRegTrainer(copy.deepcopy(model), args=args, train_dataset=ds.remove_columns(stored),
                          processing_class=tok)
    for col in stored:
        got, want = trainer.train_dataset[col], ds[col]
        if col.endswith("token_logps"):
            got, want = [v for r in got for v in r], [v for r in want for v in r]
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5, err_msg=col)
    metrics = trainer.evaluate(eval_dataset=ds)  # the annotated reference columns as they are
    assert abs(metrics["eval_rewards/chosen"]) < 1e-5 and abs(metrics["eval_rewards/rejected"]) < 1e-5
    assert metrics["eval_logps/chosen"] == pytest.approx(np.mean(ds["ref_chosen_logps"]), rel=1e-5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_non_finite_reward_names_the_row(tok):
    broken = tiny_llama(len(tok))
    with torch.no_grad():
        broken.lm_head.weight[5:9] = float("nan")
    with pytest.raises(TregError, match="non-finite") as info:
        annotate(broken, tok, ROWS[:2], progress=False)
    assert info.value.row == 1 and info.value.field == "chosen_token_rewards"


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tok, model):
    root = tmp_path_factory.mktemp("annotate")
    model.save_pretrained(root / "m")
    tok.save_pretrained(root / "m")
    plain = tiny_tokenizer("none")
    model.save_pretrained(root / "m_plain")
    plain.save_pretrained(root / "m_plain")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return root


def _args(root, out, *extra):
    return ["annotate", "--model", str(root / "m"), "--dataset", str(root / "pairs.jsonl"), "--output",
            str(out), "--shard-size", "2", "--no-progress", "--device", "cpu", *extra]


def _table(path):
    return datasets.load_from_disk(str(path)).to_list()


def test_cli_resume_after_crash_and_refusal(saved, tok, tmp_path, capsys):
    full = tmp_path / "full"
    assert cli(_args(saved, full)) == 0
    ann = load_annotated(full, tok)  # the docs/data.md contract holds
    assert ann.meta["stage"] == "annotate" and ann.meta["num_pairs"] == 5 and "more helpful" in ann.meta["template"]
    # CLI == Python API, bit for bit when chunked like the CLI's shards (which sequences share a
    # forward, and whether contexts are shared, is decided per chunk)
    want = annotate(tiny_llama(len(tok)), tok, ROWS, progress=False, chunk_pairs=2).to_list()
    assert _table(full) == want

    # crash after two shards, then rerun with the same arguments: identical dataset
    from treg.stages.annotate import default_batch_tokens, make_config
    assert default_batch_tokens("cpu") == 2048  # what the CLI uses on CPU without --batch-tokens
    cfg = make_config(template="revision", source="contrastive", beta=0.1, max_length=None, batch_tokens=2048,
                      use_chat_template=True, dpo_model=None)
    assert isinstance(cfg, AnnotateConfig)
    crashed, seen = tmp_path / "crashed", []

    def boom(i):
        seen.append(i)
        if len(seen) == 2:
            raise KeyboardInterrupt("simulated kill")
    info = {"model": str(saved / "m"), "dpo_model": None, "dtype": "float32",
            "dataset": str(saved / "pairs.jsonl"), "split": "train"}
    with pytest.raises(KeyboardInterrupt):
        annotate_to_disk(tiny_llama(len(tok)), tok, preference_rows(ROWS), crashed, cfg=cfg, shard_size=2,
                         run_info=info, on_shard=boom, progress=False)
    assert sorted(os.listdir(crashed / ".shards")) == ["settings.json", "shard-00000.parquet", "shard-00001.parquet"]
    assert not (crashed / "treg_meta.json").exists()
    assert cli(_args(saved, crashed)) == 0  # CLI resumes the API's run: same settings fingerprint
    assert _table(crashed) == _table(full)
    assert cli(_args(saved, crashed)) == 0 and "annotated 5 pairs" in capsys.readouterr().out  # complete: no-op

    # different settings into the same output: refused (exit 2, one line), untouched
    before = _table(full)
    assert cli(_args(saved, full, "--template", "instruction")) == 2
    err = capsys.readouterr().err.strip()
    assert "--overwrite" in err and len(err.splitlines()) == 1
    assert _table(full) == before
    assert cli(_args(saved, full, "--template", "instruction", "--overwrite")) == 0
    assert _table(full) != before


SLOW_WRITER = """
import sys, time
import treg.io.shards
_write = treg.io.shards.ShardedWriter.write
def slow_write(self, i, rows):  # widen the window between shards so the kill lands mid-run
    _write(self, i, rows)
    time.sleep(0.3)
treg.io.shards.ShardedWriter.write = slow_write
from treg.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_mid_run_then_rerun_gives_the_identical_dataset(saved, tmp_path):
    """A real `kill -9` of a running `treg annotate` process (one shard per pair), as soon as a shard file
    exists; the rerun with the same arguments resumes and equals an uninterrupted run."""
    import signal
    import time
    full, killed = tmp_path / "full", tmp_path / "killed"
    script = tmp_path / "slow_annotate.py"
    script.write_text(SLOW_WRITER)
    argv = _args(saved, killed)
    argv[argv.index("--shard-size") + 1] = "1"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, str(script), *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not list((killed / ".shards").glob("shard-*.parquet")) and proc.poll() is None:
            assert time.monotonic() < deadline, "no shard written within 60 s"
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert not (killed / "treg_meta.json").exists()  # it really died mid-run
    assert 1 <= len(list((killed / ".shards").glob("shard-*.parquet"))) < 5
    assert cli(argv) == 0                                                     # resume
    full_argv = _args(saved, full)
    full_argv[full_argv.index("--shard-size") + 1] = "1"
    assert cli(full_argv) == 0                                                # uninterrupted
    assert _table(killed) == _table(full)
    assert not (killed / ".shards").exists() and not list(tmp_path.glob(".killed.*"))


BAD_ROWS = {
    "malformed": ('{"prompt": "q", "chosen": "a"', 2, None),
    "missing": ({"prompt": "q", "chosen": "a"}, 2, "rejected"),
    "empty": ({"prompt": "q", "chosen": "", "rejected": "b"}, 2, "chosen"),
    "last-turn": ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, 2, "chosen"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS) + ["template", "no-chat-template", "flag", "too-long", "device"])
def test_bad_input_one_line_exit_2_nothing_written(saved, tmp_path, capsys, case):
    out = tmp_path / "out"
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(ROWS[0]) + "\n")
    argv = _args(saved, out)
    argv[argv.index("--dataset") + 1] = str(data)
    if case in BAD_ROWS:
        bad, row, field = BAD_ROWS[case]
        with open(data, "a") as fh:
            fh.write((bad if isinstance(bad, str) else json.dumps(bad)) + "\n")
        expect = [str(data), f"row {row}"] + ([f"field '{field}'"] if field else [])
    elif case == "template":
        tmpl = tmp_path / "t.yaml"
        tmpl.write_text("mode: instruction\nbetter: [{role: user, content: '{query} {qury}'}]\n"
                        "worse: [{role: user, content: '{query}'}]\n")
        argv += ["--template", str(tmpl)]
        expect = [str(tmpl), "{qury}"]
    elif case == "flag":  # a misspelled option: one line, not argparse's usage dump
        argv += ["--max-lenght", "5"]
        expect = ["unrecognized arguments: --max-lenght"]
    elif case == "too-long":  # every pair skipped: refuse instead of writing an empty dataset
        argv += ["--max-length", "5"]
        expect = [str(data), "field 'max-length'", "nothing written"]
    elif case == "device":
        argv[argv.index("--device") + 1] = "cpux"
        expect = ["field 'device'", "cpux"]
    else:
        argv[argv.index("--model") + 1] = str(saved / "m_plain")
        expect = ["no-chat-template", "m_plain"]
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(e in err for e in expect), err
    assert not out.exists()
    if case == "no-chat-template":
        assert cli(argv + ["--no-chat-template"]) == 0
        assert len(_table(out)) == 1


@pytest.mark.slow
def test_accelerate_two_processes_equal_one(saved, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli(_args(saved, one)) == 0
    # accelerate 1.15: `--cpu --num_processes 2` starts ONE process (its CPU multi-process mode needs MPI),
    # which made this test compare one process with one process. `--multi_gpu` + `--device cpu` starts two
    # torch.distributed workers on CPU (gloo); the summary line says how many processes took part.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                           "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", str(port), "-m", "treg", *_args(saved, two)],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("annotated 5 pairs")]
    assert len(lines) == 1 and "on 2 processes" in lines[0]  # two ranks; only rank 0 merges and reports
    assert _table(two) == _table(one)
    assert json.loads((two / "treg_meta.json").read_text())["fingerprint"] == \
        json.loads((one / "treg_meta.json").read_text())["fingerprint"]
