"""``treg`` command-line entry point: a thin dispatcher over one module per stage.

Each stage module in :mod:`treg.cli` exposes ``main(argv: list[str]) -> int`` and a one-line
module docstring used for ``treg --help``. Modules are imported lazily so that ``treg --help`` is
fast and a stage's heavy imports are paid only when it runs.
"""

from __future__ import annotations

import importlib
import sys


# name -> (module, one-line summary). Order is the data path.
COMMANDS: dict[str, tuple[str, str]] = {
    "sample": ("treg.cli.sample", "sample N responses per prompt from a policy"),
    "score": ("treg.cli.score", "score samples with a reward model or function; best/worst pairs"),
    "probe": ("treg.cli.probe", "pre-flight check: do token rewards carry signal on your pairs?"),
    "annotate": ("treg.cli.annotate", "token rewards by contrastive prompting (+ reference log-probs)"),
    "train": ("treg.cli.train", "train DPO/SimPO with token-level reward regularization"),
    "generate": ("treg.cli.generate", "generate outputs in AlpacaEval 2 / Arena-Hard / JSONL formats"),
    "eval": ("treg.cli.eval", "win rate of outputs over a baseline under a judge"),
    "pipeline": ("treg.cli.pipeline", "run sample -> score -> annotate -> train -> generate -> eval"),
    "show": ("treg.cli.show", "token-reward heat maps of an annotated dataset (terminal / HTML)"),
    "demo": ("treg.cli.demo", "the whole method on the embedded toy world, with a report"),
    "toy": ("treg.cli.toy", "the embedded toy world: build its tokenizer and checkpoint"),
    "model": ("treg.cli.model", "real models: fetch SmolLM2 (GGUF -> safetensors), convert any GGUF"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: treg <command> [options]   (treg <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", f"documentation: {docs_dir()} (Markdown: training.md, evaluation.md, ...)"]
    return "\n".join(lines)


def docs_dir() -> str:
    """Where the Markdown docs are: ``treg/docs`` in an installed package (copied there at build time,
    see setup.py), else the source checkout's ``docs/`` (editable install / running from the repo)."""
    from pathlib import Path
    pkg = Path(__file__).resolve().parent.parent
    for d in (pkg / "docs", pkg.parent / "docs"):
        if (d / "training.md").is_file():
            return str(d)
    return "docs/ in the treg source distribution"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from treg import __version__
        print(f"treg {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"treg: error: unknown command '{name}'\n\n{_usage()}", file=sys.stderr)
        return 2
    from treg.boundary import USER_ERRORS, describe
    from treg.io.loading import allow_pickle_weights
    allow_pickle_weights(False)  # the opt-in is per command (set by its --allow-pickle-weights)
    try:
        module = importlib.import_module(COMMANDS[name][0])
        return int(module.main(rest) or 0)
    except USER_ERRORS as err:  # the one error boundary (treg.boundary): one line, exit 2
        print(f"treg {name}: error: {describe(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"treg {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
