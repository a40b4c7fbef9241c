"""Peak memory and time of per-token log-probs: chunked (treg.method.logprobs) vs naive log_softmax + gather.

One forward + backward of ``log p(target)`` from hidden states (B, T, H) and an output embedding (V, H),
defaults: vocab 128,256 (Llama-3), 1,024 tokens, batch 2, hidden 64. Each variant runs in a fresh
subprocess. Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` minus what was allocated after
the inputs were created; on CPU the peak-RSS delta (``ru_maxrss``) over the same baseline. Time: median
of ``--repeats`` further runs. Prints a markdown table.

    .venv/bin/python benchmarks/bench_logprobs.py [--device cpu|cuda] [--dtypes float32,bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def worker(args) -> dict:
    import torch
    from treg.method.logprobs import chunked_token_logps
    torch.manual_seed(0)
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    hidden = torch.randn(args.batch, args.tokens, args.hidden, device=dev, dtype=dtype, requires_grad=True)
    weight = (torch.randn(args.vocab, args.hidden, device=dev) * 0.05).to(dtype).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.batch, args.tokens), device=dev)
    upstream = torch.randn(args.batch, args.tokens, device=dev)

    def step():
        if args.variant == "naive":  # what a model forward + log_softmax + gather does
            logits = (hidden @ weight.t()).float()                           # (B, T, V) float32
            lp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
        else:
            lp = chunked_token_logps(hidden, weight, targets, chunk_size=args.chunk_size)
        (lp * upstream).sum().backward()
        hidden.grad = weight.grad = None

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return {"peak": peak, "seconds": statistics.median(times)}


def verify(device: str) -> None:
    """Correctness on this device: chunked vs float64 reference (values, grads), fp32 and bf16, and
    model_token_logps vs the naive path on a tiny Llama in bf16 (prints max errors, a markdown table)."""
    import warnings
    import torch
    from treg.method.logprobs import chunked_token_logps, model_token_logps
    torch.manual_seed(0)
    print("| check | dtype | softcap | max abs err logp | max rel err grad hidden | max rel err grad weight |")
    print("|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for softcap in (None, 3.0):
            h = (torch.randn(2, 300, 64, device=device) * 2).to(dtype).requires_grad_()
            w = (torch.randn(20000, 64, device=device) * 0.5).to(dtype).requires_grad_()
            t = torch.randint(0, 20000, (2, 300), device=device)
            t[0, :7] = -100
            up = torch.randn(2, 300, device=device)
            ours = chunked_token_logps(h, w, t, softcap=softcap, chunk_size=128)
            g_ours = torch.autograd.grad((ours * up).sum(), (h, w))
            hd, wd = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
            z = hd @ wd.t()
            z = softcap * torch.tanh(z / softcap) if softcap else z
            ref = torch.log_softmax(z, -1).gather(-1, t.clamp(min=0)[..., None])[..., 0] * (t != -100)
            g_ref = torch.autograd.grad((ref * up.double()).sum(), (hd, wd))
            rel = [float((a.double() - b).abs().max() / b.abs().max()) for a, b in zip(g_ours, g_ref)]
            print(f"| chunked vs float64 | {str(dtype)[6:]} | {softcap} | {float((ours.detach().double() - ref.detach()).abs().max()):.2e} "
                  f"| {rel[0]:.2e} | {rel[1]:.2e} |")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from tiny import tiny_llama
    model = tiny_llama(500).to(device=device, dtype=torch.bfloat16).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(3, 500, (2, 64), device=device)
    mask = torch.ones_like(ids)
    mask[1, 40:] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # fails if the chunked path fell back
        ours = model_token_logps(model, ids, mask, chunk_size=32)
    naive = model_token_logps(model, ids, mask, naive=True)  # bf16 logits, as the model computes them
    print(f"| model_token_logps vs naive (tiny Llama, grad ckpt) | bfloat16 | None | "
          f"{float((ours - naive).detach().abs().max()):.2e} | - | - |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=128_256, help="vocabulary size V")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per sequence T")
    p.add_argument("--batch", type=int, default=2, help="batch size B")
    p.add_argument("--hidden", type=int, default=64, help="hidden size H")
    p.add_argument("--chunk-size", type=int, default=512, help="rows per chunk of the chunked path")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median reported)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtypes", default=None, help="comma list (default: float32 on CPU, float32,bfloat16 on CUDA)")
    p.add_argument("--verify", action="store_true", help="run the correctness checks instead of the benchmark")
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.verify:
        verify(args.device or "cuda")
        return 0
    if args.variant:  # subprocess worker
        print(json.dumps(worker(args)))
        return 0
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = (args.dtypes or ("float32,bfloat16" if device == "cuda" else "float32")).split(",")
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"V={args.vocab}, B={args.batch}, T={args.tokens}, H={args.hidden}, chunk_size={args.chunk_size}, "
          f"device={name}, torch {torch.__version__}, forward+backward\n")
    print("| device | dtype | variant | peak extra memory (MiB) | vs naive | time (ms) |")
    print("|---|---|---|---|---|---|")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for dtype in dtypes:
        naive_peak = None
        for variant in ("naive", "chunked"):
            cmd = [sys.executable, __file__, "--variant", variant, "--dtype", dtype, "--device", device,
                   "--vocab", str(args.vocab), "--tokens", str(args.tokens), "--batch", str(args.batch),
                   "--hidden", str(args.hidden), "--chunk-size", str(args.chunk_size), "--repeats", str(args.repeats)]
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout)
            naive_peak = naive_peak or res["peak"]
            print(f"| {name} | {dtype} | {variant} | {res['peak'] / 2**20:,.0f} | "
                  f"{100 * res['peak'] / naive_peak:.0f}% | {1000 * res['seconds']:,.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
