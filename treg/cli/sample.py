"""sample N responses per prompt from a policy (on-policy data, METHOD.md §6)."""

from __future__ import annotations

import argparse

from treg.cli.util import OneLineParser, add_generation_arguments, process_state


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="treg sample", description=__doc__,
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="policy to sample from: local dir or hub name")
    p.add_argument("--prompts", required=True,
                   help="prompts: .jsonl/.json/.parquet file, a datasets dir (save_to_disk) or a hub dataset name")
    p.add_argument("--output", required=True, help="output datasets directory (resumable; see docs/recipes.md)")
    p.add_argument("--n", type=int, default=5, help="responses per prompt (>= 2: a pair needs two)")
    add_generation_arguments(p, temperature=0.8, top_p=0.95, temperature_help="sampling temperature (> 0)")
    p.add_argument("--dedupe", action="store_true", help="drop rows whose prompt id repeats an earlier row "
                   "(default: a repeated id is an error)")
    p.add_argument("--shard-size", type=int, default=64, help="prompts per resumable shard")
    p.add_argument("--overwrite", action="store_true", help="replace an output made with other settings")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    state = process_state()
    from treg.stages.sampling import sample
    meta = sample(args.model, args.prompts, args.output, n=args.n, temperature=args.temperature,
                  top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed, backend=args.backend,
                  batch_size=args.batch_size, prompt_column=args.prompt_column, split=args.split,
                  shard_size=args.shard_size, overwrite=args.overwrite,
                  use_chat_template=not args.no_chat_template, dtype=args.dtype, limit=args.limit,
                  progress=not args.no_progress, dedupe=args.dedupe,
                  tensor_parallel_size=args.tensor_parallel_size,
                  gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len)
    if state.is_main_process:
        procs = f" on {state.num_processes} processes" if state.num_processes > 1 else ""
        print(f"treg sample: {meta['prompts']} prompts x {meta['n']} responses -> {args.output}{procs}")
    return 0
