"""``anisoctf convert``: the magnification matrix and optics-group numbers between tools.

    anisoctf convert mag --relion M00 M01 M10 M11      (or --cryosparc / --cistem / --motioncor2)
    anisoctf convert mag --from particles.star         (every group of a refinement's output)
    anisoctf convert group --relion 3                  (→ cryoSPARC exp_group_id 2)

The work is :mod:`anisoctf.jobs.convert`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from anisoctf.cli.errors import usage_exit
from anisoctf.errors import AnisoctfError
from anisoctf.jobs.convert import (
    cryosparc_group,
    mag_forms,
    mag_forms_text,
    matrix_from_form,
    relion_group,
    source_forms_text,
)

convert_app = typer.Typer(
    help="Convert the magnification matrix and optics-group numbers between RELION, "
    "cryoSPARC, cisTEM and MotionCor2.",
    no_args_is_help=True,
)

_Four = tuple[float, float, float, float] | None
_Three = tuple[float, float, float] | None


@convert_app.command("mag")
def mag_command(
    relion: Annotated[
        _Four,
        typer.Option("--relion", help="_rlnMagMat00 01 10 11 .", show_default=False),
    ] = None,
    cryosparc: Annotated[
        _Four,
        typer.Option("--cryosparc", help="ctf/anisomag, 4 values row-major.", show_default=False),
    ] = None,
    cistem: Annotated[
        _Three,
        typer.Option(
            "--cistem", help="ANGLE MAJOR MINOR (mag_distortion_correct).", show_default=False
        ),
    ] = None,
    motioncor2: Annotated[
        _Three,
        typer.Option("--motioncor2", help="MAJOR MINOR ANGLE (-Mag).", show_default=False),
    ] = None,
    source: Annotated[
        Path | None,
        typer.Option(
            "--from",
            help="Every matrix of a refined STAR, particles .cs or JSON.",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """Print a magnification matrix in every tool's form (k_true = M k_obs in RELION's)."""
    given = {
        k: v
        for k, v in (
            ("relion", relion),
            ("cryosparc", cryosparc),
            ("cistem", cistem),
            ("motioncor2", motioncor2),
        )
        if v is not None
    }
    if len(given) + (source is not None) != 1:
        usage_exit("give exactly one of --relion, --cryosparc, --cistem, --motioncor2, --from")
    try:
        if source is not None:
            lines = source_forms_text(str(source))
            print("\n".join(lines))
            return
        ((form, values),) = given.items()
        m = matrix_from_form(form, values)
    except AnisoctfError as exc:
        usage_exit(exc)
    if as_json:
        print(json.dumps({"mag_matrix": [list(r) for r in m.matrix], **mag_forms(m)}, indent=2))
    else:
        print("\n".join(mag_forms_text(m)))


@convert_app.command("group")
def group_command(
    relion: Annotated[
        int | None, typer.Option("--relion", help="RELION _rlnOpticsGroup (1-based).")
    ] = None,
    cryosparc: Annotated[
        int | None, typer.Option("--cryosparc", help="cryoSPARC ctf/exp_group_id (0-based).")
    ] = None,
) -> None:
    """Convert an optics-group number: RELION group n is cryoSPARC exp_group_id n - 1."""
    if (relion is None) == (cryosparc is None):
        usage_exit("give exactly one of --relion N and --cryosparc N")
    try:
        if relion is not None:
            print(f"cryosparc ctf/exp_group_id {cryosparc_group(relion)}")
        else:
            assert cryosparc is not None
            print(f"relion _rlnOpticsGroup {relion_group(cryosparc)}")
    except AnisoctfError as exc:
        usage_exit(exc)
