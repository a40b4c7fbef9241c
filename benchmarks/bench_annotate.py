"""Benchmark ``treg annotate``'s scoring engine; prints a markdown table.

1. padding: padded tokens / real tokens of the length-sorted token-budget batches on pairs whose
   responses spread over 50-2,000 tokens (planner only, 256-pair shards, revision template).
2. throughput on a random Llama (tiny byte-level BPE tokenizer, local, no hub), or with ``--toy`` on the
   shipped toy checkpoint and toy pairs (instruction template); best of ``--repeats`` interleaved runs:
   - annotate: ``annotate_pairs`` (budgeted batches, head on response tokens only, shared contexts
     computed once where that pays: treg.method.seqscore)
   - annotate without context sharing: ``score_sequences(share=False)`` on the same sequences
   - naive loop: one context + response per forward, full logits + log_softmax + gather
   - pad-free stream: the same real tokens packed into rows with no padding at all (the widths of
     annotate's own batches), through ``model_token_logps``: the ceiling for any batching scheme
     that computes every sequence's tokens (context sharing computes fewer, so it can beat it).
   tokens/s counts real (unpadded) tokens of context + response of every scored sequence.

    python benchmarks/bench_annotate.py [--device cuda --dtype bfloat16] [--pairs 16] [--hidden 256]
    python benchmarks/bench_annotate.py --model "$(treg model path smollm2-135m-instruct)" --pairs 4 --repeats 1

3. with ``--model PATH``: the throughput table on a real checkpoint and its own tokenizer and chat template
   (revision template, responses 30-150 tokens of corpus words).
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

from treg.stages.annotate import AnnotateConfig, annotate_pairs, build_pairs, default_batch_tokens  # noqa: E402
from treg.io.chat import ChatFormat, preference_rows  # noqa: E402
from treg.method.logprobs import model_token_logps  # noqa: E402
from treg.method.seqscore import Progress, plan_batches, score_sequences  # noqa: E402

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


def _timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


@torch.no_grad()
def throughput(model, tok, rows, batch_tokens, device, template=None, repeats=3):
    """Seconds (best of ``repeats``, the four measurements interleaved) of: annotate, annotate without
    context sharing, the naive loop, the pad-free stream; plus token counts."""
    cfg, fmt = AnnotateConfig(batch_tokens=batch_tokens, template=template), ChatFormat(tok)
    pairs = build_pairs(rows, fmt, cfg)
    seqs = [p.ctx[k] + p.resp[k[0]] for p in pairs for k in p.ctx]
    split = [(p.ctx[k], p.resp[k[0]]) for p in pairs for k in p.ctx]
    is_resp = [[False] * len(p.ctx[k]) + [True] * len(p.resp[k[0]]) for p in pairs for k in p.ctx]
    real = sum(map(len, seqs))
    stats = Progress()
    annotate_pairs(pairs[:2], model, cfg, pad_id=tok.pad_token_id)  # warm-up
    annotate_pairs(pairs, model, cfg, pad_id=tok.pad_token_id, progress=stats)

    def naive():
        for s in seqs:  # one sequence per forward, full logits
            ids = torch.tensor([s], device=device)
            logp = torch.log_softmax(model(ids).logits.float(), -1)
            logp[0, :-1].gather(-1, ids[0, 1:, None]).cpu()

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

    def pad_free():  # the same response tokens scored (head only there), as annotate does
        for ids, wanted in jobs:
            model_token_logps(model, ids, torch.ones_like(ids), positions=wanted).cpu()

    stats.response_tokens = sum(len(p.resp[k[0]]) for p in pairs for k in p.ctx)
    runs = {"annotate": lambda: annotate_pairs(pairs, model, cfg, pad_id=tok.pad_token_id),
            "unshared": lambda: score_sequences(model, split, batch_tokens=batch_tokens, pad_id=tok.pad_token_id,
                                                share=False),
            "naive": naive, "pad_free": pad_free}
    best = {k: float("inf") for k in runs}
    for _ in range(repeats):
        for k, fn in runs.items():
            best[k] = min(best[k], _timed(fn, device))
    return real, stats, best


def work_ratio(model, real: int, stats) -> float:
    """Multiply-adds of the naive loop / annotate's, linear layers only: what a compute-bound device can
    gain at most. Naive: every real token through the decoder AND the output head; annotate: the
    computed tokens (context sharing) through the decoder, the head on response tokens only."""
    head = model.get_output_embeddings().weight.numel()
    body = sum(p.numel() for p in model.get_decoder().parameters() if p.dim() == 2) \
        - model.get_input_embeddings().weight.numel()
    return real * (body + head) / (stats.computed_tokens * body + stats.response_tokens * head)


def print_throughput(real: int, stats, t: dict, model) -> None:
    """The throughput table (tokens/s of annotate, the naive loop and the pad-free stream)."""
    ann, naive, free, unshared = (real / t[k] for k in ("annotate", "naive", "pad_free", "unshared"))
    print("| measure | value | target |\n|---|---|---|")
    print(f"| annotate tokens/s | {ann:,.0f} | |")
    print(f"| naive loop tokens/s (1 sequence/forward, full logits) | {naive:,.0f} | |")
    print(f"| annotate / naive | {ann / naive:.2f}x | >= 3x |")
    print(f"| pad-free stream tokens/s (same tokens, same widths) | {free:,.0f} | |")
    print(f"| annotate / pad-free | {ann / free:.2f} | >= 0.8 |")
    print(f"| annotate without context sharing tokens/s | {unshared:,.0f} | |")
    print(f"| scored / computed tokens (context sharing) | {stats.real_tokens / stats.computed_tokens:.3f} | |")
    print(f"| padded / computed tokens in the throughput run | {stats.padded_tokens / stats.computed_tokens:.3f} | |")
    print(f"| linear-layer multiply-adds, naive / annotate | "
          f"{work_ratio(model, real, stats):.2f}x | |")


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
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each measurement (best is kept)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, all cores)")
    ap.add_argument("--model", default=None,
                    help="instead: a local checkpoint and its tokenizer (e.g. treg model path smollm2-135m-instruct)")
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
    if args.model:
        return model_main(args, device)
    tok = tiny_tokenizer("llama3")
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=max(args.vocab, len(tok)), hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=4096, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).to(device, getattr(torch, args.dtype)).eval()

    ratios = {bt: padding_ratio(tok, 512, bt) for bt in (2048, 16384)}
    rows = make_rows(tok, args.pairs, 50, 500)
    real, stats, t = throughput(model, tok, rows, args.batch_tokens, device, repeats=args.repeats)
    print(f"device {args.device} ({args.dtype}, {args.threads} CPU thread(s)), Llama hidden {args.hidden} x "
          f"{args.layers} layers, vocab {cfg.vocab_size:,}; throughput on {args.pairs} pairs ({real:,} real tokens, "
          f"responses 50-500 tokens, revision template, batch_tokens {args.batch_tokens})\n")
    print_throughput(real, stats, t, model)
    for bt, (ratio, n_real) in ratios.items():
        print(f"| padded / real tokens, 512 pairs, responses 50-2,000 tokens ({n_real:,} real), budget {bt:,} "
              f"| {ratio:.3f} | <= 1.10 |")


def model_main(args, device):
    """A real checkpoint (its tokenizer and chat template), revision template, responses 30-150 tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(device).eval()
    rows = make_rows(tok, args.pairs, 30, 150)
    real, stats, t = throughput(model, tok, rows, args.batch_tokens, device, repeats=args.repeats)
    print(f"device {args.device} ({args.dtype}, {args.threads} CPU thread(s)), {args.model} "
          f"({sum(p.numel() for p in model.parameters()):,} parameters, vocab {len(tok):,}); {args.pairs} pairs "
          f"({real:,} real tokens, responses 30-150 tokens), revision template, batch_tokens {args.batch_tokens}\n")
    print_throughput(real, stats, t, model)


def toy_main(args, device):
    """The embedded toy world: real sampled pairs, the toy's instruction template, its 1M-parameter model."""
    from treg import toy
    from treg.method.templates import load_template
    from treg.toy.pipeline import prompts, sample_responses
    model, tok = toy.load()
    model = model.to(device, getattr(torch, args.dtype)).eval()
    rows = prompts(500, seed=0)
    responses = sample_responses(model, tok, rows, n=2, seed=0)
    pairs = preference_rows([{"prompt": r["prompt"], "chosen": a, "rejected": b}
                             for r, (a, b) in zip(rows, responses)])
    template = load_template(toy.template_path("instruction"))
    real, stats, t = throughput(model, tok, pairs, args.batch_tokens, device, template, repeats=args.repeats)
    print(f"device {args.device} ({args.dtype}, {args.threads} CPU thread(s)), the shipped toy checkpoint "
          f"({sum(p.numel() for p in model.parameters()):,} parameters); 500 sampled toy pairs ({real:,} real "
          f"tokens), instruction template, batch_tokens {args.batch_tokens}\n")
    print_throughput(real, stats, t, model)


if __name__ == "__main__":
    main()
