"""The embedded toy world (see docs/toy.md): tasks with ground-truth token credit, its tokenizer and
the shipped tiny Llama checkpoint.

``checkpoint_path()`` is the directory that ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load, exactly as a hub model; ``template_path(mode)`` is the toy's
contrastive template file (annotate's YAML format).
"""

from __future__ import annotations

from pathlib import Path

from treg.errors import TregError

ASSETS = Path(__file__).resolve().parent / "assets"


def checkpoint_path() -> str:
    """Directory of the shipped toy checkpoint (model + tokenizer); rebuild with ``treg toy build``."""
    path = ASSETS / "model"
    if not (path / "config.json").exists():
        raise TregError("the toy checkpoint is missing; rebuild it with `treg toy build`", file=str(path))
    return str(path)


def template_path(mode: str = "instruction") -> str:
    """The toy's contrastive template file (``instruction`` or ``revision`` mode)."""
    path = ASSETS / "templates" / f"toy_{mode}.yaml"
    if not path.exists():
        raise TregError(f"no toy template for mode '{mode}'", file=str(path))
    return str(path)


def load(path: str | None = None):
    """(model, tokenizer) from a toy checkpoint directory (default: the shipped one), eval mode.

    A directory that is not a loadable checkpoint is a :class:`TregError` naming it.
    """
    from treg.io.loading import load_causal_lm, load_tokenizer
    path = str(path or checkpoint_path())
    return load_causal_lm(path, dtype="float32", field=None), load_tokenizer(path, field=None)
