"""padding_free (treg/io/packing.py): packed batches give the padded path's loss, metrics and gradients
(fp32, rel 1e-5) for Llama, Qwen2 (sliding window) and Gemma-2-style (attention + final logit
soft-capping, sliding window) models, train/eval/resume alike; models that cannot keep packed sequences
apart are refused with a one-line TregError."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from test_data import make_pairs  # noqa: E402
from test_trainer import config, losses  # noqa: E402
from tiny import tiny_llama, tiny_tokenizer  # noqa: E402
from treg.errors import TregError  # noqa: E402
from treg.io.data import PairCollator  # noqa: E402
from treg.io.packing import PackedPairCollator, check_packed_attention, token_logps  # noqa: E402
from treg.stages.trainer import METRIC_KEYS, TRegTrainer  # noqa: E402

V = 400


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer("llama3")


def tiny(kind: str, impl: str | None = None, seed: int = 0):
    """Tiny random models: llama, qwen2 (sliding window on one layer), gemma2 (soft-capping, sliding window)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, Qwen2Config, Qwen2ForCausalLM
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    if kind == "llama":
        model = tiny_llama(V, seed=seed)
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=True, sliding_window=6, max_window_layers=1))
    else:
        model = Gemma2ForCausalLM(Gemma2Config(**common, head_dim=8, sliding_window=6, final_logit_softcapping=5.0,
                                               attn_logit_softcapping=3.0, query_pre_attn_scalar=8))
    if impl is not None:
        model.config._attn_implementation = impl
    return model.eval()


def rows(n=4, seed=0, **kw):
    data = make_pairs(n, seed=seed, vocab=V, **kw)
    return [data[i] for i in range(n)]


def test_packed_collator_layout():
    batch_rows = rows(3, response=(1, 12))
    padded = PairCollator(0, pad_to_multiple_of=8)(batch_rows)
    packed = PackedPairCollator(0, pad_to_multiple_of=8)(batch_rows)
    for key, value in padded.items():                       # the (2B, L) bookkeeping is the padded one
        assert torch.equal(value, packed[key]), key
    lengths = padded["attention_mask"].sum(1)
    n = int(lengths.sum())
    assert packed["packed_input_ids"].shape == (1, n) == packed["packed_position_ids"].shape  # no padding
    starts = (packed["packed_position_ids"][0] == 0).nonzero().flatten()
    assert starts.tolist() == [0, *lengths.cumsum(0)[:-1].tolist()]   # positions restart per sequence
    assert torch.equal(padded["input_ids"].reshape(-1)[packed["packed_index"]], packed["packed_input_ids"][0])
    seq = 0
    for i, length in enumerate(lengths.tolist()):                   # each sequence: 0..len-1, in row order
        assert packed["packed_position_ids"][0, seq:seq + length].tolist() == list(range(length))
        assert packed["packed_index"][seq].item() == i * padded["input_ids"].shape[1]
        seq += length


CASES = [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"), ("qwen2", "eager"), ("gemma2", "eager")]


@pytest.mark.parametrize("kind,impl", CASES)
@pytest.mark.parametrize("chunk", [3, 0])
def test_token_logps_and_gradients_equal_padded(kind, impl, chunk):
    model = tiny(kind, impl)
    batch_rows = rows(4, response=(1, 14))
    out = []
    for collator in (PairCollator(0), PackedPairCollator(0)):
        lp = token_logps(model, collator(batch_rows), chunk_size=chunk or 512, naive=chunk == 0)
        weights = torch.linspace(-1, 1, lp.numel()).reshape(lp.shape)   # a loss that weighs every token
        out.append((lp, torch.autograd.grad((lp * weights).sum(), list(model.parameters()))))
    (a, ga), (b, gb) = out
    assert a.abs().sum() > 0 and torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-6 * float(x.abs().max()))


@pytest.mark.parametrize("wrap", ["lora", "checkpointing"])
def test_lora_and_gradient_checkpointing_packed_equal_padded(wrap):
    model = tiny("llama", "sdpa", seed=4)
    if wrap == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    else:
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    batch_rows = rows(3, seed=4, response=(1, 10))
    out = []
    for collator in (PairCollator(0), PackedPairCollator(0)):
        lp = token_logps(model, collator(batch_rows), chunk_size=4)
        out.append((lp, torch.autograd.grad(lp.sum(), params)))
    (a, ga), (b, gb) = out
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    for x, y in zip(ga, gb):
        assert x.abs().sum() > 0 and torch.allclose(x, y, rtol=1e-5, atol=1e-6 * float(x.abs().max()))


def _trainer(model, tok, tmp_path, packed: bool, data=None, **kw):
    kw = {"alpha": 0.25, **kw}
    return TRegTrainer(model, args=config(tmp_path / ("packed" if packed else "padded"), padding_free=packed, **kw),
                       train_dataset=make_pairs(16, vocab=V) if data is None else data,
                       eval_dataset=make_pairs(6, seed=3, vocab=V), processing_class=tok)


@pytest.mark.parametrize("kind,impl", [("llama", "sdpa"), ("qwen2", "sdpa"), ("gemma2", "eager")])
def test_trainer_loss_metrics_gradients_reference_equal(kind, impl, tok, tmp_path):
    """One batch through compute_loss (policy moved off the reference): loss, every metric and every
    gradient; and the precomputed reference columns (the reference pass runs on packed batches too)."""
    results = []
    for packed in (False, True):
        trainer = _trainer(tiny(kind, impl), tok, tmp_path, packed)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        assert ("packed_input_ids" in batch) == packed
        model = trainer.model.train()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # move the policy off the reference, so that rewards and accuracies mean something
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        loss, out = trainer.compute_loss(model, batch, return_outputs=True)
        loss.backward()
        results.append((trainer, loss.detach(), out.metrics, [p.grad.clone() for p in model.parameters()]))
    (t0, l0, m0, g0), (t1, l1, m1, g1) = results
    assert torch.allclose(l0, l1, rtol=1e-5)
    assert set(m0) == set(m1)
    for key in m0:
        assert float(m0[key]) == pytest.approx(float(m1[key]), rel=1e-5, abs=1e-6), key  # floats or 0-d tensors
    for x, y in zip(g0, g1):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-6 * float(x.abs().max()))
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        assert torch.allclose(torch.tensor(t0.train_dataset[column]), torch.tensor(t1.train_dataset[column]),
                              rtol=1e-5)


def test_training_eval_and_resume_equal_padded(tok, tmp_path):
    """4 steps padded vs padding_free: same logged losses and metrics, final parameters, eval loss; and a
    padding_free run resumed from its step-2 checkpoint continues the same trajectory."""
    # SGD: Adam's g / sqrt(v) would blow float noise in a near-zero gradient entry up to a whole lr-sized step
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2, optim="sgd", learning_rate=0.1)
    runs = {}
    for packed in (False, True):
        trainer = _trainer(tiny_llama(len(tok)), tok, tmp_path, packed, **kw)
        trainer.train()
        runs[packed] = (trainer, trainer.evaluate())
    (pad, ev0), (pk, ev1) = runs[False], runs[True]
    assert torch.allclose(torch.tensor(losses(pad)), torch.tensor(losses(pk)), rtol=1e-5)
    logs = [[h for h in t.state.log_history if "loss" in h] for t in (pad, pk)]
    for key in METRIC_KEYS:
        # step 1: policy == reference, so the sign of logp - ref behind credit_agreement is float noise
        a, b = ([h[key] if key != "treg/credit_agreement" or h["step"] > 1 else 0.0 for h in log] for log in logs)
        assert len(a) == 4 and torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-6), key
    for (name, p), q in zip(pad.model.named_parameters(), pk.model.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), name
    assert ev0["eval_loss"] == pytest.approx(ev1["eval_loss"], rel=1e-5)
    resumed = _trainer(tiny_llama(len(tok)), tok, tmp_path / "resumed", True, **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "packed" / "out" / "checkpoint-2"))
    tail = [h["loss"] for h in resumed.state.log_history if "loss" in h and h["step"] > 2]
    assert torch.allclose(torch.tensor(tail), torch.tensor(losses(pk)[2:]), rtol=1e-5)


def test_live_reference_packed_equals_padded(tok, tmp_path):
    kw = dict(max_steps=2, precompute_ref_log_probs=False)
    pad = _trainer(tiny_llama(len(tok)), tok, tmp_path, False, **kw)
    pk = _trainer(tiny_llama(len(tok)), tok, tmp_path, True, **kw)
    pad.train(), pk.train()
    assert torch.allclose(torch.tensor(losses(pad)), torch.tensor(losses(pk)), rtol=1e-5)


def test_model_without_position_ids_is_refused(tok, tmp_path):
    from transformers import BloomConfig, BloomForCausalLM
    model = BloomForCausalLM(BloomConfig(vocab_size=V, hidden_size=32, n_layer=1, n_head=4))
    with pytest.raises(TregError) as err:  # at the reference pass, before any training
        _trainer(model, tok, tmp_path, True, max_steps=1, alpha=0.0, data=make_pairs(4, vocab=V)).train()
    assert err.value.field == "padding_free" and "position_ids" in str(err.value) and "\n" not in str(err.value)


def test_mask_that_ignores_packing_is_refused(monkeypatch):
    """A transformers build (or model) whose mask ignores the packed positions is caught by the probe."""
    import transformers.masking_utils as mu
    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(TregError, match="mixes packed sequences") as err:
        check_packed_attention(tiny("llama", "eager", seed=1))
    assert err.value.field == "padding_free"
    monkeypatch.undo()
    check_packed_attention(tiny("llama", "eager", seed=2))       # the real one passes


def test_sdpa_runs_one_sequence_at_a_time_and_is_restored(monkeypatch):
    """On a packed row, sdpa layers attend per sequence (no N x N block mask); the model's config says
    sdpa again afterwards; Qwen2's sliding-window layer keeps the masked path."""
    import treg.io.packing as packing
    calls = []
    real = packing._segments
    monkeypatch.setattr(packing, "_segments", lambda pos: calls.append(1) or real(pos))
    for kind, layers in (("llama", 2), ("qwen2", 1)):
        calls.clear()
        model = tiny(kind, "sdpa", seed=5)
        check_packed_attention(model)  # the probe (cached per model) first, so that only the batch is counted
        calls.clear()
        token_logps(model, PackedPairCollator(0)(rows(2)))
        assert len(calls) == layers and model.config._attn_implementation == "sdpa"


def test_unsupported_attention_refused_by_config_and_model(tmp_path):
    with pytest.raises(TregError) as err:
        config(tmp_path, padding_free=True, attn_implementation="paged_attention")
    assert err.value.field == "padding_free"
    model = tiny("llama", "sdpa", seed=3)
    model.config._attn_implementation = "my_custom_kernel"
    with pytest.raises(TregError, match="does not separate packed sequences"):
        check_packed_attention(model)


@pytest.mark.skipif(not os.environ.get("TREG_SMOLLM2"), reason="set TREG_SMOLLM2 to the SmolLM2-135M checkpoint")
def test_smollm2_packed_equals_padded():
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(os.environ["TREG_SMOLLM2"], dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    data = make_pairs(2, seed=5, vocab=vocab, prompt=(4, 20), response=(3, 40))
    batch_rows = [data[i] for i in range(2)]
    params = [p for n, p in model.named_parameters() if "layers.29." in n or "layers.0." in n]
    out = []
    for collator in (PairCollator(0), PackedPairCollator(0)):
        lp = token_logps(model, collator(batch_rows), chunk_size=64)
        out.append((lp, torch.autograd.grad(lp.sum(), params)))
    (a, ga), (b, gb) = out
    assert torch.allclose(a.sum(1), b.sum(1), rtol=1e-5) and torch.allclose(a, b, atol=1e-4)
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-5 * float(x.abs().max()))


def test_probe_in_bfloat16_accepts_sound_and_refuses_broken_masks(monkeypatch):
    """Half precision: the probe's tolerance is relative to what attending across the boundary changes."""
    for impl in ("sdpa", "eager"):
        check_packed_attention(tiny("llama", impl, seed=7).to(torch.bfloat16))
    import transformers.masking_utils as mu
    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(TregError, match="mixes packed sequences"):
        check_packed_attention(tiny("llama", "eager", seed=8).to(torch.bfloat16))
