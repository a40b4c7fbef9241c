"""generate outputs in AlpacaEval 2 / Arena-Hard / JSONL formats (one response per prompt)."""

from __future__ import annotations

import argparse

from treg.cli.util import OneLineParser, add_generation_arguments
from treg.io.formats import OUTPUT_FORMATS


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="treg generate", description=__doc__,
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="policy: local dir or hub name")
    p.add_argument("--prompts", required=True, help="prompts: AlpacaEval set (instruction), Arena-Hard "
                   "question.jsonl (turns), or any prompt file/dir/hub dataset")
    p.add_argument("--output", required=True, help="output file (a <file>.treg_meta.json is written beside it)")
    p.add_argument("--format", choices=list(OUTPUT_FORMATS), default="jsonl",
                   help="; ".join(f"{name}: {f.doc}" for name, f in OUTPUT_FORMATS.items()))
    p.add_argument("--generator", default=None, help="model name written into the file (default: model dir name)")
    add_generation_arguments(p, temperature=0.0, top_p=1.0,
                             temperature_help="0 = greedy; > 0 = seeded sampling")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from treg.stages.evaluation import generate
    meta = generate(args.model, args.prompts, args.output, fmt=args.format, generator=args.generator,
                    temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                    seed=args.seed, batch_size=args.batch_size, prompt_column=args.prompt_column,
                    split=args.split, limit=args.limit, dtype=args.dtype,
                    use_chat_template=not args.no_chat_template, progress=not args.no_progress,
                    backend=args.backend, tensor_parallel_size=args.tensor_parallel_size,
                    gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len)
    print(f"treg generate: {meta['prompts']} outputs ({meta['truncated']} hit --max-new-tokens) -> "
          f"{args.output} [{args.format}]")
    return 0
