"""``treg`` command-line entry point: a thin dispatcher over one module per stage.

Each stage module in :mod:`treg.cli` exposes ``main(argv: list[str]) -> int`` and a one-line
module docstring used for ``treg --help``. Modules are imported lazily so that ``treg --help`` is
fast and a stage's heavy imports are paid only when it runs.
"""

from __future__ import annotations

import importlib
import sys

from treg.errors import TregError

# name -> (module, one-line summary). Order is the data path.
COMMANDS: dict[str, tuple[str, str]] = {
    "sample": ("treg.cli.sample", "sample N responses per prompt from a policy"),
    "score": ("treg.cli.score", "score samples with a reward model or function; best/worst pairs"),
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
    return "\n".join(lines)


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
    try:
        module = importlib.import_module(COMMANDS[name][0])
        return int(module.main(rest) or 0)
    except TregError as err:
        print(f"treg {name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"treg {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
