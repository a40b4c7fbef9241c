"""The TRL user's one-line switch (issue 12, part A): trl.DPOTrainer 1.16 -> TRegTrainer.

Each TRL preference format is built in Python and trained by ``trl.DPOTrainer`` and by ``TRegTrainer``
(alpha=0) with the same model path, dataset and arguments; only the class and the config differ
(``TRegConfig.from_dpo_config``). Same token ids, same loss per step (rel 1e-4), and the metrics with
TRL's names equal where the definitions coincide (all of them at gradient_accumulation_steps=1).
"""

from __future__ import annotations

import inspect
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from tiny import save_tiny_model  # noqa: E402
from treg.errors import TregError  # noqa: E402
from treg.stages.config import TRegConfig  # noqa: E402
from treg.stages.trainer import TRegTrainer  # noqa: E402

SKY = ["The sky is blue.", "The sky is green."]
PAIRS = [  # (prompt, chosen, rejected)
    ("The quick brown fox", " jumps over the lazy dog.", " is lazy."),
    ("Hello! How can I help", " you today? Sure.", " me?"),
    ("Numbers like 12345", " and 3.14159 appear in text.", " are text."),
    ("def add(a, b):", "\n    return a + b\n", "\n    return a - b\n"),
    ("Rewrite the draft to be", " more helpful and concise.", " less helpful, incorrect."),
    ("Token-level rewards assign", " credit to individual tokens.", " nothing."),
]
TRL_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "num_tokens", "mean_token_accuracy")


def _messages(role, text):
    return [{"role": role, "content": text.strip()}]


def dataset(fmt: str):
    from datasets import Dataset
    rows = []
    for p, c, r in PAIRS:
        if fmt == "standard_explicit":
            rows.append({"prompt": p, "chosen": c, "rejected": r})
        elif fmt == "standard_implicit":
            rows.append({"chosen": p + c, "rejected": p + r})
        elif fmt == "conversational_explicit":
            rows.append({"prompt": _messages("user", p), "chosen": _messages("assistant", c),
                         "rejected": _messages("assistant", r)})
        else:  # conversational_implicit: whole conversations sharing the user turn
            rows.append({"chosen": _messages("user", p) + _messages("assistant", c),
                         "rejected": _messages("user", p) + _messages("assistant", r)})
    return Dataset.from_list(rows)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    save_tiny_model(path, "llama3")
    return str(path)


def dpo_config(out, **kw):
    from trl import DPOConfig
    base = dict(output_dir=str(out), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1,
                seed=0, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, bf16=False,
                gradient_checkpointing=False)  # TRL's default (True) is checked in test_bad_inputs_*: time
    base.update(kw)
    return DPOConfig(**base)


@pytest.mark.parametrize("fmt,precompute", [("standard_explicit", False), ("standard_implicit", True),
                                            ("conversational_explicit", False), ("conversational_implicit", True)])
def test_same_ids_losses_and_metrics_as_trl(model_dir, tmp_path, fmt, precompute):
    from trl import DPOTrainer
    cfg = dpo_config(tmp_path / "trl", precompute_ref_log_probs=precompute)
    theirs = DPOTrainer(model_dir, args=cfg, train_dataset=dataset(fmt))
    cfg_ours = TRegConfig.from_dpo_config(dpo_config(tmp_path / "treg", precompute_ref_log_probs=precompute),
                                          alpha=0.0)
    ours = TRegTrainer(model_dir, args=cfg_ours, train_dataset=dataset(fmt))   # only the class and config differ
    for col, trl_col in (("prompt_input_ids", "prompt_ids"), ("chosen_input_ids", "chosen_ids"),
                         ("rejected_input_ids", "rejected_ids")):
        assert ours.train_dataset[col] == theirs.train_dataset[trl_col], col
    assert theirs.train_dataset["chosen_ids"][0][-1] == theirs.processing_class.eos_token_id  # eos / template end
    theirs.train()
    ours.train()
    a = [h for h in ours.state.log_history if "loss" in h]
    b = [h for h in theirs.state.log_history if "loss" in h]
    assert len(a) == len(b) == 2
    assert a[-1]["loss"] != a[0]["loss"]                               # it trained: the comparison is not vacuous
    # At the first step policy == reference, so every margin is 0 up to float noise (1e-7): TRL's precompute runs
    # the training batches bit for bit, treg's reference pass another batching (seqscore), and "chosen > rejected"
    # of a noise-level margin is a coin flip. Accuracies are compared where the margins are not noise.
    tie = torch.tensor([abs(h["rewards/margins"]) < 1e-5 for h in b])
    for key in ("loss", *TRL_METRICS):
        got, want = torch.tensor([h[key] for h in a]), torch.tensor([h[key] for h in b])
        if key == "rewards/accuracies":
            got, want = got[~tie], want[~tie]
            assert len(got) >= 1  # the second step has real margins
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6), (key, got, want)


def test_head_stats_equal_trl_kernel():
    """entropy, mean logit and top-1 (behind TRL's entropy, logits/*, mean_token_accuracy) from treg's chunked
    head equal TRL 1.16's chunked kernel; half the targets are the argmax, so top-1 is not all zeros."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    from treg.method.logprobs import chunked_token_logps
    gen = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(10, 16, generator=gen), torch.randn(50, 16, generator=gen)
    targets = torch.randint(0, 50, (10,), generator=gen)
    targets[::2] = (hidden @ weight.t()).argmax(1)[::2]
    stats = {}
    ours = chunked_token_logps(hidden, weight, targets, chunk_size=3, stats=stats)
    lp, ent, _, mean_logit, top1 = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 7, None, 1.0,
                                                                ("entropy", "mean_logits", "is_top1"))
    assert torch.allclose(ours, lp, atol=1e-5)
    assert torch.allclose(stats["entropy"], ent, atol=1e-5) and torch.allclose(stats["mean_logit"], mean_logit,
                                                                                 atol=1e-6)
    assert torch.equal(stats["is_top1"].bool(), top1) and 5 <= int(top1.sum()) < 10


def test_split_prompt_matches_trl_extract_prompt():
    from trl.data_utils import extract_prompt
    from treg.stages.trl_data import split_prompt
    q = _messages("user", "q")
    cases = [SKY, ["abc", "abcd"], ["same", "same"], ["xa b", "ya b"], ["a b c", "a b d"], ["ab  c", "ab  d"],
             [q + _messages("assistant", "a"), q + _messages("assistant", "b")],
             [q + _messages("assistant", "a"), q + _messages("assistant", "a")]]
    for chosen, rejected in cases:
        want = extract_prompt({"chosen": chosen, "rejected": rejected})
        assert split_prompt(chosen, rejected) == (want["prompt"], want["chosen"], want["rejected"]), (chosen, rejected)


def test_signature_is_dpo_trainers():
    from trl import DPOTrainer

    def params(cls):
        return [(p.name, p.kind, p.default) for p in inspect.signature(cls.__init__).parameters.values()]
    assert params(TRegTrainer) == params(DPOTrainer)


def test_bad_inputs_are_one_line_errors(model_dir, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig
    for bad, field in ((dict(use_weighting=True), "use_weighting"), (dict(loss_type="robust"), "loss_type"),
                       (dict(label_smoothing=0.1), "label_smoothing"), (dict(ld_alpha=0.5), "ld_alpha")):
        with pytest.raises(TregError) as err:
            TRegConfig.from_dpo_config(dpo_config(tmp_path, **bad), alpha=0.0)
        assert err.value.field == field and "\n" not in str(err.value) and field in str(err.value)
    plain = TRegConfig.from_dpo_config(DPOConfig(output_dir=str(tmp_path), use_cpu=True), alpha=0.0)  # TRL's defaults
    assert (plain.method, plain.precompute_ref_log_probs, plain.activation_checkpointing, plain.bf16) == \
        ("dpo", False, True, True)
    cfg = TRegConfig.from_dpo_config(dpo_config(tmp_path), alpha=0.0)
    cases = [(Dataset.from_list([{"question": "q", "answer": "a"}]), "chosen"),
             (Dataset.from_list([{"prompt": "q", "chosen": "a"}]), "rejected"),
             (Dataset.from_list([{"prompt": "q", "chosen": 1, "rejected": 2}]), "chosen"),
             (Dataset.from_list([{"prompt": "q", "chosen": _messages("assistant", "a"), "rejected": "b"}]), "rejected"),
             (dataset("standard_explicit").to_iterable_dataset(), "train_dataset")]
    for data, field in cases:
        with pytest.raises(TregError) as err:
            TRegTrainer(model_dir, args=cfg, train_dataset=data)
        assert err.value.field == field and "\n" not in str(err.value), str(err.value)
    with pytest.raises(TregError, match="from_dpo_config"):
        TRegTrainer(model_dir, args=DPOConfig(output_dir=str(tmp_path), use_cpu=True), train_dataset=dataset("x"))
    with pytest.raises(TregError, match="by name"):
        TRegTrainer(model_dir, cfg, dataset("standard_explicit"))          # the old positional order
    # alpha > 0 on a TRL dataset computes the token rewards in the trainer (tests/test_reference_cache.py); on
    # token ids with no texts to build the contrastive contexts from, one line says what to do
    ids_only = Dataset.from_list([{"prompt_input_ids": [5, 6], "chosen_input_ids": [7, 8], "rejected_input_ids": [9]}])
    with pytest.raises(TregError, match="no texts to compute them from") as err:
        TRegTrainer(model_dir, args=TRegConfig.from_dpo_config(dpo_config(tmp_path), alpha=0.25),
                    train_dataset=ids_only)
    assert "\n" not in str(err.value)


def test_ref_model_eval_dict_and_compute_metrics(model_dir, tmp_path):
    """An explicit ref_model is the reference (it differs from the policy: non-zero rewards before any step);
    eval_dataset may be a dict of TRL datasets; compute_metrics gets logits and labels, as in TRL; a loaded
    model without processing_class gets the tokenizer of its path; args=None gives '<name>-TReg'."""
    from tiny import tiny_llama
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from treg.stages.trl_data import check_args
    assert check_args(None, model_dir).output_dir == os.path.basename(model_dir) + "-TReg"
    tok = AutoTokenizer.from_pretrained(model_dir)
    seen = {}

    def compute_metrics(pred):
        seen["shape"] = pred.predictions.shape
        return {"custom": 1.0}
    cfg = TRegConfig.from_dpo_config(dpo_config(tmp_path, precompute_ref_log_probs=True), alpha=0.0)
    t = TRegTrainer(AutoModelForCausalLM.from_pretrained(model_dir), ref_model=tiny_llama(len(tok), seed=1), args=cfg,
                    train_dataset=dataset("standard_explicit"), compute_metrics=compute_metrics,
                    eval_dataset={"a": dataset("standard_implicit"), "b": dataset("conversational_explicit")})
    out = t.evaluate()
    assert {"eval_a_loss", "eval_b_loss", "eval_a_custom", "eval_b_custom"} <= set(out)
    logged = [h for h in t.state.log_history if "eval_a_loss" in h][0]   # own metrics: "eval_" prefix, as TRL
    assert abs(logged["eval_rewards/margins"]) > 1e-4 and "eval_entropy" in logged
    assert seen["shape"][-1] == len(tok)
