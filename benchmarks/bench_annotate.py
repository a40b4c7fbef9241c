"""Benchmark ``treg annotate``'s scoring engine; prints a markdown table.

1. padding: padded tokens / real tokens of the length-sorted token-budget batches on pairs whose
   responses spread over 50-2,000 tokens (planner only, 256-pair shards, revision template).
2. throughput on a random Llama (tiny byte-level BPE tokenizer, local, no hub):
   - annotate: ``annotate_pairs`` (pooled, sorted, budgeted batches; ``model_token_logps``)
   - naive loop: one context + response per forward, full logits + log_softmax + gather
   - pad-free stream: the same real tokens packed into rows with no padding at all (the widths of
     annotate's own batches), through ``model_token_logps``: the ceiling for any batching scheme.
   tokens/s counts real (unpadded) tokens of context + response.

    python benchmarks/bench_annotate.py [--device cuda --dtype bfloat16] [--pairs 16] [--hidden 256]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from tiny import CORPUS, tiny_tokenizer  # noqa: E402

from treg.annotate import AnnotateConfig, annotate_pairs, build_pairs, default_batch_tokens  # noqa: E402
from treg.chat import ChatFormat, preference_rows  # noqa: E402
from treg.logprobs import model_token_logps  # noqa: E402
from treg.seqscore import plan_batches  # noqa: E402

WORDS = " ".join(CORPUS).split()


def text_of(tok, n_tokens: int, rng: random.Random) -> str:
    words = []
    while len(tok(" ".join(words), add_special_tokens=False)["input_ids"]) < n_tokens:
        words += rng.choices(WORDS, k=max(1, (n_tokens - len(words)) // 3))
    return " ".join(words)


def make_rows(tok, n: int, lo: int, hi: int, seed: int = 0):
    rng = random.Random(seed)
    return preference_rows([{"prompt": text_of(tok, rng.randint(10, 60), rng),
                             "chosen": text_of(tok, rng.randint(lo, hi), rng),
                             "rejected": text_of(tok, rng.randint(lo, hi), rng)} for _ in range(n)])


def padding_ratio(tok, n_pairs: int, batch_tokens: int) -> tuple[float, int]:
    cfg, fmt = AnnotateConfig(), ChatFormat(tok)
    rows = make_rows(tok, n_pairs, 50, 2000, seed=1)
    real = padded = 0
    for s in range(0, len(rows), 256):
        pairs = build_pairs(rows[s:s + 256], fmt, cfg)
        lengths = [len(p.ctx[k]) + len(p.resp[k[0]]) for p in pairs for k in p.ctx]
        for batch in plan_batches(lengths, batch_tokens):
            real += sum(lengths[i] for i in batch)
            padded += len(batch) * lengths[batch[0]]
    return padded / real, real


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def throughput(model, tok, rows, batch_tokens, device, template=None):
    cfg, fmt = AnnotateConfig(batch_tokens=batch_tokens, template=template), ChatFormat(tok)
    pairs = build_pairs(rows, fmt, cfg)
    seqs = [p.ctx[k] + p.resp[k[0]] for p in pairs for k in p.ctx]
    is_resp = [[False] * len(p.ctx[k]) + [True] * len(p.resp[k[0]]) for p in pairs for k in p.ctx]
    real = sum(map(len, seqs))
    padded = sum(len(b) * len(seqs[b[0]]) for b in plan_batches([len(s) for s in seqs], batch_tokens))
    annotate_pairs(pairs[:2], model, cfg, pad_id=tok.pad_token_id)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    annotate_pairs(pairs, model, cfg, pad_id=tok.pad_token_id)
    sync(device)
    t_ann = time.perf_counter() - t0

    t0 = time.perf_counter()
    for s in seqs:  # naive: one sequence per forward, full logits
        ids = torch.tensor([s], device=device)
        logp = torch.log_softmax(model(ids).logits.float(), -1)
        logp[0, :-1].gather(-1, ids[0, 1:, None]).cpu()
    sync(device)
    t_naive = time.perf_counter() - t0

    lengths = [len(s) for s in seqs]
    flat = torch.tensor([t for s in seqs for t in s], device=device)
    flat_resp = torch.tensor([m for s in is_resp for m in s], device=device)
    pos, jobs = 0, []
    for batch in plan_batches(lengths, batch_tokens):  # same widths, zero padding
        width, n = lengths[batch[0]], sum(lengths[i] for i in batch)
        rows_ = -(-n // width)
        chunk = torch.zeros(rows_ * width, dtype=torch.long, device=device)
        wanted = torch.zeros(rows_ * width, dtype=torch.bool, device=device)
        chunk[:n], wanted[:n] = flat[pos:pos + n], flat_resp[pos:pos + n]
        pos += n
        jobs.append((chunk.view(rows_, width), wanted.view(rows_, width)))
    sync(device)
    t0 = time.perf_counter()
    for ids, wanted in jobs:  # the same response tokens scored (head only there), as annotate does
        model_token_logps(model, ids, torch.ones_like(ids), positions=wanted).cpu()
    sync(device)
    t_free = time.perf_counter() - t0
    return real, padded / real, t_ann, t_naive, t_free


def print_throughput(ann: float, naive: float, free: float, pad: float) -> None:
    """The throughput table (tokens/s of annotate, the naive loop and the pad-free stream)."""
    print("| measure | value | target |\n|---|---|---|")
    print(f"| annotate tokens/s | {ann:,.0f} | |")
    print(f"| naive loop tokens/s (1 sequence/forward, full logits) | {naive:,.0f} | |")
    print(f"| annotate / naive | {ann / naive:.2f}x | >= 3x |")
    print(f"| pad-free stream tokens/s (same tokens, same widths) | {free:,.0f} | |")
    print(f"| annotate / pad-free | {ann / free:.2f} | >= 0.8 |")
    print(f"| padded / real tokens in the throughput run | {pad:.3f} | |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--pairs", type=int, default=16, help="pairs for the throughput runs")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000,
                    help="model vocabulary (>= the tiny tokenizer's 400; real models have 32k-256k: the "
                         "output head and full logits cost scale with it)")
    ap.add_argument("--batch-tokens", type=int, default=None,
                    help="annotate's budget (default: treg's default for the device, 2048 on CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, all cores)")
    ap.add_argument("--toy", action="store_true",
                    help="instead: the shipped toy checkpoint on 500 toy pairs (short sequences, ~30 tokens)")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    device = torch.device(args.device)
    if args.batch_tokens is None:
        args.batch_tokens = default_batch_tokens(device)
    if args.toy:
        return toy_main(args, device)
    tok = tiny_tokenizer("llama3")
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=max(args.vocab, len(tok)), hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=4096, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).to(device, getattr(torch, args.dtype)).eval()

    ratio, n_real = padding_ratio(tok, 512, 16384)
    rows = make_rows(tok, args.pairs, 50, 500)
    real, pad_small, t_ann, t_naive, t_free = throughput(model, tok, rows, args.batch_tokens, device)
    ann, naive, free = real / t_ann, real / t_naive, real / t_free
    print(f"device {args.device} ({args.dtype}, {args.threads} CPU thread(s)), Llama hidden {args.hidden} x "
          f"{args.layers} layers, vocab {cfg.vocab_size:,}; throughput on {args.pairs} pairs ({real:,} real tokens, "
          f"responses 50-500 tokens, revision template, batch_tokens {args.batch_tokens})\n")
    print_throughput(ann, naive, free, pad_small)
    print(f"| padded / real tokens, 512 pairs, responses 50-2,000 tokens ({n_real:,} real) | {ratio:.3f} | <= 1.10 |")


def toy_main(args, device):
    """The embedded toy world: real sampled pairs, the toy's instruction template, its 1M-parameter model."""
    from treg import toy
    from treg.templates import load_template
    from treg.toy.pipeline import prompts, sample_responses
    model, tok = toy.load()
    model = model.to(device, getattr(torch, args.dtype)).eval()
    rows = prompts(500, seed=0)
    responses = sample_responses(model, tok, rows, n=2, seed=0)
    pairs = preference_rows([{"prompt": r["prompt"], "chosen": a, "rejected": b}
                             for r, (a, b) in zip(rows, responses)])
    template = load_template(toy.template_path("instruction"))
    real, pad, t_ann, t_naive, t_free = throughput(model, tok, pairs, args.batch_tokens, device, template)
    ann, naive, free = real / t_ann, real / t_naive, real / t_free
    print(f"device {args.device} ({args.dtype}, {args.threads} CPU thread(s)), the shipped toy checkpoint "
          f"({sum(p.numel() for p in model.parameters()):,} parameters); 500 sampled toy pairs ({real:,} real "
          f"tokens), instruction template, batch_tokens {args.batch_tokens}\n")
    print_throughput(ann, naive, free, pad)


if __name__ == "__main__":
    main()
