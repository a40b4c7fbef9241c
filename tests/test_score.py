"""treg score: best/worst pairs, ties and margins, reward functions and models, bad input."""

import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from tiny import tiny_tokenizer  # noqa: E402

from treg.cli import main as cli  # noqa: E402

REWARD_SRC = '''
import math
def length(prompt, response):
    return float(len(response))
def raises(prompt, response):
    if response == "boom":
        raise ValueError("cannot score this")
    return 1.0
def nan(prompt, response):
    return math.nan if response == "boom" else 1.0
def string(prompt, response):
    return "1.5" if response == "boom" else 1.0
'''


def _samples(tmp_path, rows, name="samples"):
    import datasets
    from treg.io.meta import save_dataset_atomic
    out = tmp_path / name
    save_dataset_atomic(datasets.Dataset.from_list(rows), out, {"stage": "sample", "fingerprint": name})
    return str(out)


@pytest.fixture
def rfile(tmp_path):
    p = tmp_path / "rewards.py"
    p.write_text(REWARD_SRC)
    return str(p)


def _score(samples, out, spec, *extra):
    return cli(["score", "--samples", samples, "--reward-fn", spec, "--output", str(out), "--no-progress", *extra])


def test_pairs_ties_margins_and_annotate_readable(tmp_path, rfile):
    rows = [{"prompt": "p0", "prompt_id": "a", "responses": ["xx", "xxxx", "x"]},      # best 1, worst 2
            {"prompt": "p1", "prompt_id": "b", "responses": ["yy", "yy"]},             # tie: dropped
            {"prompt": "p2", "prompt_id": "c", "responses": ["zzz", "zz"]},            # margin 1 < 1.5
            {"prompt": "p3", "prompt_id": "d", "responses": ["w", "wwwww", "www"]}]    # margin 4
    samples = _samples(tmp_path, rows)
    assert _score(samples, tmp_path / "pairs", f"{rfile}:length", "--min-margin", "1.5") == 0
    import datasets
    pairs = datasets.load_from_disk(str(tmp_path / "pairs")).to_list()
    assert [p["prompt_id"] for p in pairs] == ["a", "d"]
    assert pairs[0]["chosen"] == "xxxx" and pairs[0]["rejected"] == "x"
    assert pairs[0]["score_chosen"] == 4.0 and pairs[0]["score_rejected"] == 1.0
    assert pairs[0]["all_scores"] == [2.0, 4.0, 1.0]
    assert pairs[1]["chosen"] == "wwwww" and pairs[1]["rejected"] == "w"
    meta = json.loads((tmp_path / "pairs" / "treg_meta.json").read_text())
    assert (meta["pairs_kept"], meta["dropped_ties"], meta["dropped_below_margin"]) == (2, 1, 1)
    assert meta["mean_score_chosen"] == 4.5 and meta["stage"] == "score"
    from treg.io.chat import read_preference_rows  # what treg annotate reads
    got = read_preference_rows(str(tmp_path / "pairs"))
    assert [(g.prompt, g.chosen, g.rejected) for g in got] == [
        ([{"role": "user", "content": "p0"}], "xxxx", "x"), ([{"role": "user", "content": "p3"}], "wwwww", "w")]


def test_conversational_pairs_use_trl_message_lists(tmp_path, rfile):
    conv = [{"role": "user", "content": "hi"}]
    samples = _samples(tmp_path, [{"prompt": conv, "prompt_id": "0", "responses": ["a", "abc"]}])
    assert _score(samples, tmp_path / "pairs", f"{rfile}:length") == 0
    from treg.io.chat import read_preference_rows
    (row,) = read_preference_rows(str(tmp_path / "pairs"))
    assert row.prompt == conv and row.chosen == "abc" and row.rejected == "a"


@pytest.mark.parametrize("fn,needle", [("raises", "ValueError: cannot score this"), ("nan", "nan"),
                                       ("string", "'1.5' (str) is not a number")])
def test_reward_fn_failure_names_row_and_writes_nothing(tmp_path, rfile, capsys, fn, needle):
    rows = [{"prompt": f"p{i}", "prompt_id": str(i), "responses": ["ok", "boom" if i == 2 else "fine"]}
            for i in range(4)]
    samples = _samples(tmp_path, rows)
    code = _score(samples, tmp_path / "pairs", f"{rfile}:{fn}")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert needle in err and "row 3" in err and "responses[1]" in err  # 1-based row of prompt 2
    assert not (tmp_path / "pairs" / "treg_meta.json").exists()


def test_single_response_and_bad_spec(tmp_path, rfile, capsys):
    samples = _samples(tmp_path, [{"prompt": "p", "prompt_id": "0", "responses": ["only"]}])
    assert _score(samples, tmp_path / "o", f"{rfile}:length") == 2
    assert "no pair possible" in capsys.readouterr().err
    samples = _samples(tmp_path, [{"prompt": "p", "prompt_id": "0", "responses": ["a", "b"]}], "s2")
    assert _score(samples, tmp_path / "o2", "no_such_module_xyz:fn") == 2
    assert "cannot import" in capsys.readouterr().err
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_module_xyz\ndef f(p, r):\n    return 1.0\n")
    assert _score(samples, tmp_path / "o2", f"{broken}:f") == 2  # a reward file whose own import fails
    err = capsys.readouterr().err
    assert "cannot import" in err and "no_such_module_xyz" in err and "Traceback" not in err
    assert _score(samples, tmp_path / "o3", f"{rfile}:length", "--min-margn", "1") == 2  # misspelled flag
    err = capsys.readouterr().err
    assert "unrecognized arguments: --min-margn" in err and "usage:" not in err
    assert not any((tmp_path / o).exists() for o in ("o", "o2", "o3"))


# ------------------------------------------------------------------------------ reward models

def _reward_model(path, num_labels=1, causal=False):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification
    import torch
    tok = tiny_tokenizer("llama3")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, num_labels=num_labels,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = (LlamaForCausalLM if causal else LlamaForSequenceClassification)(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_reward_model_batched_equals_direct_and_scores(tmp_path):
    import torch
    from treg.stages.scoring import RewardModelScorer
    rm = _reward_model(tmp_path / "rm")
    scorer = RewardModelScorer(rm, batch_size=3, device="cpu")
    prompts = ["Hello there", "What is a fox?", [{"role": "user", "content": "Say hi"}], "x"]
    responses = ["Sure, here is a concise answer.", "A fox.", "hi", "The quick brown fox jumps over the lazy dog."]
    got = scorer(prompts, responses)

    def check_direct(scores):
        for p, r, g in zip(prompts, responses, scores):
            ids = torch.tensor([scorer.encode(p, r)])
            with torch.no_grad():
                direct = scorer.model(input_ids=ids).logits[0, 0].item()  # one unpadded sequence
            assert abs(direct - g) < 1e-5

    check_direct(got)
    assert len(set(got)) == len(got)
    # pad id = the end-of-turn token every sequence ends with: padded batches still equal single forwards
    scorer.pad_id = scorer.model.config.pad_token_id = scorer.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert all(scorer.encode(p, r)[-1] == scorer.pad_id for p, r in zip(prompts, responses))
    check_direct(scorer(prompts, responses))
    samples = _samples(tmp_path, [{"prompt": p, "prompt_id": str(i), "responses": responses}
                                  for i, p in enumerate(["Hello there", "Say hi"])])
    assert cli(["score", "--samples", samples, "--reward-model", rm, "--output", str(tmp_path / "pairs"),
                "--no-progress"]) == 0
    import datasets
    pairs = datasets.load_from_disk(str(tmp_path / "pairs")).to_list()
    s = pairs[0]["all_scores"]
    assert pairs[0]["chosen"] == responses[s.index(max(s))] and all(math.isfinite(x) for x in s)


def test_reward_model_refusals(tmp_path, capsys):
    samples = _samples(tmp_path, [{"prompt": "p", "prompt_id": "0", "responses": ["a", "b"]}])

    def run(rm, *extra):
        code = cli(["score", "--samples", samples, "--reward-model", rm, "--output", str(tmp_path / "o"),
                    "--no-progress", *extra])
        return code, capsys.readouterr().err

    code, err = run(str(tmp_path / "no" / "such" / "rm"))  # a missing local path: at once, no hub retries
    assert code == 2 and "no such file or directory" in err
    code, err = run(_reward_model(tmp_path / "causal", causal=True))
    assert code == 2 and "no scalar head" in err
    code, err = run(_reward_model(tmp_path / "two", num_labels=2))
    assert code == 2 and "num_labels == 1" in err
    custom = _reward_model(tmp_path / "custom")
    cfg_path = os.path.join(custom, "config.json")
    cfg = json.loads(open(cfg_path).read())
    cfg["auto_map"] = {"AutoModelForSequenceClassification": "modeling_custom.RewardModelWithGating"}
    open(cfg_path, "w").write(json.dumps(cfg))
    code, err = run(custom)
    assert code == 2 and "--trust-remote-code" in err and "custom code" in err
    assert not (tmp_path / "o" / "treg_meta.json").exists()
