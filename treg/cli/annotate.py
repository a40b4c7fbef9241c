"""token rewards by contrastive prompting (+ reference log-probs) -> an annotated dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

from treg.cli.util import OneLineParser, add_weights_argument, check_device, process_state
from treg.errors import TregError
from treg.io.loading import DTYPES
from treg.method.token_rewards import TOKEN_REWARD_SOURCES


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="treg annotate",
        description="Score each response's tokens under a 'better' and a 'worse' prompt with the reference "
                    "model (r_hat = sigmoid(lp_better - lp_worse) - 0.5, METHOD.md §1) and record reference "
                    "log-probs. Resumable; runs on N processes under 'accelerate launch -m treg annotate'.")
    p.add_argument("--model", required=True, help="reference model (local dir or hub name); its tokenizer is used")
    p.add_argument("--dataset", required=True,
                   help="preference data in a TRL format: .jsonl/.json/.parquet file, a datasets directory, "
                        "or a hub dataset name")
    p.add_argument("--split", default="train", help="split for hub datasets / DatasetDict directories")
    p.add_argument("--output", required=True, help="output directory (datasets dir + treg_meta.json)")
    p.add_argument("--template", default="revision",
                   help="contrastive template: 'revision' (default), 'instruction', 'anchored' (docs/annotate.md, "
                        "'Probe') or a YAML file")
    p.add_argument("--source", default="contrastive", choices=list(TOKEN_REWARD_SOURCES),
                   help="where token rewards come from (default contrastive): " + "; ".join(
                       f"{name}: {src.doc}" for name, src in TOKEN_REWARD_SOURCES.items()))
    with_dpo = ", ".join(n for n, src in TOKEN_REWARD_SOURCES.items() if src.needs_dpo_model)
    p.add_argument("--dpo-model", default=None, help=f"DPO-trained model for --source {with_dpo} (same tokenizer)")
    p.add_argument("--beta", type=float, default=0.1, help="beta of the DPO implicit reward for --source " + ", ".join(
        n for n, src in TOKEN_REWARD_SOURCES.items() if src.uses_beta) + " (default 0.1)")
    p.add_argument("--max-length", type=int, default=None,
                   help="skip pairs whose longest scored sequence (context + response) exceeds this many "
                        "tokens (default: keep all)")
    p.add_argument("--batch-tokens", type=int, default=None,
                   help="padded tokens per forward pass (batch rows x longest row; default 2048 on CPU, "
                        "16384 on GPU: big batches are slower on CPU)")
    p.add_argument("--shard-size", type=int, default=256,
                   help="pairs per output shard (the unit of resume and of multi-process work; default 256)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="model weights dtype; auto: bfloat16 on a GPU that supports it, else float32")
    p.add_argument("--device", default=None,
                   help="torch device (default: the accelerate process device, cuda if available)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an output made with different settings (default: refuse)")
    p.add_argument("--no-chat-template", action="store_true",
                   help="use the plain 'Role:' text format instead of the tokenizer's chat template")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_weights_argument(p)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from treg.stages.annotate import annotate_to_disk, default_batch_tokens, make_config
    from treg.io.chat import ChatFormat, read_preference_rows
    from treg.io.loading import load_causal_lm, load_tokenizer, resolve_dtype

    if args.no_progress:
        import datasets
        datasets.disable_progress_bars()
    if args.shard_size < 1:
        raise TregError("must be >= 1", field="shard-size")
    if args.device is not None:
        check_device(args.device)
    state = process_state(args.device)
    device = args.device or state.device
    batch_tokens = args.batch_tokens if args.batch_tokens is not None else default_batch_tokens(device)
    cfg = make_config(template=args.template, source=args.source, beta=args.beta, max_length=args.max_length,
                      batch_tokens=batch_tokens, use_chat_template=not args.no_chat_template,
                      dpo_model=args.dpo_model)
    rows = read_preference_rows(args.dataset, split=args.split)  # all input errors before any model load
    tokenizer = load_tokenizer(args.model, field="model")
    ChatFormat(tokenizer, use_chat_template=cfg.use_chat_template, file=args.model)  # template check
    if args.dpo_model is not None:
        other = load_tokenizer(args.dpo_model, field="dpo-model")
        if other.get_vocab() != tokenizer.get_vocab():
            raise TregError("the DPO model's tokenizer differs from the reference model's", file=args.dpo_model,
                            field="dpo-model")

    def load_models():
        if args.no_progress:
            from transformers.utils import logging as hf_logging
            hf_logging.disable_progress_bar()
        model = load_causal_lm(args.model, dtype=dtype, device=device, field="model")
        dpo = load_causal_lm(args.dpo_model, dtype=dtype, device=device, field="dpo-model") if args.dpo_model else None
        return model, dpo

    dtype = str(resolve_dtype(args.dtype, device)).removeprefix("torch.")  # the dtype really used
    run_info = {"model": args.model, "dpo_model": args.dpo_model, "dtype": dtype,
                "dataset": str(args.dataset), "split": args.split}
    out = annotate_to_disk(load_models, tokenizer, rows, Path(args.output), cfg=cfg,
                           shard_size=args.shard_size, overwrite=args.overwrite, run_info=run_info,
                           file=str(args.dataset), rank=state.process_index, world_size=state.num_processes,
                           barrier=state.wait_for_everyone, progress=not args.no_progress)
    if state.is_main_process:
        from treg.io.meta import read_meta
        meta = read_meta(out)
        procs = f" on {state.num_processes} processes" if state.num_processes > 1 else ""
        print(f"annotated {meta['num_pairs']} pairs ({meta['skipped_too_long']} skipped as too long){procs} -> {out}")
    return 0
