"""``anisoctf assign``: per-particle defocus from the micrographs' defocus surfaces (thin CLI)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from anisoctf.errors import AnisoctfError
from anisoctf.jobs.assign_particles import run_assign

__all__ = ["assign_command"]


def assign_command(
    particles: Annotated[
        Path,
        typer.Argument(
            metavar="PARTICLES.star",
            help="RELION particles STAR file with _rlnMicrographName and _rlnCoordinateX/Y.",
            show_default=False,
        ),
    ],
    ctf: Annotated[
        Path,
        typer.Option(
            "--ctf",
            help="Output folder of `anisoctf estimate --patches` (micrographs_ctf.star and the "
            "*_surface.json files).",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="The new particles STAR file.", show_default=False)
    ],
) -> None:
    """Give every particle the defocus of its micrograph's surface at its coordinates.

    Only _rlnDefocusU/V/Angle (and _rlnCtfAstigmatism) change; every other column is copied
    as it was. Exit status: 0 all particles assigned, 1 some had no estimate, 2 bad input.
    """
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        s = run_assign(particles, ctf, out)
    except AnisoctfError as exc:
        err.print(f"error: {' '.join(str(exc).split())}", markup=False)
        raise typer.Exit(2) from None
    line = (
        f"{out}: {s.n_particles} particles; {s.n_from_surface} from a defocus surface, "
        f"{s.n_from_global} from a micrograph's global defocus (no surface)"
    )
    Console(highlight=False, soft_wrap=True).print(line, markup=False)
    for note in s.notes:
        err.print(f"note: {note}", markup=False)
    if s.n_missing:
        shown = ", ".join(s.missing_micrographs[:5])
        more = (
            f" and {len(s.missing_micrographs) - 5} more" if len(s.missing_micrographs) > 5 else ""
        )
        err.print(
            f"warning: {s.n_missing} particle(s) from {len(s.missing_micrographs)} micrograph(s) "
            f"without a CTF estimate kept their values: {shown}{more}",
            markup=False,
        )
        raise typer.Exit(1)
