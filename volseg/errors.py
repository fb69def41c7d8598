"""Errors meant for people.

A :class:`UserError` is a mistake in what the user gave (a file, a recipe value, a flag). The CLI prints its
message as one line and exits with status 2; anything else is an internal error and exits with status 1.
"""

from __future__ import annotations

from pathlib import Path


def one_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message (at most ``limit`` characters), or its class name when it
    has none: how a library's multi-line error is quoted inside a one-line message."""
    for line in str(exc).splitlines():
        line = line.strip()
        if line:
            return line if len(line) <= limit else line[: limit - 3] + "..."
    return type(exc).__name__


class UserError(Exception):
    """A problem with the user's input, reported as one line naming the file and what is wrong."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = str(path) if path is not None else None
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)
