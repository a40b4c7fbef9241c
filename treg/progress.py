"""Progress bars (tqdm: count, rate, ETA) for the long stages, on stderr.

Quiet when the user passes ``--no-progress`` (``enabled=False``) and when stderr is not a terminal
(logs, CI, pipes): a disabled bar accepts ``update``/``close`` and prints nothing.
"""

from __future__ import annotations

import sys


def progress_bar(total: int, desc: str, unit: str, *, enabled: bool = True):
    from tqdm import tqdm
    stream = sys.stderr
    quiet = not enabled or not (hasattr(stream, "isatty") and stream.isatty())
    return tqdm(total=total, desc=desc, unit=unit, file=stream, disable=quiet, dynamic_ncols=True)
