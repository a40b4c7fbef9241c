"""Tests for treg/method/logprobs.py: chunked log-probs equal the naive log_softmax+gather, values and grads."""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from tiny import tiny_llama  # noqa: E402

from treg.method.logprobs import chunked_token_logps, model_token_logps  # noqa: E402

V = 37


def _naive(hidden, weight, targets, bias=None, softcap=None):
    logits = hidden.float() @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    lp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return torch.where(targets == -100, torch.zeros_like(lp), lp)


def _inputs(shape=(2, 5), H=8, seed=0, with_bias=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(*shape, H, generator=g) * 2).to(dtype).requires_grad_()
    weight = torch.randn(V, H, generator=g).to(dtype).requires_grad_()
    bias = torch.randn(V, generator=g).to(dtype).requires_grad_() if with_bias else None
    targets = torch.randint(0, V, shape, generator=g)
    return hidden, weight, bias, targets


def _grads(fn, hidden, weight, bias, targets, **kw):
    out = fn(hidden, weight, targets, bias=bias, **kw)
    upstream = torch.linspace(-1, 2, out.numel()).reshape(out.shape)  # non-uniform upstream gradient
    params = [p for p in (hidden, weight, bias) if p is not None]
    return out, torch.autograd.grad((out * upstream).sum(), params)


@pytest.mark.parametrize("shape, chunk, softcap, block", [((2, 5), 3, None, 8192), ((7,), 512, None, 10),
                                                          ((3, 4), 5, 1.5, 8), ((3, 4), 2, None, 1)])
def test_chunked_matches_naive_values_and_grads(shape, chunk, softcap, block, monkeypatch):
    import treg.method.logprobs
    monkeypatch.setattr(treg.method.logprobs, "VOCAB_BLOCK", block)  # backward tiles of `block` vocab entries
    hidden, weight, bias, targets = _inputs(shape)
    targets.view(-1)[1] = -100
    ours, g_ours = _grads(chunked_token_logps, hidden, weight, bias, targets, softcap=softcap, chunk_size=chunk)
    ref, g_ref = _grads(_naive, hidden, weight, bias, targets, softcap=softcap)
    assert ours.dtype == torch.float32 and ours.shape == targets.shape
    assert torch.allclose(ours, ref, atol=1e-5)
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a, b, atol=1e-5)


def test_softcap_changes_result():
    hidden, weight, bias, targets = _inputs()
    capped = chunked_token_logps(hidden, weight, targets, bias=bias, softcap=1.0)
    plain = chunked_token_logps(hidden, weight, targets, bias=bias)
    assert not torch.allclose(capped, plain, atol=1e-3)


def test_ignore_index_gives_zero_and_no_gradient():
    hidden, weight, _, targets = _inputs(with_bias=False)
    targets[0, 1] = targets[1, 4] = -100
    out, (g_h, g_w) = _grads(chunked_token_logps, hidden, weight, None, targets, chunk_size=2)
    ref, (r_h, r_w) = _grads(_naive, hidden, weight, None, targets)
    assert out[0, 1] == 0 and out[1, 4] == 0
    assert g_h[0, 1].abs().sum() == 0 and g_h[1, 4].abs().sum() == 0
    assert torch.allclose(out, ref, atol=1e-5) and torch.allclose(g_w, r_w, atol=1e-5)
    targets[:] = -100  # nothing to score: zeros, and backward still works
    out, (g_h, g_w) = _grads(chunked_token_logps, hidden, weight, None, targets)
    assert out.abs().sum() == 0 and g_w.abs().sum() == 0


def test_bf16_inputs(monkeypatch):
    import treg.method.logprobs
    monkeypatch.setattr(treg.method.logprobs, "VOCAB_BLOCK", 16)
    hidden, weight, bias, targets = _inputs(dtype=torch.bfloat16)
    out, grads = _grads(chunked_token_logps, hidden, weight, bias, targets, chunk_size=4)
    ref, ref_grads = _grads(_naive, hidden, weight, bias, targets)  # fp32 math on the same bf16 values
    assert out.dtype == torch.float32
    assert torch.allclose(out, ref, atol=1e-4)
    for g, r, p in zip(grads, ref_grads, (hidden, weight, bias)):
        assert g.dtype == torch.bfloat16 and torch.allclose(g.float(), r.float(), atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("bad", ["targets_shape", "weight_dim", "target_range", "bias_shape"])
def test_chunked_errors(bad):
    hidden, weight, bias, targets = _inputs()
    if bad == "targets_shape":
        targets = targets[:, :-1]
    elif bad == "weight_dim":
        weight = weight[:, :-1]
    elif bad == "target_range":
        targets[0, 0] = V
    else:
        bias = bias[:-1]
    with pytest.raises(ValueError):
        chunked_token_logps(hidden, weight, targets, bias=bias)


# ---------------------------------------------------------------- models
def _batch(vocab=50):
    """Two rows, the second right-padded by 3: (input_ids, attention_mask) of shape (2, 9)."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, vocab, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    ids[1, 6:] = 0
    return ids, mask


def _model_grads(model, ids, mask, **kw):
    out = model_token_logps(model, ids, mask, **kw)
    params = [p for p in model.parameters() if p.requires_grad]
    return out, torch.autograd.grad((out * torch.linspace(0.5, 1.5, out.shape[1])).sum(), params)


def test_model_token_logps_matches_naive_with_grads():
    model = tiny_llama(50)
    ids, mask = _batch()
    out, grads = _model_grads(model, ids, mask, chunk_size=4)
    ref, ref_grads = _model_grads(model, ids, mask, naive=True)
    assert out.shape == (2, 9) and out.dtype == torch.float32
    assert (out[:, 0] == 0).all() and (out[1, 6:] == 0).all() and (out[0] < 0).sum() == 8
    assert torch.allclose(out, ref, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-5)
    # right padding: the padded row scores its tokens exactly like the same row without padding
    alone = model_token_logps(model, ids[1:, :6], mask[1:, :6])
    assert torch.allclose(out[1, :6], alone[0], atol=1e-5)
    # a manual definition for one position: log p(ids[0, 4] | ids[0, :4])
    logits = model(input_ids=ids[:1, :4]).logits[0, -1]
    assert out[0, 4].item() == pytest.approx(torch.log_softmax(logits, -1)[ids[0, 4]].item(), abs=1e-5)


def test_positions_restrict_scoring_to_selected_tokens():
    """positions selects which tokens are scored: equal values there, exact zeros elsewhere, and the
    gradient equals that of the full result masked to the same positions."""
    model = tiny_llama(50, seed=4)
    ids, mask = _batch()
    wanted = torch.zeros_like(mask, dtype=torch.bool)
    wanted[0, 5:] = True
    wanted[1, 3:6] = True
    full = model_token_logps(model, ids, mask, chunk_size=4)
    part = model_token_logps(model, ids, mask, chunk_size=4, positions=wanted)
    keep = wanted & (mask != 0)
    assert torch.allclose(part[keep], full[keep], atol=1e-6)
    assert (part[~keep] == 0).all() and (full[~keep] != 0).any()
    (g_part,) = torch.autograd.grad(part.sum(), [model.lm_head.weight])
    (g_full,) = torch.autograd.grad((full * keep).sum(), [model.lm_head.weight])
    assert torch.allclose(g_part, g_full, atol=1e-6)
    with pytest.raises(ValueError, match="positions"):
        model_token_logps(model, ids, mask, positions=wanted[:, :-1])


def test_left_padding_positions():
    model = tiny_llama(50)
    ids, mask = _batch()
    left_ids = torch.cat([ids[1:, 6:], ids[1:, :6]], 1)
    left_mask = torch.cat([mask[1:, 6:], mask[1:, :6]], 1)
    left = model_token_logps(model, left_ids, left_mask)
    right = model_token_logps(model, ids[1:], mask[1:])
    assert torch.allclose(left[0, 4:], right[0, 1:6], atol=1e-5) and (left[0, :4] == 0).all()


def test_peft_lora_model():
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(tiny_llama(50, seed=1), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                             init_lora_weights=False))
    ids, mask = _batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the chunked path must be used, no fallback
        out, grads = _model_grads(model, ids, mask)
    ref, ref_grads = _model_grads(model, ids, mask, naive=True)
    assert len(grads) > 0 and torch.allclose(out, ref, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert g.abs().sum() > 0 and torch.allclose(g, r, atol=1e-5)


def test_gradient_checkpointing():
    model = tiny_llama(50, seed=2)
    ids, mask = _batch()
    out, grads = _model_grads(model, ids, mask)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.model.gradient_checkpointing
    out_gc, grads_gc = _model_grads(model, ids, mask)
    assert torch.allclose(out, out_gc, atol=1e-5)
    for g, r in zip(grads, grads_gc):
        assert torch.allclose(g, r, atol=1e-5)


def test_unknown_logit_transform_falls_back_to_naive():
    """Llama ignores final_logit_softcapping; the self-check must notice and use the model's own logits."""
    model = tiny_llama(50, seed=3)
    model.config.final_logit_softcapping = 0.01
    ids, mask = _batch()
    with pytest.warns(RuntimeWarning, match="mismatch"):
        out = model_token_logps(model, ids, mask)
    assert torch.allclose(out, model_token_logps(model, ids, mask, naive=True), atol=1e-5)
