"""The one way a command ends on an error: one line on stderr, then exit status 2 for bad
options or inputs (:func:`usage_exit`) or the status given (:func:`error_exit`)."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console

__all__ = ["EXIT_USAGE", "error_exit", "usage_exit"]

#: exit status of a command refused for its options or inputs (0 ok, 1 some items failed)
EXIT_USAGE = 2


def error_exit(message: object, status: int) -> NoReturn:
    """Print ``error: <message>`` as one line on stderr and end the command with ``status``.

    Whitespace (newlines included) in the message is collapsed, so a multi-line exception text
    still reads as a single line that a script can grep.
    """
    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"error: {' '.join(str(message).split())}", markup=False
    )
    raise typer.Exit(status)


def usage_exit(message: object) -> NoReturn:
    """Print ``error: <message>`` as one line on stderr and end the command with status 2
    (:data:`EXIT_USAGE`): the options or inputs cannot be used."""
    error_exit(message, EXIT_USAGE)
