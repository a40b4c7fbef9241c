"""Build the toy checkpoint from scratch: tokenizer + tiny ``LlamaForCausalLM`` trained by SFT.

The SFT data imitate :data:`treg.toy.world.STYLE_RATES`: under the *better* system prompt the
answers are correct and concise, under the *worse* one they err and pad, and with no system prompt
(plain) they err at a moderate rate, so the trained model's samples for one prompt usually differ.

Determinism: data come from ``random.Random(seed)``, weights from ``torch.manual_seed(seed)``; two
builds with the same arguments on the same machine give identical weights. The output directory
is written atomically (temp dir + rename) and loads with ``AutoModelForCausalLM.from_pretrained``
and ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

import torch

from treg.io.fsutil import atomic_directory
from treg.toy import world
from treg.toy.tokenizer import build_tokenizer

MODEL_SHAPE = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=4, max_position_embeddings=128)
STYLE_MIX = {"plain": 0.4, "better": 0.3, "worse": 0.3}


def new_model(vocab_size: int, seed: int):
    """A randomly initialised toy Llama (~1.1M parameters), deterministic in ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = build_tokenizer()
    cfg = LlamaConfig(vocab_size=vocab_size, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **MODEL_SHAPE)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def sft_examples(n: int, seed: int) -> list[tuple[list[dict], str]]:
    """``n`` (messages, response) SFT examples drawn from the style mixture ``STYLE_MIX``."""
    rng = random.Random(seed)
    styles, weights = zip(*sorted(STYLE_MIX.items()))
    out = []
    for _ in range(n):
        style = rng.choices(styles, weights)[0]
        problem = world.random_problem(rng)
        out.append((world.messages(problem, style), world.sample_response(problem, style, rng)))
    return out


def encode_examples(tok, examples) -> list[tuple[list[int], int]]:
    """Token ids ``context + response + eos`` and the context length (response tokens appended, never
    re-tokenized together with the context: METHOD.md §1's exact alignment)."""
    contexts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m, _ in examples]
    ctx_ids = tok(contexts, add_special_tokens=False)["input_ids"]
    resp_ids = tok([r for _, r in examples], add_special_tokens=False)["input_ids"]
    return [(c + r + [tok.eos_token_id], len(c)) for c, r in zip(ctx_ids, resp_ids)]


def _batch(rows, pad_id: int):
    """Right-padded (B, L) input_ids / attention_mask / labels (-100 outside the response)."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, n_ctx) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, n_ctx:len(ids)] = torch.tensor(ids[n_ctx:])
        mask[i, :len(ids)] = 1
    return input_ids, mask, labels


def train_sft(model, rows, *, steps: int, batch_size: int, lr: float, seed: int, pad_id: int,
              log_every: int = 0) -> list[float]:
    """Plain SFT loop (AdamW, linear warmup, cosine decay to 10%); returns the loss per step."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps))))))
    model.train()
    losses = []
    for step in range(steps):
        idx = torch.randint(len(rows), (batch_size,), generator=gen).tolist()
        input_ids, mask, labels = _batch([rows[i] for i in idx], pad_id)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            print(f"  step {step + 1}/{steps}  loss {sum(losses[-log_every:]) / log_every:.4f}", flush=True)
    model.eval()
    return losses


def build_checkpoint(out: str | os.PathLike, *, steps: int = 1500, seed: int = 0, batch_size: int = 64,
                     lr: float = 2e-3, n_examples: int = 30000, log_every: int = 0) -> dict:
    """Train the toy checkpoint and write it atomically to ``out``; returns the build info dict."""
    t0 = time.time()
    tok = build_tokenizer()
    rows = encode_examples(tok, sft_examples(n_examples, seed))
    model = new_model(len(tok), seed)
    losses = train_sft(model, rows, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                       pad_id=tok.pad_token_id, log_every=log_every)
    info = {"steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr, "n_examples": n_examples,
            "final_loss": sum(losses[-50:]) / len(losses[-50:]),
            "parameters": sum(p.numel() for p in model.parameters()),
            "style_rates": world.STYLE_RATES, "style_mix": STYLE_MIX,
            "train_seconds": round(time.time() - t0, 1)}
    out = Path(out)
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "toy_build.json").write_text(json.dumps(info, indent=2, sort_keys=True))
    return info
