"""The paper recipes' train.yaml (configs/llama3-8b-instruct-dpo-reg, configs/gemma2-9b-it-simpo-reg) run through the
reference pass and their first optimizer steps on CPU, on a scaled-down random-init model of the same
architecture (Llama-3: GQA, rope_theta 500k, untied head; Gemma-2: sliding/global layers, logit soft-capping,
tied head), with every recipe field kept except the model, output and cache directories, step count and the CPU
switch. The data has texts but no token rewards or reference log-probs, so the trainer computes them itself (the one-line switch).
ZeRO-3 (the recipes' launcher) is not available on CPU: benchmarks/gpu_check.sh runs it on a GPU."""
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from tiny import CORPUS, tiny_tokenizer  # noqa: E402

from treg.io.schema import IDS, PROMPT, REF_SUM, REWARDS, TEXT  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def scaled_down(recipe: str, vocab: int):
    """A random-init model of the recipe's architecture with small sizes (ratios of the real configs kept)."""
    torch.manual_seed(0)
    if recipe.startswith("llama3"):
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=224, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=1, rope_theta=500000.0, rms_norm_eps=1e-5,
                          max_position_embeddings=8192, tie_word_embeddings=False, bos_token_id=0, eos_token_id=4,
                          pad_token_id=5)
        return LlamaForCausalLM(cfg)
    from transformers import Gemma2Config, Gemma2ForCausalLM
    cfg = Gemma2Config(vocab_size=vocab, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                       final_logit_softcapping=30.0, attn_logit_softcapping=50.0, query_pre_attn_scalar=16,
                       hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, bos_token_id=0,
                       eos_token_id=4, pad_token_id=5)
    return Gemma2ForCausalLM(cfg)


def text_pairs(tok, n: int):
    """``n`` pairs with texts and token ids (what annotate writes) but no token rewards / reference columns."""
    from datasets import Dataset
    from treg.io.chat import ChatFormat
    fmt = ChatFormat(tok)
    rows = {c: [] for c in (TEXT["prompt"], TEXT["chosen"], TEXT["rejected"], PROMPT, *IDS.values())}
    for i in range(n):
        prompt, chosen, rejected = (CORPUS[(i + k) % 10] for k in (0, 3, 7))
        rows[TEXT["prompt"]].append(prompt)
        rows[PROMPT].append(fmt.context_ids([{"role": "user", "content": prompt}]))
        for side, text in (("chosen", chosen), ("rejected", rejected)):
            rows[TEXT[side]].append(text)
            rows[IDS[side]].append(fmt.response_ids(text))
    return Dataset.from_dict(rows)


@pytest.mark.parametrize("recipe", ["llama3-8b-instruct-dpo-reg", "gemma2-9b-it-simpo-reg"])
def test_recipe_reference_pass_and_first_steps_on_a_scaled_down_model(recipe, tmp_path):
    from treg.io.loading import load_causal_lm
    from treg.stages.config import parse_config
    from treg.stages.trainer import TRegTrainer
    torch.set_num_threads(1)
    tok = tiny_tokenizer("llama3")
    scaled_down(recipe, len(tok)).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    yaml = os.path.join(ROOT, "configs", recipe, "train.yaml")
    config = parse_config(["--config", yaml, "--model_name_or_path", str(tmp_path / "model"),
                           "--output_dir", str(tmp_path / "out"), "--ref_cache_dir", str(tmp_path / "cache"),
                           "--max_steps", "2", "--use_cpu", "true",
                           "--logging_steps", "1"])
    # the recipe itself is untouched: method, precision, checkpointing, accumulation, max_length
    assert config.bf16 and config.gradient_checkpointing and config.gradient_accumulation_steps == 8
    assert config.max_length == 2048 and config.alpha == 0.25
    model = load_causal_lm(config.model_name_or_path, dtype=config.dtype,
                           attn_implementation=config.attn_implementation)
    assert next(model.parameters()).dtype == torch.bfloat16
    before = [p.detach().float().clone() for p in model.parameters()]
    pairs = 2 * config.per_device_train_batch_size * config.gradient_accumulation_steps   # two optimizer steps
    trainer = TRegTrainer(model, args=config, train_dataset=text_pairs(tok, pairs), processing_class=tok)
    info = trainer.reference_info["train"]
    assert info["computed_rows"] == pairs and info["sequences"] > 0 and info["cache"].startswith(str(tmp_path))
    columns = trainer.train_dataset.column_names
    assert REWARDS["chosen"] in columns                                   # token rewards computed in the pass
    assert (REF_SUM["chosen"] in columns) == (config.method == "dpo")     # SimPO has no reference
    rewards = np.concatenate([np.asarray(r) for r in trainer.train_dataset[REWARDS["chosen"]]])
    assert np.isfinite(rewards).all() and np.abs(rewards).max() > 0
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 2 and len(losses) == 2 and all(np.isfinite(losses))
    assert any(not torch.equal(b, p.detach().float()) for b, p in zip(before, trainer.model.parameters()))
