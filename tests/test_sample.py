"""treg sample: schema, seeded reproducibility independent of batching/sharding, SIGKILL/resume, bad input."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from tiny import save_tiny_model  # noqa: E402

from treg.cli import main as cli  # noqa: E402

PROMPTS = ["Hello there", "What is a fox?", "Numbers like 12345", "def add(a, b):", "Say hi", "Rewrite the draft"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("policy")
    save_tiny_model(d, "llama3")
    return str(d)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    p.write_text("".join(json.dumps({"prompt": t, "prompt_id": f"p{i}"}) + "\n" for i, t in enumerate(PROMPTS)))
    return str(p)


def _run(model_dir, prompts, out, **kw):
    from treg.stages.sampling import sample
    args = dict(n=3, temperature=1.0, top_p=0.9, max_new_tokens=12, seed=7, progress=False)
    args.update(kw)
    return sample(model_dir, prompts, str(out), **args)


def _rows(out):
    import datasets
    return datasets.load_from_disk(str(out)).to_list()


def test_schema_and_reproducible_across_batch_and_shard_sizes(model_dir, prompts_file, tmp_path):
    meta = _run(model_dir, prompts_file, tmp_path / "a", batch_size=1, shard_size=2)
    _run(model_dir, prompts_file, tmp_path / "b", batch_size=7, shard_size=4)
    a, b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert [r["responses"] for r in a] == [r["responses"] for r in b]
    assert [r["prompt_id"] for r in a] == [f"p{i}" for i in range(len(PROMPTS))]
    assert [r["prompt"] for r in a] == PROMPTS
    for r in a:
        assert len(r["responses"]) == len(r["response_tokens"]) == len(r["finish_reasons"]) == 3
        assert all(isinstance(x, str) for x in r["responses"])
        assert set(r["finish_reasons"]) <= {"stop", "length"}
        assert all(0 <= t <= 12 for t in r["response_tokens"])
    # the N samples of a prompt differ (their seeds do), and another seed gives other samples
    assert any(len(set(r["responses"])) > 1 for r in a)
    _run(model_dir, prompts_file, tmp_path / "c", seed=8)
    assert [r["responses"] for r in _rows(tmp_path / "c")] != [r["responses"] for r in a]
    saved = json.loads((tmp_path / "a" / "treg_meta.json").read_text())
    assert saved["stage"] == "sample" and saved["n"] == 3 and saved["fingerprint"] == meta["fingerprint"]
    assert saved["prompts"] == len(PROMPTS) and "tokenizer_fingerprint" in saved


def test_conversational_prompts(model_dir, tmp_path):
    p = tmp_path / "conv.jsonl"
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    p.write_text(json.dumps({"prompt": conv}) + "\n" + json.dumps({"prompt": conv[1:]}) + "\n")
    _run(model_dir, str(p), tmp_path / "out", n=2)
    rows = _rows(tmp_path / "out")
    assert rows[0]["prompt"] == conv and rows[1]["prompt"] == conv[1:]
    assert [r["prompt_id"] for r in rows] == ["0", "1"]


def test_greedy_is_deterministic_and_batch_independent(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from treg.io.chat import ChatFormat
    from treg.stages.sampling import hf_generate, stop_token_ids
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    chat = ChatFormat(tok)
    ctx = [chat.context_ids([{"role": "user", "content": t}]) for t in PROMPTS]
    kw = dict(stop_ids=stop_token_ids(model, tok, chat), temperature=0, top_p=1.0, max_new_tokens=8)
    one = [hf_generate(model, tok, [c], [0], batch_size=1, **kw)[0] for c in ctx]
    assert hf_generate(model, tok, ctx, [0] * len(ctx), batch_size=6, **kw) == one


@pytest.mark.parametrize("argv,needle", [
    (["--n", "1"], "at least 2"),
    (["--temperature", "0"], "greedy"),
    (["--prompt-column", "question"], "field 'question'"),
    (["--backend", "vllm"], "vllm"),
    (["--max-new-tokns", "3"], "unrecognized arguments: --max-new-tokns"),  # a misspelled flag: one line
    (["--limit", "-1"], "need at least 1 prompt"),  # would silently drop the last prompt
])
def test_bad_arguments(model_dir, prompts_file, tmp_path, capsys, argv, needle):
    out = tmp_path / "o"
    code = cli(["sample", "--model", model_dir, "--prompts", prompts_file, "--output", str(out),
                "--no-progress"] + argv)
    err = capsys.readouterr().err
    if needle == "vllm":
        try:
            import vllm  # noqa: F401
            pytest.skip("vllm installed")
        except ImportError:
            pass
    assert code == 2 and needle in err and "Traceback" not in err and "usage:" not in err
    assert not (out / "treg_meta.json").exists()


def test_prompt_file_without_prompt_column(model_dir, tmp_path, capsys):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"question": "hi"}) + "\n")
    code = cli(["sample", "--model", model_dir, "--prompts", str(p), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "no prompt column" in err and "bad.jsonl" in err and "--prompt-column" in err
    assert not (tmp_path / "o").exists()


def test_sigkill_and_resume_is_identical(model_dir, tmp_path):
    """A real kill: `python -m treg sample` is SIGKILLed once a shard is on disk; the rerun keeps the
    finished shards and the result equals an uninterrupted run."""
    import signal
    import subprocess
    import time
    prompts = tmp_path / "many.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say hi {i}", "prompt_id": f"q{i}"}) + "\n" for i in range(48)))
    kw = dict(n=2, temperature=1.0, top_p=0.9, max_new_tokens=16, seed=3, shard_size=1, batch_size=2,
              progress=False)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "treg", "sample", "--model", model_dir, "--prompts", str(prompts), "--output",
           str(out), "--n", "2", "--temperature", "1.0", "--top-p", "0.9", "--max-new-tokens", "16", "--seed", "3",
           "--shard-size", "1", "--batch-size", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300  # generous: a loaded CI machine imports slowly
        while not list((out / ".shards").glob("shard-*.parquet")):
            assert proc.poll() is None and time.monotonic() < deadline, "no shard appeared"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    kept = sorted(int(f.stem.split("-")[1]) for f in (out / ".shards").glob("shard-*.parquet"))
    assert kept and len(kept) < 48 and not (out / "treg_meta.json").exists()  # killed mid-run
    done = []
    _run(model_dir, str(prompts), out, after_shard=done.append, **kw)
    assert not set(done) & set(kept) and sorted(done + kept) == list(range(48))  # finished shards kept
    _run(model_dir, str(prompts), tmp_path / "full", **kw)
    assert _rows(out) == _rows(tmp_path / "full")
    # different settings into the finished output: refused, the output untouched
    code = cli(["sample", "--model", model_dir, "--prompts", str(prompts), "--output", str(out), "--n", "2",
                "--seed", "99", "--no-progress"])
    assert code == 2 and _rows(out) == _rows(tmp_path / "full")


def test_vllm_backend_wiring_with_a_fake_engine(model_dir, prompts_file, tmp_path, monkeypatch):
    """No vllm here: a stand-in module checks what treg hands vLLM (token-id prompts, one seed per
    response, stop ids, tensor parallelism) and that the output schema equals the hf backend's."""
    import importlib.machinery
    import types
    from treg.stages.sampling import row_seed
    calls = {}

    class LLM:
        def __init__(self, **kw):
            calls["init"] = kw

        def generate(self, prompts, params):
            calls.setdefault("seeds", []).extend(p.seed for p in params)
            stop = params[0].stop_token_ids[0]
            out = types.SimpleNamespace(text="ok", token_ids=[7, 8, stop], finish_reason="stop")
            return [types.SimpleNamespace(outputs=[out]) for _ in prompts]

    fake = types.ModuleType("vllm")
    fake.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    fake.LLM, fake.SamplingParams = LLM, lambda **kw: types.SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    assert cli(["sample", "--model", model_dir, "--prompts", prompts_file, "--output", str(tmp_path / "v"),
                "--n", "2", "--backend", "vllm", "--tensor-parallel-size", "4", "--seed", "5", "--no-progress"]) == 0
    assert calls["init"] == {"model": model_dir, "dtype": "bfloat16", "tensor_parallel_size": 4}
    assert calls["seeds"] == [row_seed(5, f"p{i}", j) for i in range(len(PROMPTS)) for j in range(2)]
    rows = _rows(tmp_path / "v")
    assert rows[0]["responses"] == ["ok", "ok"] and rows[0]["response_tokens"] == [2, 2]
    assert set(rows[0]) == {"prompt", "prompt_id", "responses", "response_tokens", "finish_reasons"}  # as hf
    # the engine's memory and context options are handed through (sample and generate)
    assert cli(["sample", "--model", model_dir, "--prompts", prompts_file, "--output", str(tmp_path / "v2"),
                "--n", "2", "--backend", "vllm", "--gpu-memory-utilization", "0.55", "--max-model-len", "4096",
                "--no-progress"]) == 0
    assert calls["init"] == {"model": model_dir, "dtype": "bfloat16", "tensor_parallel_size": 1,
                             "gpu_memory_utilization": 0.55, "max_model_len": 4096}
    assert cli(["generate", "--model", model_dir, "--prompts", prompts_file, "--output", str(tmp_path / "g.jsonl"),
                "--backend", "vllm", "--tensor-parallel-size", "2", "--gpu-memory-utilization", "0.7",
                "--max-model-len", "2048", "--no-progress"]) == 0
    assert calls["init"] == {"model": model_dir, "dtype": "bfloat16", "tensor_parallel_size": 2,
                             "gpu_memory_utilization": 0.7, "max_model_len": 2048}
    assert cli(["sample", "--model", model_dir, "--prompts", prompts_file, "--output", str(tmp_path / "v3"),
                "--n", "2", "--backend", "vllm", "--gpu-memory-utilization", "1.5", "--no-progress"]) == 2


def test_gumbel_sampler_draws_from_the_top_p_softmax():
    import torch
    from treg.stages.sampling import GumbelSampler, hashed_uniform
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0])
    rows = 40000
    for top_p, expect in [(1.0, logits.softmax(-1)),
                          (0.8, torch.tensor([0.6411, 0.2359, 0, 0, 0]) / 0.8770)]:  # nucleus = 2 tokens
        picks = GumbelSampler(list(range(rows)), 1.0, top_p)(None, logits.repeat(rows, 1)).argmax(-1)
        freq = torch.bincount(picks, minlength=5) / rows
        assert torch.allclose(freq, expect, atol=0.01), (top_p, freq)
    # temperature sharpens: T = 0.5 samples softmax(2 * logits)
    picks = GumbelSampler(list(range(rows)), 0.5, 1.0)(None, logits.repeat(rows, 1)).argmax(-1)
    assert torch.allclose(torch.bincount(picks, minlength=5) / rows, (2 * logits).softmax(-1), atol=0.01)
    # a row's noise depends on its seed and step only
    u = hashed_uniform([5, 6, 7], 3, 50)
    assert torch.equal(hashed_uniform([6], 3, 50)[0], u[1]) and not torch.equal(hashed_uniform([6], 4, 50)[0], u[1])
    assert 0 < float(u.min()) and float(u.max()) < 1


@pytest.mark.slow
def test_two_processes_equal_one(model_dir, prompts_file, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` (on CPU: --cpu alone starts ONE process in accelerate
    1.15): disjoint shards, merged by rank 0 = the one-process result."""
    import subprocess
    rf = tmp_path / "r.py"
    rf.write_text("def reward(prompt, response):\n    return float(len(response))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "treg"]
    sample_args = ["--model", model_dir, "--prompts", prompts_file, "--n", "3", "--max-new-tokens", "10",
                   "--shard-size", "1", "--no-progress"]
    for cmd in (["sample", *sample_args, "--output", str(tmp_path / "s2")],
                ["score", "--samples", str(tmp_path / "s2"), "--reward-fn", f"{rf}:reward", "--shard-size", "1",
                 "--output", str(tmp_path / "p2"), "--no-progress"]):
        res = subprocess.run(launch + cmd, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        assert "on 2 processes" in res.stdout, res.stdout[-2000:]  # really two processes
    assert cli(["sample", *sample_args, "--output", str(tmp_path / "s1")]) == 0
    assert cli(["score", "--samples", str(tmp_path / "s1"), "--reward-fn", f"{rf}:reward", "--shard-size", "1",
                "--output", str(tmp_path / "p1"), "--no-progress"]) == 0
    assert _rows(tmp_path / "s2") == _rows(tmp_path / "s1")
    assert _rows(tmp_path / "p2") == _rows(tmp_path / "p1")
