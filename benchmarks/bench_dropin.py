"""Drop-in benchmark (issue 12): a TRL user's run with ``trl.DPOTrainer`` vs the same run with ``TRegTrainer``.

Same model directory (a random-init Llama with a real tokenizer), the same TRL preference dataset built in
Python (standard format, explicit prompt; strings of realistic, varied lengths), the same ``DPOConfig``;
TRL with ``precompute_ref_log_probs=True``, treg converted with ``TRegConfig.from_dpo_config(cfg,
alpha=0)`` (its reference pass: ``treg.stages.reference``). Each run is a child process timed from
trainer construction (tokenization + reference pass) to the end of ``train()``; peak memory is the
child's ``ru_maxrss``. A third run repeats treg with the same ``ref_cache_dir``: the reference pass
comes from the cache.

    python benchmarks/bench_dropin.py --tokenizer "$(treg model path smollm2-135m-instruct)"

Prints a markdown table (docs/benchmarks.md, section "drop-in").
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

from _child import report, run_child  # benchmarks/_child.py (the script's own directory is on sys.path)

WORDS = ("the model answers each question with a short and careful explanation of why this step follows from "
         "the previous one and what a reader should check next before trusting any number in it").split()


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True, help="a local model directory whose tokenizer is used")
    p.add_argument("--hidden", type=int, default=256, help="hidden size of the random-init Llama")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--pairs", type=int, default=64, help="preference pairs")
    p.add_argument("--batch", type=int, default=4, help="pairs per step")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps")
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child", default=None, choices=["trl", "treg", "treg-cached"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_dataset(n: int):
    """Standard-format pairs: prompts of 10-40 words, responses of 20-300 words (long-tailed)."""
    from datasets import Dataset
    rng = random.Random(0)

    def text(lo, hi):
        k = min(hi, max(lo, int(rng.lognormvariate(4.0, 0.8))))
        return " " + " ".join(rng.choice(WORDS) for _ in range(k))

    return Dataset.from_list([{"prompt": "Question:" + text(10, 40) + "\nAnswer:", "chosen": text(20, 300),
                               "rejected": text(20, 300)} for _ in range(n)])


def build_model_dir(args, path: str) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=2048, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)


def child(args) -> dict:
    import resource
    from trl import DPOConfig
    model_dir = os.path.join(args.workdir, "model")
    out = os.path.join(args.workdir, "trl" if args.child == "trl" else "treg")
    cfg = DPOConfig(output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=1e-5,
                    logging_steps=10**6, seed=0, save_strategy="no", report_to="none", use_cpu=True,
                    disable_tqdm=True, bf16=False, gradient_checkpointing=False, precompute_ref_log_probs=True,
                    max_length=1024)
    data = make_dataset(args.pairs)
    t0 = time.perf_counter()
    if args.child == "trl":
        from trl import DPOTrainer
        trainer = DPOTrainer(model_dir, args=cfg, train_dataset=data)
    else:
        from treg.stages.config import TRegConfig
        from treg.stages.trainer import TRegTrainer
        ours = TRegConfig.from_dpo_config(cfg, alpha=0.0)
        ours.ref_cache_dir = os.path.join(args.workdir, "ref_cache")
        trainer = TRegTrainer(model_dir, args=ours, train_dataset=data)   # the one-line switch
    t1 = time.perf_counter()
    trainer.train()
    t2 = time.perf_counter()
    return {"setup_s": t1 - t0, "total_s": t2 - t0,
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None) -> int:
    args = parse(argv)
    if args.child:
        report(child(args))
        return 0
    raw = sys.argv[1:] if argv is None else list(argv)
    work = tempfile.mkdtemp(prefix="treg-dropin-")
    build_model_dir(args, os.path.join(work, "model"))
    print(f"random-init Llama hidden={args.hidden} layers={args.layers}, tokenizer {args.tokenizer}; {args.pairs} "
          f"pairs, {args.steps} steps of {args.batch} pairs, CPU fp32\n")
    print("| run | setup s (tokenize + reference) | total s | peak RSS MiB |\n|---|---:|---:|---:|", flush=True)
    names = {"trl": "TRL 1.16 DPOTrainer (precompute_ref_log_probs)", "treg": "TRegTrainer (from_dpo_config, alpha 0)",
             "treg-cached": "TRegTrainer again (reference from the cache)"}
    res = {}
    for which, name in names.items():
        r, error = run_child(__file__, [*raw, "--workdir", work, "--child", which])
        if r is None:
            print(f"| {name} | failed: {error} | | |")
            continue
        res[which] = r
        print(f"| {name} | {r['setup_s']:.1f} | {r['total_s']:.1f} | {r['peak_mib']:.0f} |", flush=True)
    if "trl" in res and "treg" in res:
        t, o = res["trl"], res["treg"]
        print(f"| **treg / TRL** total time (target <= 1.0), peak memory (target <= 0.8) | | "
              f"{o['total_s'] / t['total_s']:.3f} | {o['peak_mib'] / t['peak_mib']:.3f} |")
    return 0 if len(res) == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
