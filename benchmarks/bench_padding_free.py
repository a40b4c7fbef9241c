"""Padding-free benchmark: TRegTrainer step time with ``padding_free`` vs padded batches, same batches.

Lengths are long-tailed like real preference data: responses log-normal (median 150 tokens, sigma 0.8,
clipped to [20, 600]) drawn independently for chosen and rejected, prompts log-normal (median 40,
sigma 0.6, clipped to [8, 200]); the token ids are random (timing does not depend on them). Every step
is one optimizer step (forward + backward of the DPO-REG loss, alpha 0.25, + AdamW) of ``--batch``
pairs with precomputed (random) reference log-probs; step i runs padded and padding-free on the same
pairs, in alternating order (padded first on even steps), in one process, after ``--warmup`` untimed
steps of each. Reports median step times, their ratio, and real / computed tokens (computed = what the
model's forward sees: 2B x L padded, the packed row's length padding-free).

    OMP_NUM_THREADS=2 TREG_SMOLLM2="$(treg model path smollm2-135m-instruct)" \
        python benchmarks/bench_padding_free.py --batch 4 --steps 3 --warmup 1
    python benchmarks/bench_padding_free.py            # no TREG_SMOLLM2: a random-init tiny Llama

Prints a markdown table (copied into docs/benchmarks.md, section "padding-free").
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=os.environ.get("TREG_SMOLLM2"),
                   help="checkpoint directory (default: $TREG_SMOLLM2, else a random-init tiny Llama)")
    p.add_argument("--batch", type=int, default=4, help="pairs per step")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    p.add_argument("--seed", type=int, default=0, help="length and token draws")
    p.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, eager)")
    return p.parse_args(argv)


def draw_lengths(n: int, median: float, sigma: float, lo: int, hi: int, g) -> list[int]:
    import torch
    x = torch.exp(torch.log(torch.tensor(median)) + sigma * torch.randn(n, generator=g))
    return x.round().clamp(lo, hi).long().tolist()


def make_data(n: int, vocab: int, seed: int):
    import torch
    from datasets import Dataset
    g = torch.Generator().manual_seed(seed)
    prompt = draw_lengths(n, 40, 0.6, 8, 200, g)
    resp = {s: draw_lengths(n, 150, 0.8, 20, 600, g) for s in ("chosen", "rejected")}
    ids = lambda k: torch.randint(3, vocab, (k,), generator=g).tolist()  # noqa: E731
    rows = {"prompt_input_ids": [[1] + ids(k - 1) for k in prompt]}
    for s, lens in resp.items():
        rows[f"{s}_input_ids"] = [ids(k) for k in lens]
        rows[f"{s}_token_rewards"] = [(torch.rand(k, generator=g) - 0.5).tolist() for k in lens]
        ref = [(-torch.rand(k, generator=g) * 5).tolist() for k in lens]
        rows[f"ref_{s}_token_logps"] = ref
        rows[f"ref_{s}_logps"] = [sum(r) for r in ref]
    return Dataset.from_dict(rows)


def main(argv=None) -> None:
    args = parse(argv)
    import torch
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from treg.io.data import PairCollator
    from treg.io.packing import PackedPairCollator
    from treg.stages.config import TRegConfig
    from treg.stages.trainer import TRegTrainer
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation=args.attn)
        tok = AutoTokenizer.from_pretrained(args.model)
        name = os.path.basename(os.path.normpath(args.model))
    else:
        from tiny import tiny_llama, tiny_tokenizer
        tok = tiny_tokenizer("llama3")
        model = tiny_llama(len(tok), hidden=64, layers=2)
        model.config._attn_implementation = args.attn
        name = "tiny random Llama"
    n = args.batch * (args.steps + args.warmup)
    data = make_data(n, model.config.vocab_size, args.seed)
    with tempfile.TemporaryDirectory() as out:
        cfg = TRegConfig(output_dir=out, per_device_train_batch_size=args.batch, alpha=0.25, max_length=None,
                         report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no", padding_free=True,
                         learning_rate=1e-7)
        trainer = TRegTrainer(model, args=cfg, train_dataset=data, processing_class=tok)
        trainer.create_optimizer()
        trainer.current_gradient_accumulation_steps = 1  # set by train(); training_step divides by it
        model = trainer.model.train()
        pad_id = trainer.data_collator.pad_token_id
        collators = {"padded": PairCollator(pad_id), "padding-free": PackedPairCollator(pad_id)}
        times = {k: [] for k in collators}
        tokens = {k: [0, 0] for k in collators}  # real, computed
        for step in range(args.steps + args.warmup):
            rows = [data[i] for i in range(step * args.batch, (step + 1) * args.batch)]
            order = list(collators) if step % 2 == 0 else list(reversed(collators))
            for kind in order:
                batch = collators[kind](rows)
                t0 = time.perf_counter()
                trainer.training_step(model, batch)
                trainer.optimizer.step()
                trainer.optimizer.zero_grad()
                dt = time.perf_counter() - t0
                if step >= args.warmup:
                    times[kind].append(dt)
                    real = int(batch["attention_mask"].sum())
                    computed = batch["packed_input_ids"].numel() if "packed_input_ids" in batch \
                        else batch["input_ids"].numel()
                    tokens[kind][0] += real
                    tokens[kind][1] += computed
                print(f"step {step} {kind}: {dt:.2f} s", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    lengths = [len(x) for s in ("chosen", "rejected") for x in data[f"{s}_input_ids"]]
    print(f"{name}, attn {args.attn}, {args.batch} pairs/step, median of {args.steps} steps after {args.warmup} "
          f"warm-up, threads {torch.get_num_threads()}; response lengths mean {statistics.mean(lengths):.0f}, "
          f"median {statistics.median(lengths):.0f}, max {max(lengths)}\n")
    print("| batches | step s (median) | real / computed tokens |\n|---|---:|---:|")
    for kind in collators:
        print(f"| {kind} | {med[kind]:.2f} | {tokens[kind][0] / tokens[kind][1]:.3f} |")
    print(f"| **padding-free / padded step time** (target <= 0.7) | {med['padding-free'] / med['padded']:.3f} | |")
    per_step = [f"{a / b:.3f}" for a, b in zip(times["padding-free"], times["padded"])]
    print(f"\nper-step ratios (same pairs): {', '.join(per_step)}; ratio of summed times "
          f"{sum(times['padding-free']) / sum(times['padded']):.3f}")


if __name__ == "__main__":
    main()
