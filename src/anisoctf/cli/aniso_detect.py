"""``anisoctf aniso detect``: being written (registered by :mod:`anisoctf.cli.aniso`)."""

from __future__ import annotations

import typer


def detect_command() -> None:
    """Not available yet."""
    raise typer.Exit(2)
