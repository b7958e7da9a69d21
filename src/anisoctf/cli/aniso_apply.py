"""``anisoctf aniso apply``: being written (registered by :mod:`anisoctf.cli.aniso`)."""

from __future__ import annotations

import typer


def apply_command() -> None:
    """Not available yet."""
    raise typer.Exit(2)
