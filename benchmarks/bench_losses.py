"""Overhead of the T-REG regularizer in the loss function: treg_loss forward+backward, DPO vs DPO-REG.

Per-token log-probs are given (the model forward is not timed): B pairs of T tokens each, 90% of them
response tokens. Time is the median of ``--repeats`` calls after warm-up, including input validation
and metric extraction (device syncs). Prints a markdown table.

    .venv/bin/python benchmarks/bench_losses.py [--device cpu|cuda] [--batch 8] [--tokens 1024]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from treg.method.losses import treg_loss

VARIANTS = [  # (label, kwargs)
    ("DPO (alpha=0)", dict(method="dpo", alpha=0.0)),
    ("DPO-REG (alpha=0.25, sequence w)", dict(method="dpo", alpha=0.25)),
    ("DPO-REG + credit_agreement", dict(method="dpo", alpha=0.25, token_ref=True)),
    ("SimPO (alpha=0)", dict(method="simpo", alpha=0.0, beta=2.0, gamma=0.6)),
    ("SimPO-REG (alpha=0.25)", dict(method="simpo", alpha=0.25, beta=2.0, gamma=0.6)),
]


def run(args) -> None:
    dev = torch.device(args.device)
    g = torch.Generator(device=dev).manual_seed(0)
    B, T = args.batch, args.tokens
    lw = (-torch.rand(B, T, device=dev, generator=g) * 3).requires_grad_()
    ll = (-torch.rand(B, T, device=dev, generator=g) * 3).requires_grad_()
    cm = torch.rand(B, T, device=dev, generator=g) < 0.9
    rm = torch.rand(B, T, device=dev, generator=g) < 0.9
    cm[:, 0] = rm[:, 0] = True
    rw, rl = torch.rand(B, T, device=dev, generator=g) - 0.5, torch.rand(B, T, device=dev, generator=g) - 0.5
    ref_w, ref_l = -torch.rand(B, device=dev, generator=g) * 3 * T, -torch.rand(B, device=dev, generator=g) * 3 * T
    tok_w, tok_l = -torch.rand(B, T, device=dev, generator=g) * 3, -torch.rand(B, T, device=dev, generator=g) * 3
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU"
    print(f"B={B} pairs, T={T} tokens per response, device={name}, torch {torch.__version__}, forward+backward\n")
    print("| variant | time (ms) | vs DPO |")
    print("|---|---|---|")
    base = None
    for label, kw in VARIANTS:
        kw = dict(kw)
        token_ref = kw.pop("token_ref", False)
        extra = dict(ref_chosen_token_logps=tok_w, ref_rejected_token_logps=tok_l) if token_ref else {}
        rewards = (rw, rl) if kw["alpha"] > 0 else (None, None)

        def step():
            out = treg_loss(lw, ll, cm, rm, *rewards, ref_w, ref_l, **kw, **extra)
            out.loss.backward()
            lw.grad = ll.grad = None

        for _ in range(3):
            step()
        times = []
        for _ in range(args.repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        base = base or t
        print(f"| {label} | {1000 * t:.2f} | {t / base:.2f}x |", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8, help="pairs per batch B")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per response T")
    p.add_argument("--repeats", type=int, default=50, help="timed calls per variant (median reported)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    args = p.parse_args()
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
