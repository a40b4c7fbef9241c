"""Reference-pass benchmark: TRegTrainer.__init__ time computing reference log-probs (and, with --alpha > 0,
in-trainer token rewards) vs a second run that re-uses the on-disk cache (treg.stages.reference).

    python benchmarks/bench_reference.py                                          # random-init Llama, CPU
    python benchmarks/bench_reference.py --model "$(treg model path smollm2-135m-instruct)" --pairs 32

Prints one line per run: seconds in __init__, model forward calls, sequences and tokens scored.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model directory (default: a random-init Llama, --hidden)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size of the random-init Llama")
    p.add_argument("--pairs", type=int, default=128, help="pairs")
    p.add_argument("--alpha", type=float, default=0.0, help="> 0: token rewards computed in the same pass")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tiny import tiny_llama, tiny_tokenizer
    from test_recipes_scaled import text_pairs
    from treg.stages.config import TRegConfig
    from treg.stages.trainer import TRegTrainer
    tok = AutoTokenizer.from_pretrained(args.model) if args.model else tiny_tokenizer("llama3")
    data = text_pairs(tok, args.pairs)
    n_tok = sum(len(r["prompt_input_ids"]) * 2 + len(r["chosen_input_ids"]) + len(r["rejected_input_ids"])
                for r in data)
    with tempfile.TemporaryDirectory() as out:
        for run in ("first", "cached"):
            model = (AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32) if args.model else
                     tiny_llama(len(tok), hidden=args.hidden, layers=4, heads=4))
            calls = []
            model.register_forward_pre_hook(lambda *a: calls.append(1))
            cfg = TRegConfig(output_dir=out, use_cpu=True, report_to="none", disable_tqdm=True, alpha=args.alpha,
                             max_steps=1)
            t0 = time.perf_counter()
            trainer = TRegTrainer(model, args=cfg, train_dataset=data, processing_class=tok)
            seconds = time.perf_counter() - t0
            info = trainer.reference_info["train"]
            print(f"{run}: __init__ {seconds:.2f} s, forwards {len(calls)}, sequences {info['sequences']}, "
                  f"tokens {info['tokens']} (data: {args.pairs} pairs, {n_tok} tokens), reused {info['reused']}",
                  flush=True)


if __name__ == "__main__":
    main()
