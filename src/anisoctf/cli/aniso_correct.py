"""``anisoctf aniso correct``: being written (registered by :mod:`anisoctf.cli.aniso`)."""

from __future__ import annotations

import typer


def correct_command() -> None:
    """Not available yet."""
    raise typer.Exit(2)
