"""The one error boundary of the ``treg`` CLI: what escapes a command becomes one line and exit 2.

:func:`describe` turns the errors a user can fix without reading code into ``<path>: <reason>``:
:class:`treg.errors.TregError` (already a sentence), ``OSError`` and its kin (a missing, unreadable or
read-only path, a directory where a file belongs, a full disk or a file-size limit, a launcher that
does not exist) and ``UnicodeDecodeError`` (an input file that is not UTF-8). Programming errors stay
ordinary exceptions with their traceback. Temporary files of a failed write are removed by the atomic
writers themselves (:mod:`treg.io.fsutil`), so a pre-existing output is left as it was.
"""

from __future__ import annotations

import errno
import os
import re

from treg.errors import TregError

USER_ERRORS = (TregError, OSError, UnicodeDecodeError)
_REASONS = {  # clearer than strerror where the cause is not obvious
    errno.EFBIG: "file too large (a file-size limit, e.g. ulimit -f, was reached while writing)",
    errno.ENOSPC: "no space left on the device",
    errno.EROFS: "read-only file system",
}


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "unknown error"


def os_error_of(err: BaseException, path: str) -> OSError | None:
    """The ``OSError`` hidden in a native library's error (safetensors, tokenizers: ``... (os error 27)``),
    naming ``path``; None when ``err`` is no I/O error."""
    if isinstance(err, OSError):
        return err
    match = re.search(r"\(os error (\d+)\)", str(err))
    return OSError(int(match.group(1)), os.strerror(int(match.group(1))), path) if match else None


def describe(err: BaseException) -> str:
    """``<path>: <reason>`` (or the TregError's own message) on one line."""
    if isinstance(err, TregError):
        return _one_line(str(err))
    if isinstance(err, UnicodeDecodeError):
        return _one_line(f"not valid UTF-8 at byte offset {err.start} ({err.reason})")
    assert isinstance(err, OSError)
    reason = _REASONS.get(err.errno) or err.strerror or str(err) or type(err).__name__
    paths = [str(p) for p in (err.filename, err.filename2) if p is not None]
    return _one_line(f"{' -> '.join(paths)}: {reason}" if paths else reason)
