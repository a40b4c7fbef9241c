"""Sampling from a toy policy and measuring its behaviour with the exact verifier.

``generate`` is a small, deterministic sampler (left padding, ``model.generate``); the demo uses it
for evaluation so that all methods are judged by the same code. ``behaviour`` summarises a policy's
samples per style: digit accuracy, exact-match rate, filler words per response, reward.
"""

from __future__ import annotations

import random

import torch

from treg.toy import world


@torch.no_grad()
def generate(model, tok, message_lists: list[list[dict]], *, temperature: float = 1.0, seed: int = 0,
             max_new_tokens: int = 40, batch_size: int = 256) -> list[str]:
    """One sampled response (text, special tokens removed) per conversation; greedy if temperature 0."""
    torch.manual_seed(seed)
    model.eval()
    out: list[str] = []
    for start in range(0, len(message_lists), batch_size):
        chunk = message_lists[start:start + batch_size]
        texts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in chunk]
        enc = tok(texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
        kwargs = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 \
            else dict(do_sample=False)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, **kwargs)
        new = gen[:, enc["input_ids"].shape[1]:]
        out += [" ".join(tok.decode(row, skip_special_tokens=True).split()) for row in new]
    return out


def behaviour(model, tok, *, n_prompts: int = 100, seed: int = 1234, temperature: float = 1.0) -> dict:
    """Per style: mean digit accuracy, exact-match rate, filler per response and mean reward."""
    rng = random.Random(seed)
    problems = [world.random_problem(rng) for _ in range(n_prompts)]
    result = {}
    for style in ("better", "plain", "worse"):
        responses = generate(model, tok, [world.messages(p, style) for p in problems],
                             temperature=temperature, seed=seed)
        verdicts = [world.verify(p, r) for p, r in zip(problems, responses)]
        n = len(verdicts)
        result[style] = {
            "digit_accuracy": sum(v.n_correct / len(p.items) for v, p in zip(verdicts, problems)) / n,
            "exact_match": sum(v.exact for v in verdicts) / n,
            "filler_per_response": sum(v.n_filler for v in verdicts) / n,
            "reward": sum(v.reward for v in verdicts) / n,
        }
    return result
