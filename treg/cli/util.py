"""Small pieces every stage CLI shares: one-line argument errors and early checks of local paths."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from treg.errors import TregError


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes (unknown or misspelled option, missing or invalid value) are a
    TregError: one line and exit 2 through the CLI instead of a usage dump. ``--help`` is unchanged."""

    def error(self, message):
        raise TregError(f"{message} (see {self.prog} --help)")


def check_local_path(path: str, field: str | None = None, *, what: str = "file or directory") -> None:
    """A missing path that cannot be a hub id (``./x``, ``/x``, ``~/x``, ``a/b/c``, ``x.jsonl``) is a
    one-line error at once, instead of minutes of hub retries that end in a long message."""
    p = str(path)
    looks_local = p.startswith((".", "/", "~")) or p.count("/") > 1 or p.endswith((".json", ".jsonl", ".parquet"))
    if looks_local and not os.path.exists(os.path.expanduser(p)):
        raise TregError(f"no such {what}", file=p, field=field)
    if os.path.exists(os.path.expanduser(p)):
        from treg.io.zoo import refuse_gguf
        refuse_gguf(p, field)  # a GGUF file or a directory of GGUF: one line naming treg model convert-gguf


def add_generation_arguments(p: argparse.ArgumentParser, *, temperature: float, top_p: float,
                             temperature_help: str) -> None:
    """Options shared by ``treg sample`` and ``treg generate``: decoding, backend and prompt source."""
    p.add_argument("--temperature", type=float, default=temperature, help=temperature_help)
    p.add_argument("--top-p", type=float, default=top_p, help="nucleus sampling mass")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="maximum tokens per response")
    p.add_argument("--seed", type=int, default=0, help="base seed; each response gets its own seed from it")
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf",
                   help="hf: batched transformers generate (CPU/CUDA); vllm: needs the vllm package")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="GPUs of the one vLLM engine (vllm backend; e.g. 8 on an 8-GPU node)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per generate call (hf backend)")
    p.add_argument("--prompt-column", default=None,
                   help="prompt column (default: first of prompt, messages, instruction, turns)")
    p.add_argument("--split", default="train", help="split for datasets dirs with splits and hub datasets")
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--no-chat-template", action="store_true",
                   help="plain 'Role:' text format instead of the tokenizer's chat template")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_device(device: str, field: str = "device") -> None:
    """TregError unless ``device`` names a torch device usable on this machine (``cuda`` without a GPU,
    a typo such as ``cpux``)."""
    import torch
    try:
        torch.empty(0, device=torch.device(device))
    except (RuntimeError, ValueError, AssertionError) as err:
        reason = (str(err).strip().splitlines() or ["unknown device"])[0]
        raise TregError(f"device '{device}' is not usable here ({reason})", field=field) from None


def process_state(device: str | None = None):
    """accelerate's ``PartialState`` for this process, initialised before any stage code asks for it.

    Under ``accelerate launch`` on a machine without a GPU (or with ``--device cpu``) the processes must
    join a CPU (gloo) process group; ``PartialState()`` alone would leave each process thinking it is
    alone. The state is a singleton, so later ``PartialState()`` calls see this one."""
    import torch
    from accelerate import PartialState
    return PartialState(cpu=device == "cpu" or not torch.cuda.is_available())


def read_yaml_mapping(path: str, *, what: str = "config file") -> dict:
    """A YAML file holding a mapping (``{}`` when empty); TregError on a missing file, bad YAML (with the
    line) or a top level that is not a mapping."""
    import yaml
    p = Path(path)
    if not p.is_file():
        raise TregError(f"no such {what}", file=path)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise TregError(f"invalid YAML{where}", file=path) from None
    if not isinstance(data, dict):
        raise TregError("expected a mapping of option: value", file=path)
    return data
