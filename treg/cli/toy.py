"""the embedded toy world: build its tokenizer and checkpoint, or check a checkpoint's behaviour"""

from __future__ import annotations

import argparse

from treg.cli.util import OneLineParser, add_weights_argument
import json

from treg.errors import TregError


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="treg toy", description=__doc__)
    sub = p.add_subparsers(dest="action", required=True, metavar="{build,check}")
    b = sub.add_parser("build", help="train the toy checkpoint from scratch (deterministic)",
                       description="Train the toy tokenizer + tiny Llama by SFT on the toy world and write "
                                   "it (safetensors) atomically to --out.")
    b.add_argument("--out", default=None,
                   help="output directory (default: the shipped checkpoint inside the package, "
                        "treg/toy/assets/model)")
    b.add_argument("--steps", type=int, default=1500, help="SFT steps (default 1500, ~4-5 min on 2 cores)")
    b.add_argument("--seed", type=int, default=0, help="seed for data and weights (default 0)")
    b.add_argument("--batch-size", type=int, default=64, help="SFT batch size (default 64)")
    b.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    b.add_argument("--examples", type=int, default=30000, help="distinct SFT examples drawn (default 30000)")
    b.add_argument("--quiet", action="store_true", help="do not print the loss every 100 steps")
    c = sub.add_parser("check", help="sample from a toy checkpoint under each system prompt and verify",
                       description="Per style (better / plain / worse): digit accuracy, exact match, filler "
                                   "words per response and verifier reward of temperature-1 samples.")
    c.add_argument("--model", default=None, help="checkpoint directory (default: the shipped one)")
    c.add_argument("--prompts", type=int, default=200, help="held-out prompts per style (default 200)")
    c.add_argument("--seed", type=int, default=1234, help="seed for prompts and sampling (default 1234)")
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_weights_argument(c)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    import torch
    from treg.toy import ASSETS
    if args.action == "build":
        for name in ("steps", "batch_size", "examples"):
            if getattr(args, name) < 1:
                raise TregError("must be >= 1", field=f"--{name.replace('_', '-')}")
        from treg.toy.build import build_checkpoint
        out = args.out or str(ASSETS / "model")
        info = build_checkpoint(out, steps=args.steps, seed=args.seed, batch_size=args.batch_size, lr=args.lr,
                                n_examples=args.examples, log_every=0 if args.quiet else 100)
        print(f"toy checkpoint written to {out} ({info['parameters']:,} parameters, "
              f"final loss {info['final_loss']:.4f}, {info['train_seconds']} s)")
        return 0
    import transformers
    from treg.toy import load
    from treg.toy.behaviour import behaviour
    transformers.utils.logging.disable_progress_bar()
    model, tok = load(args.model)
    torch.set_grad_enabled(False)
    result = behaviour(model, tok, n_prompts=args.prompts, seed=args.seed)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print("| style | digit accuracy | exact match | filler / response | reward |")
    print("|---|---|---|---|---|")
    for style, r in result.items():
        print(f"| {style} | {r['digit_accuracy']:.3f} | {r['exact_match']:.3f} | "
              f"{r['filler_per_response']:.2f} | {r['reward']:.3f} |")
    return 0
