"""The one way a command ends on bad options or inputs: one line on stderr, exit status 2."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console

__all__ = ["EXIT_USAGE", "usage_exit"]

#: exit status of a command refused for its options or inputs (0 ok, 1 some items failed)
EXIT_USAGE = 2


def usage_exit(message: object) -> NoReturn:
    """Print ``error: <message>`` as one line on stderr and end the command with status 2.

    Whitespace (newlines included) in the message is collapsed, so a multi-line exception text
    still reads as a single line that a script can grep.
    """
    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"error: {' '.join(str(message).split())}", markup=False
    )
    raise typer.Exit(EXIT_USAGE)
