"""generate outputs in AlpacaEval 2 / Arena-Hard / JSONL formats (one response per prompt)."""

from __future__ import annotations

import argparse

from treg.cliutil import OneLineParser


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="treg generate", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="policy: local dir or hub name")
    p.add_argument("--prompts", required=True, help="prompts: AlpacaEval set (instruction), Arena-Hard "
                   "question.jsonl (turns), or any prompt file/dir/hub dataset")
    p.add_argument("--output", required=True, help="output file (a <file>.treg_meta.json is written beside it)")
    p.add_argument("--format", choices=["alpaca_eval", "arena_hard", "jsonl"], default="jsonl",
                   help="alpaca_eval: JSON list; arena_hard: model-answer JSONL; jsonl: treg's rows")
    p.add_argument("--generator", default=None, help="model name written into the file (default: model dir name)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 = seeded sampling")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass when sampling")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="maximum tokens per output")
    p.add_argument("--seed", type=int, default=0, help="seed when sampling")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="GPUs of the one vLLM engine (vllm backend; e.g. 8 on an 8-GPU node)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per generate call (hf backend)")
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf",
                   help="hf: batched transformers generate; vllm: needs the vllm package (one process)")
    p.add_argument("--prompt-column", default=None,
                   help="prompt column (default: first of prompt, messages, instruction, turns)")
    p.add_argument("--split", default="train", help="split for datasets dirs with splits and hub datasets")
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--no-chat-template", action="store_true", help="plain 'Role:' text format")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from treg.evaluation import generate
    meta = generate(args.model, args.prompts, args.output, fmt=args.format, generator=args.generator,
                    temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                    seed=args.seed, batch_size=args.batch_size, prompt_column=args.prompt_column,
                    split=args.split, limit=args.limit, dtype=args.dtype,
                    use_chat_template=not args.no_chat_template, progress=not args.no_progress,
                    backend=args.backend, tensor_parallel_size=args.tensor_parallel_size)
    print(f"treg generate: {meta['prompts']} outputs ({meta['truncated']} hit --max-new-tokens) -> "
          f"{args.output} [{args.format}]")
    return 0
