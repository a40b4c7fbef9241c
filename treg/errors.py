"""The one exception type for user mistakes.

Raise :class:`TregError` for anything a user can fix (a bad file, row, field, flag). The CLI turns
it into a single line on stderr and exit status 2, never a traceback. Programming errors stay
ordinary exceptions so that they keep their traceback.
"""

from __future__ import annotations


class TregError(Exception):
    """A user-facing error: one line naming the file, row and field where possible."""

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None,
                 field: str | None = None):
        where = []
        if file is not None:
            where.append(str(file))
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field '{field}'")
        self.file, self.row, self.field = file, row, field
        self.bare_message = message
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
