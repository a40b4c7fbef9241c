"""Tests for treg/stages/trainer.py: TRL parity, accumulation, resume, T-REG metrics, PEFT reference, eval."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from test_data import make_pairs  # noqa: E402
from tiny import tiny_llama, tiny_tokenizer  # noqa: E402
from treg.stages.config import TRegConfig  # noqa: E402
from treg.stages.trainer import TRegTrainer  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer("llama3")


def config(tmp_path, **kw) -> TRegConfig:
    base = dict(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
                logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
                alpha=0.0, lr_scheduler_type="constant")
    base.update(kw)
    return TRegConfig(**base)


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def train(tok, tmp_path, data=None, model=None, **kw) -> TRegTrainer:
    trainer = TRegTrainer(model or tiny_llama(len(tok)), args=config(tmp_path, **kw),
                          train_dataset=make_pairs(16) if data is None else data, processing_class=tok)
    trainer.train()
    return trainer


def test_alpha0_reproduces_trl_dpo_trainer(tok, tmp_path):
    """20 steps, same tiny Llama init, data, seed (hence sampler order), batch 4, lr 1e-3 (linear decay),
    same precomputed reference log-probs: TRL 1.16 DPOTrainer's logged per-step `loss` equals ours.

    TRL 1.16 always tokenizes text in ``_prepare_dataset``; to feed it the identical pre-tokenized
    pairs we subclass it to skip that step (and its own reference pass, given our columns).
    """
    from trl import DPOConfig, DPOTrainer

    class PreTokenized(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

        def _precompute_ref_logps(self, dataset, name, batch_size):
            return dataset

    common = dict(max_steps=20, per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, seed=0,
                  save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, beta=0.1)
    ours = TRegTrainer(tiny_llama(len(tok)), args=TRegConfig(output_dir=str(tmp_path / "a"), alpha=0.0, **common),
                       train_dataset=make_pairs(16), processing_class=tok)
    data = ours.train_dataset            # with our one-pass reference log-probs
    ours.train()
    trl_data = data.select_columns(["prompt_input_ids", "chosen_input_ids", "rejected_input_ids",
                                    "ref_chosen_logps", "ref_rejected_logps"]).rename_columns(
        {"prompt_input_ids": "prompt_ids", "chosen_input_ids": "chosen_ids", "rejected_input_ids": "rejected_ids"})
    theirs = PreTokenized(tiny_llama(len(tok)), args=DPOConfig(
        output_dir=str(tmp_path / "b"), precompute_ref_log_probs=True, bf16=False, gradient_checkpointing=False,
        max_length=1024, **common), train_dataset=trl_data, processing_class=tok)
    theirs.train()
    a, b = losses(ours), losses(theirs)
    assert len(a) == len(b) == 20
    assert a[-1] < a[0] - 0.05                                   # it learned: the comparison is not vacuous
    assert torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=0)


def test_gradient_accumulation_equals_big_batch(tok, tmp_path):
    """2 micro-batches of 2 accumulated == 1 batch of 4: same logged losses, logged metrics (including the
    token-pooled ones, whose micro-batches hold different token counts) and final parameters."""
    from treg.stages.trainer import METRIC_KEYS
    big = train(tok, tmp_path / "big", per_device_train_batch_size=4, max_steps=3, alpha=0.25)
    acc = train(tok, tmp_path / "acc", per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
                alpha=0.25)
    assert torch.allclose(torch.tensor(losses(big)), torch.tensor(losses(acc)), rtol=1e-5)
    logs = [[h for h in t.state.log_history if "loss" in h] for t in (big, acc)]
    for key in METRIC_KEYS:
        # step 1: policy == reference, so the sign of logp - ref behind credit_agreement is float noise
        a, b = ([h[key] if key != "treg/credit_agreement" or h["step"] > 1 else 0.0 for h in log] for log in logs)
        assert len(a) == 3 and torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-6), key
    for (name, p), q in zip(big.model.named_parameters(), acc.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_resume_from_checkpoint_reproduces_trajectory(tok, tmp_path):
    """6 steps straight vs 3 steps + resume from checkpoint-3: identical losses for steps 4-6."""
    full = train(tok, tmp_path / "full", max_steps=6, alpha=0.25)
    kw = dict(max_steps=6, alpha=0.25, save_strategy="steps", save_steps=3, output_dir=str(tmp_path / "ck"))
    first = TRegTrainer(tiny_llama(len(tok)), args=config(tmp_path, **kw), train_dataset=make_pairs(16),
                        processing_class=tok)
    first.train()
    ckpt = tmp_path / "ck" / "checkpoint-3"
    assert ckpt.is_dir()
    resumed = TRegTrainer(tiny_llama(len(tok)), args=config(tmp_path, **kw), train_dataset=make_pairs(16),
                          processing_class=tok)
    resumed.train(resume_from_checkpoint=str(ckpt))
    tail = [h["loss"] for h in resumed.state.log_history if "loss" in h and h["step"] > 3]
    assert len(tail) == 3
    assert torch.allclose(torch.tensor(tail), torch.tensor(losses(full)[3:]), rtol=1e-5)


def test_alpha_positive_trains_and_reg_metrics_move(tok, tmp_path):
    """Full-batch steps (the same 16 pairs each step): with alpha > 0 L_REG falls, and faster than
    with alpha = 0 from the same start; all T-REG metrics are logged."""
    kw = dict(per_device_train_batch_size=16, max_steps=6)
    t = train(tok, tmp_path, alpha=1.0, **kw)
    base = train(tok, tmp_path / "a0", alpha=0.0, **kw)
    logs = [h for h in t.state.log_history if "loss" in h]
    assert {"treg/seq_weight", "treg/credit_agreement", "treg/token_reward_mean_chosen"} <= set(logs[0])
    assert all(h["data/dropped_pairs"] == 0 for h in logs)
    reg = [h["treg/reg_loss"] for h in logs]
    reg0 = [h["treg/reg_loss"] for h in base.state.log_history if "loss" in h]
    assert reg[0] == pytest.approx(reg0[0], rel=1e-5)                   # same start
    assert reg[-1] < reg[0] and reg[-1] < reg0[-1]                      # the regularizer is optimized
    assert logs[-1]["treg/credit_agreement"] > logs[0]["treg/credit_agreement"]


def test_live_reference_equals_precomputed(tok, tmp_path):
    pre = train(tok, tmp_path / "pre", alpha=0.25, max_steps=3)
    live = train(tok, tmp_path / "live", alpha=0.25, max_steps=3, precompute_ref_log_probs=False)
    assert "ref_chosen_logps" not in live.train_dataset.column_names
    assert torch.allclose(torch.tensor(losses(pre)), torch.tensor(losses(live)), rtol=1e-5)


def test_full_logits_path_equals_chunked(tok, tmp_path):
    """logprob_chunk_size=0 (the model's full logits) trains the same trajectory as the chunked head."""
    chunked = train(tok, tmp_path / "chunked", alpha=0.25, max_steps=3, logprob_chunk_size=3)
    full = train(tok, tmp_path / "full", alpha=0.25, max_steps=3, logprob_chunk_size=0)
    assert torch.allclose(torch.tensor(losses(chunked)), torch.tensor(losses(full)), rtol=1e-5)


def test_peft_lora_reference_is_base_model(tok, tmp_path):
    """LoRA with random (non-zero) B, so the adapter changes the model from the start: the reference
    pass must still equal the plain base model's (adapters disabled); training moves only the adapter."""
    from peft import LoraConfig
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                             task_type="CAUSAL_LM")
    plain = TRegTrainer(tiny_llama(len(tok)), args=config(tmp_path / "p"), train_dataset=make_pairs(8),
                        processing_class=tok)
    lora = TRegTrainer(tiny_llama(len(tok)), args=config(tmp_path / "l", alpha=0.25, max_steps=4),
                       train_dataset=make_pairs(8), processing_class=tok, peft_config=peft_config)
    for col in ("ref_chosen_logps", "ref_rejected_logps"):
        assert torch.allclose(torch.tensor(plain.train_dataset[col]), torch.tensor(lora.train_dataset[col]), atol=1e-5)
    frozen = {n: p.detach().clone() for n, p in lora.model.named_parameters() if not p.requires_grad}
    lora_before = {n: p.detach().clone() for n, p in lora.model.named_parameters() if p.requires_grad}
    lora.train()
    first = [h for h in lora.state.log_history if "loss" in h][0]
    assert abs(first["rewards/margins"]) > 1e-4  # policy (with adapter) != reference at step 1
    assert lora_before and all("lora_" in n for n in lora_before)
    assert any(not torch.equal(p, lora_before[n]) for n, p in lora.model.named_parameters() if n in lora_before)
    assert all(torch.equal(p, frozen[n]) for n, p in lora.model.named_parameters() if n in frozen)


def test_lora_with_gradient_checkpointing_and_bf16(tok, tmp_path):
    t = TRegTrainer(tiny_llama(len(tok)), args=config(tmp_path, use_peft=True, lora_r=4, alpha=0.25, max_steps=2,
                                                 activation_checkpointing=True, bf16=True),
                    train_dataset=make_pairs(8), processing_class=tok)
    lora_b = {n: p.detach().clone() for n, p in t.model.named_parameters() if "lora_B" in n}
    t.train()
    assert len(losses(t)) == 2 and all(torch.isfinite(torch.tensor(losses(t))))
    assert t.model.get_base_model().is_gradient_checkpointing
    assert lora_b and all(not torch.equal(p, lora_b[n]) for n, p in t.model.named_parameters() if n in lora_b)


def test_simpo_and_eval_metrics(tok, tmp_path):
    t = TRegTrainer(tiny_llama(len(tok)), args=config(tmp_path, method="simpo", beta=2.0, gamma=0.5, alpha=0.25,
                                                 eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4),
                    train_dataset=make_pairs(16), eval_dataset=make_pairs(6, seed=1), processing_class=tok)
    assert "ref_chosen_logps" not in t.train_dataset.column_names   # SimPO needs no reference
    t.train()
    evals = [h for h in t.state.log_history if "eval_loss" in h]
    assert len(evals) == 2 and "eval_rewards/margins" in evals[0] and "eval_treg/reg_loss" in evals[0]


def test_evaluate_new_dataset_gets_reference_or_clear_error(tok, tmp_path):
    from treg.errors import TregError
    t = TRegTrainer(tiny_llama(len(tok)), args=config(tmp_path, alpha=0.25, max_steps=2),
                    train_dataset=make_pairs(8), processing_class=tok)
    before = t.evaluate(eval_dataset=make_pairs(4, seed=2))            # initial model: reference == policy
    assert before["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    t.train()
    with pytest.raises(TregError, match="already been trained"):
        t.evaluate(eval_dataset=make_pairs(4, seed=2))
    with_ref = t.evaluate(eval_dataset=make_pairs(4, seed=2, ref=True))
    assert torch.isfinite(torch.tensor(with_ref["eval_loss"])) and abs(with_ref["eval_rewards/margins"]) > 1e-3
