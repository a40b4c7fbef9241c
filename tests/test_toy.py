"""The toy world: verifier labels, proxy reward, tokenizer, shipped checkpoint, reproducible build."""

import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from treg.toy import credit, world  # noqa: E402
from treg.toy.tokenizer import build_tokenizer  # noqa: E402


# ------------------------------------------------------------------------------- verifier
def test_reference_answers_by_task():
    items = (("a", 3), ("b", 9), ("c", 0))
    assert world.Problem("copy", items).reference == "a 3 b 9 c 0"
    assert world.Problem("inc", items).reference == "a 4 b 0 c 1"
    assert world.Problem("dec", items).reference == "a 2 b 8 c 9"
    assert world.Problem("neg", items).reference == "a 6 b 0 c 9"
    assert world.Problem("rev", items).reference == "c 0 b 9 a 3"
    assert world.parse_query("inc a 3 b 9 c 0") == world.Problem("inc", items)
    for bad in ("", "inc a 3 b", "mul a 3", "inc a x", "inc z 3"):
        with pytest.raises(ValueError):
            world.parse_query(bad)


def test_verifier_labels_hand_written():
    q = "inc a 3 b 9 c 0 d 5 e 1"                       # reference: a 4 b 0 c 1 d 6 e 2
    v = world.verify(q, "a 4 b 0 c 1 d 6 e 2")
    assert v.exact and v.reward == 1.0 and set(v.labels) == {"correct"}
    v = world.verify(q, "a 4 b 7 c 1 d 6 e 2")          # one wrong digit
    assert v.labels == ("correct", "correct", "correct", "incorrect") + ("correct",) * 6
    assert not v.exact and v.reward == pytest.approx(0.8)
    v = world.verify(q, "um a 4 b 0 well so c 1 d 6 e 2")  # concise failure only
    assert v.labels[0] == "filler" and v.labels[5:7] == ("filler", "filler")
    assert v.n_filler == 3 and v.reward == pytest.approx(1 - 3 * world.FILLER_COST) and not v.exact
    v = world.verify(q, "a 4 b 0 c 1 d 6")               # missing item
    assert set(v.labels) == {"correct"} and v.reward == pytest.approx(0.8)
    v = world.verify(q, "a 4 b 0 c 1 d 6 e 2 f 3")       # extra item: incorrect, and dilutes accuracy
    assert v.labels[-2:] == ("incorrect", "incorrect") and v.reward == pytest.approx(5 / 6)
    v = world.verify(q, "a 4 c 1 d 6 e 2")               # skipped key shifts the stream: all wrong after it
    assert v.labels[:2] == ("correct", "correct") and set(v.labels[2:]) == {"incorrect"}
    v = world.verify("rev a 1 b 2", "b 2 a 1 <unk>")
    assert v.labels == ("correct",) * 4 + ("incorrect",)


def test_proxy_reward_sees_only_the_head_and_likes_length(monkeypatch):
    monkeypatch.setattr(world, "PROXY_NOISE", 0.0)
    bonus = world.PROXY_LENGTH_BONUS
    q = "copy a 1 b 2 c 3 d 4 e 5"                      # proxy sees ceil(0.6 * 5) = 3 items = 6 words
    assert world.proxy_reward(q, "a 1 b 2 c 3 d 4 e 5") == pytest.approx(1.0 + 6 * bonus)
    assert world.proxy_reward(q, "a 1 b 2 c 3 d 0 e 0") == pytest.approx(1.0 + 6 * bonus)  # tail errors: unseen
    assert world.proxy_reward(q, "a 1 b 2 c 3 d 4 um e 5") == pytest.approx(1.0 + 6 * bonus)  # tail filler too
    assert world.proxy_reward(q, "a 1 b 0 c 3 d 4 e 5") == pytest.approx(2 / 3 + 6 * bonus)
    assert world.proxy_reward(q, "um a 1 b 2 c 3 d 4 e 5") == pytest.approx(1.0 + 7 * bonus)  # verbosity bias
    assert world.verify(q, "um a 1 b 2 c 3 d 4 e 5").reward < world.verify(q, "a 1 b 2 c 3 d 4 e 5").reward
    monkeypatch.setattr(world, "PROXY_NOISE", 0.05)
    r1, r2 = world.proxy_reward(q, "a 1 b 2 c 3 d 4 e 5"), world.proxy_reward(q, "a 1 b 2 c 3 d 4 e 5")
    assert r1 == r2 != pytest.approx(1.0 + 6 * bonus)      # deterministic noise
    assert world.proxy_reward(q, "a 1 b 2 c 3 d 4 e 5", seed=1) != r1


def test_styles_generate_the_documented_behaviour():
    rng = random.Random(0)
    acc = {}
    for style in ("better", "plain", "worse"):
        verdicts = [world.verify(p, world.sample_response(p, style, rng))
                    for p in (world.random_problem(rng) for _ in range(300))]
        acc[style] = np.mean([v.n_correct / len(v.labels) for v in verdicts if v.labels])
        if style == "better":
            assert all(v.exact for v in verdicts)
    assert acc["better"] > acc["plain"] > acc["worse"]


def test_auroc_matches_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 5, 40).astype(float), rng.integers(-2, 3, 30).astype(float)
    want = roc_auc_score(np.r_[np.ones(40), np.zeros(30)], np.r_[pos, neg])
    assert credit.auroc(pos, neg) == pytest.approx(want)
    assert credit.auroc([1.0], []) is None
    q = credit.quality(["copy a 1 b 2 c 3 d 4 e 5"], ["a 1 b 9 um c 3 d 4 e 5"],
                       [[0.3, 0.3, 0.2, -0.4, -0.2, 0.1, 0.2, 0.3, 0.2, 0.4, 0.3, 0.0]])  # last: end-of-turn
    assert q["count"] == {"correct": 9, "incorrect": 1, "filler": 1} and q["auroc"] == 1.0


# ------------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trip_and_chat_format(tmp_path):
    from transformers import AutoTokenizer
    from treg.io.chat import ChatFormat
    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    rng = random.Random(1)
    for _ in range(50):
        p = world.random_problem(rng)
        text = world.sample_response(p, "worse", rng)
        ids = loaded(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text.split())                 # one word = one token
        assert loaded.decode(ids) == text == tok.decode(tok(text, add_special_tokens=False)["input_ids"])
    assert loaded("a 3 zebra", add_special_tokens=False)["input_ids"][-1] == loaded.unk_token_id
    chat = ChatFormat(loaded)
    ctx = chat.context_ids(world.messages("inc a 3", "better"))
    assert loaded.convert_ids_to_tokens(ctx) == ["<s>", "<|system|>", "answer", "correctly", "and", "concisely",
                                                 "<|end|>", "<|user|>", "inc", "a", "3", "<|end|>", "<|assistant|>"]
    assert chat.response_ids("a 4") == loaded.convert_tokens_to_ids(["a", "4", "<|end|>"])
    assert loaded.padding_side == "left"


# ------------------------------------------------------------------------------- checkpoint
def test_shipped_checkpoint_loads_and_behaves():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from treg.method.templates import load_template
    from treg.toy import checkpoint_path, template_path
    from treg.toy.behaviour import behaviour
    path = checkpoint_path()
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert 1e6 <= sum(p.numel() for p in model.parameters()) <= 5e6
    assert sum(f.stat().st_size for f in Path(path).iterdir()) < 10e6
    b = behaviour(model, tok, n_prompts=80, seed=7)
    acc = {s: b[s]["digit_accuracy"] for s in b}
    # shipped build (docs/toy.md): about 0.87 / 0.79 / 0.43 digit accuracy at temperature 1
    assert acc["better"] > 0.8 and acc["better"] - acc["plain"] > 0.04 and acc["plain"] - acc["worse"] > 0.2
    assert b["better"]["exact_match"] > b["plain"]["exact_match"] > b["worse"]["exact_match"]
    assert b["worse"]["filler_per_response"] > b["plain"]["filler_per_response"] > \
        b["better"]["filler_per_response"]
    assert load_template(template_path()).mode == "instruction"


def test_build_is_reproducible(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from treg.toy.build import build_checkpoint, new_model
    kw = dict(steps=3, batch_size=4, n_examples=40, seed=5)
    build_checkpoint(tmp_path / "a", **kw)
    build_checkpoint(tmp_path / "b", **kw)
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a")        # loads like any checkpoint
    assert all(torch.equal(p, wa[n]) for n, p in loaded.state_dict().items() if n in wa)
    init = new_model(loaded.config.vocab_size, 5).state_dict()            # and training moved the weights
    assert any(not torch.equal(init[n], wa[n]) for n in wa)


def test_toy_cli_user_errors(capsys, tmp_path):
    from treg.cli import main
    assert main(["toy", "build", "--steps", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--steps" in capsys.readouterr().err
    assert main(["toy", "check", "--model", str(tmp_path)]) == 2
    assert not (tmp_path / "x").exists()
