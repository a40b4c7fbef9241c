"""pre-flight check: do the token rewards carry signal on your pairs? (planted-corruption AUROC)"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from treg.cli.util import OneLineParser, check_device
from treg.errors import TregError
from treg.io.loading import DTYPES
from treg.method.corrupt import STRATEGIES
from treg.method.token_rewards import TOKEN_REWARD_SOURCES

PROBED = [name for name, src in TOKEN_REWARD_SOURCES.items() if src.needs_model]  # a data-only rule has no signal
WITH_DPO = [name for name in PROBED if TOKEN_REWARD_SOURCES[name].needs_dpo_model]


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="treg probe",
        description="Plant known corruptions (a swapped number or name, a negation, an off-topic sentence) into "
                    "the chosen responses of your pairs and report, per template/source, the AUROC of the "
                    "planted tokens ranked below the rest (bootstrap CI), chosen-vs-rejected agreement of "
                    "summed rewards, and baselines (reference surprisal, random), with a verdict.")
    p.add_argument("--model", required=True, help="reference model (local dir or hub name), as for treg annotate")
    p.add_argument("--dataset", required=True, help="preference data in a TRL format (as treg annotate reads)")
    p.add_argument("--split", default="train", help="split for hub datasets / DatasetDict directories")
    p.add_argument("--template", nargs="+", default=["revision"],
                   help="contrastive template(s): revision (default), instruction, anchored or YAML files")
    p.add_argument("--source", nargs="+", default=["contrastive"], choices=PROBED,
                   help=f"reward source(s) to probe ({', '.join(WITH_DPO)} needs --dpo-model)")
    p.add_argument("--dpo-model", default=None, help=f"DPO-trained model for --source {', '.join(WITH_DPO)}")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES,
                   help="corruptions to plant, one per pair, tried in a seeded order (default: all; those "
                        "that do not apply to a response are skipped)")
    p.add_argument("--n-pairs", type=int, default=100, help="pairs to probe (drawn with --seed; default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the corruptions, the draw and the bootstrap")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs (default 1000)")
    p.add_argument("--min-auroc", type=float, default=0.6,
                   help="AUROC at or above which (with the CI above 0.5) rewards 'carry signal' (default 0.6)")
    p.add_argument("--max-length", type=int, default=None, help="skip pairs longer than this (as annotate)")
    p.add_argument("--batch-tokens", type=int, default=None, help="padded tokens per forward (as annotate)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="model weights dtype; auto: bfloat16 on a GPU that supports it, else float32")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-chat-template", action="store_true", help="plain 'Role:' format (as annotate)")
    p.add_argument("--json", default=None, help="write the full report (JSON) to this file")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    import torch
    from treg.io.loading import load_causal_lm, load_tokenizer
    from treg.io.chat import ChatFormat, read_preference_rows
    from treg.method.templates import load_template
    from treg.stages.annotate import default_batch_tokens
    from treg.stages.probe import report_text, run_probe

    for name in ("n_pairs", "bootstrap"):
        if getattr(args, name) < 1:
            raise TregError("must be >= 1", field=name.replace("_", "-"))
    if not 0.0 <= args.min_auroc <= 1.0:
        raise TregError("must be between 0 and 1", field="min-auroc")
    if any(s in WITH_DPO for s in args.source) != (args.dpo_model is not None):
        raise TregError(f"--source {', '.join(WITH_DPO)} and --dpo-model go together", field="dpo-model")
    if args.device is not None:
        check_device(args.device)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if any(TOKEN_REWARD_SOURCES[s].needs_template for s in args.source):
        for t in args.template:
            load_template(t)  # template errors before any model load
    rows = read_preference_rows(args.dataset, split=args.split)
    tokenizer = load_tokenizer(args.model, field="model")
    ChatFormat(tokenizer, use_chat_template=not args.no_chat_template, file=args.model)  # template check

    def load_models():
        model = load_causal_lm(args.model, dtype=args.dtype, device=device, field="model")
        dpo = load_causal_lm(args.dpo_model, dtype=args.dtype, device=device, field="dpo-model") if args.dpo_model else None
        return model, dpo

    report = run_probe(load_models, tokenizer, rows, templates=args.template, sources=args.source,
                       strategies=args.strategies, n_pairs=args.n_pairs, seed=args.seed, bootstrap=args.bootstrap,
                       min_auroc=args.min_auroc, max_length=args.max_length,
                       batch_tokens=args.batch_tokens or default_batch_tokens(device),
                       use_chat_template=not args.no_chat_template, file=str(args.dataset))
    report.update(model=args.model, dataset=str(args.dataset))
    print(report_text(report))
    if args.json:
        from treg.io.fsutil import atomic_write_text
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, json.dumps(report, indent=2))
    return 0
