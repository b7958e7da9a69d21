"""``anisoctf aniso apply``: write a CTF table's defocus in the true frame, with its matrix.

::

    anisoctf aniso apply TABLE (--mag-matrix M00 M01 M10 M11 | --from-json det.json |
                          --mag-from refined.star|particles.cs) --out NEW
                         [--per-particle | --shared-astigmatism] [--optics-group N ...]

``TABLE`` is a RELION STAR file (micrographs or particles, 3.0 or 3.1+ layout) or a cryoSPARC
``.cs`` file (recognised by its content). The matrix is RELION's ``_rlnMagMat``
(``k_true = M k_obs``), given as four numbers or as the ``mag_matrix`` of an
``anisoctf aniso detect`` JSON file. The job is :mod:`anisoctf.jobs.apply_tables` (what is
rewritten and what is kept there); this module parses the options and prints.

On success one summary line goes to stdout; bad input gives one ``error:`` line on stderr and
exit status 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from anisoctf.cli.errors import usage_exit
from anisoctf.cli.options import FromJsonOption, MagFromOption, MagMatrixOption
from anisoctf.errors import AnisoctfError
from anisoctf.jobs.apply_tables import (
    ApplyRequest,
    ApplySummary,
    apply_tables,
    matrix_from_options,
    refuse_not_significant,
)

__all__ = ["apply_command"]


def _summary_line(out: Path, s: ApplySummary) -> str:
    m = s.matrix
    scope = f"optics group(s) {', '.join(map(str, s.groups))}" if s.groups else "all rows"
    if s.kind == "cryosparc":
        scope = f"exposure group(s) {', '.join(map(str, s.groups))}" if s.groups else "all rows"
    line = (
        f"{out}: {s.n_rewritten} of {s.n_rows} rows rewritten into the true frame ({scope}); "
        f"anisotropy {m.anisotropy_percent:.3f} % along {m.axis_deg:.1f} deg, "
        f"scale {m.scale:.5f}"
    )
    if s.notes:
        line += "; " + "; ".join(s.notes)
    return line


def apply_command(
    table: Annotated[
        Path,
        typer.Argument(
            metavar="TABLE",
            help="RELION STAR file (micrographs or particles, 3.0 or 3.1+) or cryoSPARC .cs "
            "file with observed-frame CTF values.",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="New file to write (never the input).", show_default=False
        ),
    ],
    mag_matrix: MagMatrixOption = None,
    from_json: FromJsonOption = None,
    mag_from: MagFromOption = None,
    shared_astigmatism: Annotated[
        bool,
        typer.Option(
            "--shared-astigmatism/--per-particle",
            help="After the transform, give all particles of a micrograph the micrograph's "
            "median astigmatism (each keeps its own mean defocus); default: per particle.",
        ),
    ] = False,
    optics_group: Annotated[
        list[int] | None,
        typer.Option(
            "--optics-group",
            help="Only rewrite this optics group (cryoSPARC: ctf/exp_group_id); repeat for "
            "several. Default: all.",
            show_default=False,
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Apply a --from-json detection even when it was not significant.",
        ),
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No summary line or warnings.")
    ] = False,
) -> None:
    """Rewrite a CTF table's defocus into the true frame and store the magnification matrix.

    A --from-json detection that was not significant is refused unless --force.
    Exit status: 0 written, 2 bad options or input (one line on stderr; nothing written).
    """
    if sum(x is not None for x in (mag_matrix, from_json, mag_from)) != 1:
        usage_exit(
            "give exactly one of --mag-matrix M00 M01 M10 M11, --from-json FILE and "
            "--mag-from SOURCE"
        )
    try:
        if from_json is not None:
            refuse_not_significant(from_json, force)
        mag = matrix_from_options(mag_matrix, from_json, mag_from)
        assert mag is not None
        request = ApplyRequest(
            table=table,
            out=out,
            mag=mag,
            shared_astigmatism=shared_astigmatism,
            optics_groups=tuple(optics_group) if optics_group else None,
        )
        summary = apply_tables(request)
    except AnisoctfError as exc:
        usage_exit(str(exc))
    except OSError as exc:
        usage_exit(f"{out}: cannot write ({exc.strerror or exc})")
    if not quiet:
        err = Console(stderr=True, highlight=False, soft_wrap=True)
        for w in summary.warnings:
            err.print(f"warning: {w}", markup=False)
        Console(highlight=False, soft_wrap=True).print(_summary_line(out, summary), markup=False)
