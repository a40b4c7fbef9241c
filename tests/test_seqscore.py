"""treg.method.seqscore: annotate's scoring engine. Both paths (rows; shared contexts through a KV cache) must
give what one unbatched full-logits forward per sequence gives."""

import random
import warnings

import numpy as np
import pytest
import torch

from treg.method import seqscore
from treg.method.seqscore import Progress, context_groups, plan_batches, plan_groups, score_sequences


def _llama(kv_heads=2, seed=0, max_position_embeddings=256, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=max_position_embeddings,
                      pad_token_id=0, **extra)
    return LlamaForCausalLM(cfg).eval()


def _direct(model, ctx, resp):
    """log p(resp_t | ctx, resp_<t) from one unbatched forward with full logits (float64 softmax)."""
    ids = torch.tensor([ctx + resp])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    return logp[torch.arange(len(ctx) - 1, len(ctx) + len(resp) - 1), torch.tensor(resp)].numpy()


def _seqs(seed=0, n_contexts=7):
    """Contexts of different lengths, each followed by 1-3 responses of different lengths (like a chunk
    of pairs: plain prompts shared by chosen/rejected, instruction contexts shared by both)."""
    rng = random.Random(seed)
    seqs = []
    for _ in range(n_contexts):
        ctx = [rng.randrange(1, 97) for _ in range(rng.randint(2, 40))]
        for _ in range(rng.randint(1, 3)):
            seqs.append((ctx, [rng.randrange(1, 97) for _ in range(rng.randint(1, 12))]))
    rng.shuffle(seqs)
    return seqs


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_shared_contexts_match_one_forward_per_sequence(kv_heads):
    model, seqs = _llama(kv_heads), _seqs()
    stats = Progress()
    out = score_sequences(model, seqs, batch_tokens=120, pad_id=0, progress=stats)  # several batches
    assert stats.computed_tokens < stats.real_tokens  # the shared path really ran
    assert stats.real_tokens == sum(len(c) + len(r) for c, r in seqs)
    for (ctx, resp), lp in zip(seqs, out):
        assert lp.dtype == np.float32 and lp.shape == (len(resp),)
        np.testing.assert_allclose(lp, _direct(model, ctx, resp), atol=1e-5, rtol=0)
    rows = score_sequences(model, seqs, batch_tokens=120, pad_id=0, share=False)
    for a, b in zip(out, rows):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_sharing_only_where_it_pays():
    model = _llama()
    long_resp = [([5, 6, 7], list(range(1, 60))), ([5, 6, 7], list(range(2, 61)))]  # saves 2 of 124 tokens
    stats = Progress()
    score_sequences(model, long_resp, batch_tokens=500, pad_id=0, progress=stats)
    assert stats.computed_tokens == stats.real_tokens
    assert context_groups([([1, 2], [3]), ([4], [5]), ([1, 2], [6])]) == [[0, 2], [1]]


def test_unsupported_models_use_rows():
    from transformers import MistralConfig, MistralForCausalLM
    torch.manual_seed(0)
    mistral = MistralForCausalLM(MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               sliding_window=16, pad_token_id=0)).eval()
    assert "sliding" in seqscore.shared_unsupported(mistral)
    seqs, stats = _seqs(1), Progress()
    out = score_sequences(mistral, seqs, batch_tokens=200, pad_id=0, progress=stats)
    assert stats.computed_tokens == stats.real_tokens
    for (ctx, resp), lp in zip(seqs, out):
        np.testing.assert_allclose(lp, _direct(mistral, ctx, resp), atol=1e-5, rtol=0)


def test_a_model_failing_the_first_batch_check_falls_back_with_a_warning(monkeypatch):
    model, seqs = _llama(seed=3), _seqs(2)
    real = seqscore._shared_batch
    monkeypatch.setattr(seqscore, "_shared_batch",
                        lambda *a: {i: lp + 1.0 for i, lp in real(*a).items()})  # a wrong cache path
    with pytest.warns(RuntimeWarning, match="without context sharing"):
        out = score_sequences(model, seqs, batch_tokens=120, pad_id=0)
    for (ctx, resp), lp in zip(seqs, out):
        np.testing.assert_allclose(lp, _direct(model, ctx, resp), atol=1e-5, rtol=0)
    assert "differ" in seqscore.shared_unsupported(model)  # remembered: no second check, no second warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = Progress()
        score_sequences(model, seqs, batch_tokens=120, pad_id=0, progress=stats)
    assert stats.computed_tokens == stats.real_tokens


def test_planners_respect_the_budget():
    rng = random.Random(0)
    lengths = [rng.randint(1, 90) for _ in range(200)]
    batches = plan_batches(lengths, 256)
    assert sorted(i for b in batches for i in b) == list(range(200))
    assert all(len(b) * max(lengths[i] for i in b) <= 256 or len(b) == 1 for b in batches)
    prefix = [rng.randint(1, 60) for _ in range(80)]
    leaves = [[rng.randint(2, 30) for _ in range(rng.randint(2, 3))] for _ in range(80)]
    groups = plan_groups(prefix, leaves, 300)
    assert sorted(g for b in groups for g in b) == list(range(80))
    for b in groups:
        cost = len(b) * max(prefix[g] for g in b) + sum(len(leaves[g]) for g in b) * max(n for g in b for n in leaves[g])
        assert cost <= 300 or len(b) == 1


def test_refused_configurations_are_scored_by_rows():
    """Cases a review found wrong or fragile on the cached path: each is refused up front."""
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from transformers import GPTNeoConfig, GPTNeoForCausalLM
    torch.manual_seed(0)
    neo = GPTNeoForCausalLM(GPTNeoConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4,
                                         attention_types=[[["global", "local"], 1]], window_size=8,
                                         max_position_embeddings=256, pad_token_id=0)).eval()
    dynamic = _llama(max_position_embeddings=16,
                     rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0})
    prompt = get_peft_model(_llama(), PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3))
    reasons = [seqscore.shared_unsupported(m) for m in (neo, dynamic, prompt)]
    assert "gpt_neo" in reasons[0] and "RoPE" in reasons[1] and "prompt learning" in reasons[2]
    seqs, stats = _seqs(4), Progress()
    out = score_sequences(neo, seqs, batch_tokens=200, pad_id=0, progress=stats)
    assert stats.computed_tokens == stats.real_tokens
    for (ctx, resp), lp in zip(seqs, out):
        np.testing.assert_allclose(lp, _direct(neo, ctx, resp), atol=1e-5, rtol=0)


def test_head_fallback_on_the_cached_path_is_exact():
    """A head treg.method.logprobs cannot reproduce (an unknown logit transform) makes model_token_logps rerun with
    full logits; on the cached path that rerun must not see the tokens the first try appended to the cache."""
    model, seqs = _llama(seed=5), _seqs(5)
    model.lm_head.register_forward_hook(lambda mod, args, out: out * 3.0)
    stats = Progress()
    with pytest.warns(RuntimeWarning, match="full logits"):
        out = score_sequences(model, seqs, batch_tokens=120, pad_id=0, progress=stats)
    assert stats.computed_tokens < stats.real_tokens and seqscore.shared_unsupported(model) is None
    for (ctx, resp), lp in zip(seqs, out):
        np.testing.assert_allclose(lp, _direct(model, ctx, resp), atol=1e-5, rtol=0)
