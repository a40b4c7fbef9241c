"""run sample -> score -> annotate -> train -> generate -> eval from one YAML config, skipping stages
whose outputs are complete with a matching fingerprint (format: docs/recipes.md)."""

from __future__ import annotations

import argparse

from treg.cli.util import OneLineParser


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="treg pipeline", description=__doc__)
    p.add_argument("--config", required=True, help="pipeline YAML (see configs/*/pipeline.yaml)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and what would be skipped; run nothing")
    p.add_argument("--force", nargs="*", default=[], metavar="STAGE",
                   help="rerun these stages even if complete (e.g. train, generate:alpaca)")
    p.add_argument("--until", default=None, metavar="STAGE", help="stop after this stage")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from treg.stages.pipeline import describe, load_config, plan, run_pipeline
    if args.dry_run:
        print("treg pipeline: planned commands\n" + describe(plan(load_config(args.config))))
    done = run_pipeline(args.config, dry_run=args.dry_run, force=tuple(args.force), until=args.until)
    ran = sum(1 for _, action, _ in done if action == "run")
    verb = "would run" if args.dry_run else "ran"
    print(f"treg pipeline: {verb} {ran} stage(s), skipped {len(done) - ran}")
    return 0
