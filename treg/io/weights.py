"""Convert a model directory's pickle weights to safetensors: ``python -m treg.io.weights DIR``.

Every ``pytorch_model*.bin`` (and ``*.pt``/``*.pth``) in DIR is read with ``torch.load(weights_only=True)``,
which refuses any pickle that would run code, and written beside it as ``model*.safetensors`` (a sharded
``pytorch_model.bin.index.json`` becomes ``model.safetensors.index.json``). The pickle files are kept;
delete them once the converted model loads (treg loads safetensors only unless --allow-pickle-weights).
"""

from __future__ import annotations

import json
import pickle
import sys
import warnings
from pathlib import Path

from treg.errors import TregError
from treg.io.fsutil import atomic_file, atomic_write_text


def _target(name: str) -> str:
    stem = name.rsplit(".", 1)[0]
    return stem.replace("pytorch_model", "model", 1) + ".safetensors"


def convert(directory: str) -> list[str]:
    """Write a safetensors file for each pickle weight file of ``directory``; return their names."""
    import torch
    from safetensors.torch import save_file
    d = Path(directory)
    if not d.is_dir():
        raise TregError("no such model directory", file=directory)
    sources = sorted({f for pattern in ("pytorch_model*.bin", "*.pt", "*.pth") for f in d.glob(pattern)})
    if not sources:
        raise TregError("no pickle weights (pytorch_model*.bin, *.pt) to convert", file=directory)
    written = []
    for src in sources:
        try:
            with warnings.catch_warnings():  # torch's warning about the refused opcode: the error says it
                warnings.simplefilter("ignore")
                state = torch.load(src, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
            from treg.io.loading import _first_line
            raise TregError(f"cannot convert: {_first_line(err)}", file=str(src)) from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise TregError("not a state dict of tensors", file=str(src))
        # tied weights share storage, which safetensors refuses: give each tensor its own copy
        tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
        dest = d / _target(src.name)
        with atomic_file(dest) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        written.append(dest.name)
    index = d / "pytorch_model.bin.index.json"
    if index.is_file():
        data = json.loads(index.read_text(encoding="utf-8"))
        data["weight_map"] = {k: _target(v) for k, v in data.get("weight_map", {}).items()}
        atomic_write_text(d / "model.safetensors.index.json", json.dumps(data, indent=2) + "\n")
        written.append("model.safetensors.index.json")
    return written


def main(argv: list[str] | None = None) -> int:
    from treg.boundary import USER_ERRORS, describe
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__.strip().splitlines()[0].replace("``", "'"), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        names = convert(argv[0])
    except USER_ERRORS as err:
        print(f"treg.io.weights: error: {describe(err)}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(names)} in {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
