"""Exceptions that carry a one-line message for the user.

Every error that bad input can cause is raised as an :class:`AnisoctfError` subclass whose
``str()`` is a single line naming the file (when there is one) and what to do about it. The CLI
prints that line and goes on with the rest of the batch; it never shows a traceback for these.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["AnisoctfError", "FitError", "InputError", "UsageError"]


class AnisoctfError(Exception):
    """Base class: an error whose message is meant for the user, on one line."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        message = " ".join(str(message).split())  # one line, always
        super().__init__(f"{self.path}: {message}" if self.path else message)


class InputError(AnisoctfError):
    """A file or argument that cannot be used as given (unreadable, truncated, NaN, ...)."""


class FitError(AnisoctfError):
    """The CTF fit could not find a trustworthy answer (e.g. rings outside the search range)."""


class UsageError(AnisoctfError):
    """The command line (or the input list) cannot be used as given: exit status 2."""
