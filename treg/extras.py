"""Optional dependencies: each is an extra of the ``treg`` package (``pip install 'treg[EXTRA]'``).

:func:`require` imports an optional module or stops with one line naming the extra that installs it
(a :class:`~treg.errors.TregError`: exit 2, no traceback).
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from treg.errors import TregError

# import name -> extra of pyproject.toml that installs it
EXTRAS = {"matplotlib": "plots", "vllm": "vllm", "deepspeed": "deepspeed", "wandb": "wandb",
          "liger_kernel": "liger", "peft": "peft"}


def install_hint(module: str, extra: str | None = None) -> str:
    extra = extra or EXTRAS.get(module.split(".")[0])
    return f"pip install 'treg[{extra}]'" if extra else f"pip install {module.split('.')[0]}"


def available(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, extra: str | None = None, *, what: str | None = None) -> ModuleType:
    """``import module``, or a one-line :class:`TregError` naming the extra (``what``: who needs it)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        who = f"{what} needs" if what else "needs"
        raise TregError(f"{who} the optional package '{module.split('.')[0]}': {install_hint(module, extra)}") \
            from None
