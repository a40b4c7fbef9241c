"""treg: preference optimization with token-level reward regularization (T-REG).

The objective lives in :mod:`treg.method.losses` (pure tensor math, METHOD.md §2-§4).
The data path is ``sample -> score -> annotate -> train -> generate/eval``; each stage is one
module with a documented data contract (``docs/``) and a thin CLI (``treg <stage> --help``).
"""

__version__ = "0.1.0"

from treg.errors import TregError  # noqa: E402

__all__ = ["TregError", "__version__"]
