"""User-facing errors: the CLI prints their message as one line and exits non-zero."""

from __future__ import annotations


class UserError(Exception):
    """Bad input the user can fix: the message says what is wrong and what to do."""


def first_line(err: BaseException | str) -> str:
    """The first non-empty line of an error (or of a tool's output), else the error's type name.

    Library errors often carry pages of context; the user gets the line that names the problem."""
    text = err if isinstance(err, str) else str(err)
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return "no output" if isinstance(err, str) else type(err).__name__
