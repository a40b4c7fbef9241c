"""Measure what the recipes' generation and scoring paths cost and check them on a GPU.

    PYTHONPATH=. python benchmarks/bench_sampling.py            # CUDA: 8B-shaped random-init Llama
    PYTHONPATH=. python benchmarks/bench_sampling.py --small    # CPU smoke run
    PYTHONPATH=. python benchmarks/bench_sampling.py --model "$(treg model path smollm2-135m-instruct)" \
        --batch 4 --prompt-len 64 --new-tokens 32                # a real checkpoint (CPU if no GPU)

1. Correctness on the device: seeded sampling (treg.stages.sampling.hf_generate with the Gumbel-max
   processor) gives the same responses in batches of 1 and of 6, in float32 and bfloat16; the reward
   model scorer's padded batches equal unpadded single forwards.
2. Throughput of the ``hf`` backend (model.generate) on a Llama-3-8B-shaped model with random
   weights in bf16: treg's seeded Gumbel sampling vs transformers' own multinomial sampling vs
   greedy, same batch and lengths (best of two runs after a full-length warm-up). Prints a markdown table. Random weights never emit EOS, so every
   row runs to max_new_tokens: the numbers are decode throughput, not end-to-end recipe time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def check_correctness(device: str) -> list[str]:
    from tiny import tiny_llama, tiny_tokenizer
    from treg.io.chat import ChatFormat
    from treg.stages.sampling import hf_generate, row_seed, stop_token_ids
    from treg.stages.scoring import RewardModelScorer
    out = []
    tok = tiny_tokenizer("llama3")
    chat = ChatFormat(tok)
    prompts = ["Hello there", "What is a fox?", "Numbers like 12345", "def add(a, b):", "Say hi", "Rewrite this"]
    ctx = [chat.context_ids([{"role": "user", "content": p}]) for p in prompts]
    seeds = [row_seed(0, str(i), 0) for i in range(len(ctx))]
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_llama(len(tok)).to(device=device, dtype=dtype)
        kw = dict(stop_ids=stop_token_ids(model, tok, chat), temperature=1.0, top_p=0.9, max_new_tokens=24)
        one = [hf_generate(model, tok, [c], [s], batch_size=1, **kw)[0] for c, s in zip(ctx, seeds)]
        six = hf_generate(model, tok, ctx, seeds, batch_size=6, **kw)
        same = sum(a == b for a, b in zip(one, six))
        out.append(f"seeded sampling {dtype}: batch 1 vs batch 6 identical for {same}/{len(ctx)} prompts")
        if dtype == torch.float32 and device != "cpu":
            cpu = hf_generate(model.cpu(), tok, ctx, seeds, batch_size=6, **kw)
            same = sum(a == b for a, b in zip(cpu, six))
            out.append(f"seeded sampling float32: {device} vs cpu identical for {same}/{len(ctx)} prompts")
    from treg.stages.sampling import hashed_uniform
    noise_same = torch.equal(hashed_uniform([1, 2**40 + 3], 7, 128256, device=device).cpu(),
                             hashed_uniform([1, 2**40 + 3], 7, 128256))
    out.append(f"hashed noise identical on {device} and cpu: {noise_same}")
    from transformers import LlamaConfig, LlamaForSequenceClassification
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        LlamaForSequenceClassification(cfg).save_pretrained(d)
        tok.save_pretrained(d)
        scorer = RewardModelScorer(d, batch_size=4, device=device)  # bf16 on CUDA by default
        responses = ["Sure.", "A fox is an animal that jumps over dogs.", "12345", "return a + b", "hi", "x" * 40]
        got = scorer(prompts, responses)
        worst = 0.0
        for p, r, g in zip(prompts, responses, got):
            ids = torch.tensor([scorer.encode(p, r)], device=device)
            with torch.no_grad():
                worst = max(worst, abs(scorer.model(input_ids=ids).logits.float()[0, 0].item() - g))
        out.append(f"reward model ({scorer.model.dtype}) padded batch vs single forward: max |diff| {worst:.2e}")
    return out


def throughput(device: str, small: bool, batch: int, prompt_len: int, new_tokens: int,
               model_path: str | None = None) -> list[str]:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, LogitsProcessorList
    from treg.stages.sampling import GumbelSampler
    if model_path:
        from transformers import AutoConfig
        cfg = AutoConfig.from_pretrained(model_path)
    elif small:
        cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)
    else:  # Llama-3-8B shapes
        cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                          rope_theta=500000.0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    if model_path:  # real weights (they may emit EOS: min_new_tokens keeps every row at full length)
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    else:
        with torch.device(device):
            model = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    eos = cfg.vocab_size - 1
    ids = torch.randint(0, cfg.vocab_size - 1, (batch, prompt_len), device=device)
    mask = torch.ones_like(ids)

    def run(kind: str, n: int) -> float:
        procs = LogitsProcessorList()
        if kind == "greedy":
            gc = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=eos, pad_token_id=0)
        elif kind == "hf-multinomial":
            gc = GenerationConfig(do_sample=True, temperature=0.8, top_p=0.95, top_k=0, max_new_tokens=n,
                                  min_new_tokens=n, eos_token_id=eos, pad_token_id=0)
        else:
            gc = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=eos, pad_token_id=0)
            procs.append(GumbelSampler(list(range(batch)), 0.8, 0.95))
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc, logits_processor=procs)
        if device == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] == prompt_len + n
        return time.perf_counter() - t

    rows = ["| decoding | batch | prompt | new tokens | seconds | generated tokens/s |", "|---|---|---|---|---|---|"]
    run("greedy", new_tokens)  # warm-up at full length (allocator, kernels)
    for kind in ("greedy", "hf-multinomial", "treg-gumbel"):
        run(kind, 4)
        sec = min(run(kind, new_tokens) for _ in range(2))  # best of two
        rows.append(f"| {kind} | {batch} | {prompt_len} | {new_tokens} | {sec:.2f} | {batch * new_tokens / sec:,.0f} |")
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    params = sum(p.numel() for p in model.parameters()) / 1e9
    what = f"{model_path} ({params:.3f}B parameters)" if model_path else f"Llama shapes, {params:.2f}B parameters"
    weights = "" if model_path else ", random weights"
    return [f"model: {what}, {dtype}{weights}, on {name}, {torch.get_num_threads()} CPU thread(s)"] + rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
    ap.add_argument("--batch", type=int, default=64, help="sequences per generate call")
    ap.add_argument("--prompt-len", type=int, default=256, help="prompt tokens")
    ap.add_argument("--new-tokens", type=int, default=256, help="generated tokens per sequence")
    ap.add_argument("--model", default=None, help="a local checkpoint instead of random weights (throughput only)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.small else "cpu"
    import transformers
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {device}")
    if not args.model:
        for line in check_correctness(device):
            print(line, flush=True)
    for line in throughput(device, args.small, args.batch, args.prompt_len, args.new_tokens, args.model):
        print(line, flush=True)


if __name__ == "__main__":
    main()
