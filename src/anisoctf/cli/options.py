"""Command-line options shared by several ``anisoctf`` commands (typer ``Annotated`` types).

The four-number magnification matrix is declared here once (:func:`mag_matrix_option`, with
the command's own help text) and converted once, by
:func:`anisoctf.jobs.requests.mag_matrix_rows`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = [
    "DebugOption",
    "FromJsonOption",
    "MagFromOption",
    "MagMatrix",
    "MagMatrixOption",
    "QuietOption",
    "SchedulerOption",
    "SlurmOption",
    "mag_matrix_option",
]

#: the value of ``--mag-matrix``: (M00, M01, M10, M11) or None
MagMatrix = tuple[float, float, float, float] | None

_MAG_HELP = "Magnification matrix in RELION's _rlnMagMat convention (k_true = M k_obs)."


def mag_matrix_option(help: str = _MAG_HELP) -> Any:
    """``--mag-matrix M00 M01 M10 M11`` (RELION's ``_rlnMagMat`` order) with ``help``."""
    return Annotated[
        MagMatrix,
        typer.Option("--mag-matrix", metavar="M00 M01 M10 M11", help=help, show_default=False),
    ]


#: ``--mag-matrix M00 M01 M10 M11``: RELION's ``_rlnMagMat`` convention
MagMatrixOption = mag_matrix_option()

#: ``--from-json FILE``: the matrix written by ``anisoctf aniso detect``
FromJsonOption = Annotated[
    Path | None,
    typer.Option(
        "--from-json",
        help="Take the matrix ('mag_matrix') from the JSON written by 'anisoctf aniso detect'.",
        show_default=False,
    ),
]

#: ``--mag-from FILE``: a refinement's matrices (:mod:`anisoctf.jobs.mag_from`)
MagFromOption = Annotated[
    Path | None,
    typer.Option(
        "--mag-from",
        help="Take the magnification matrix per optics group from a refinement: a RELION "
        "refined particles STAR (_rlnMagMat), a cryoSPARC particles .cs (ctf/anisomag per "
        "ctf/exp_group_id) or an anisoctf refine/detect JSON.",
        show_default=False,
    ),
]

#: ``--quiet/-q`` of the batch commands
QuietOption = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bar, warnings or summary.")
]

#: ``--debug``
DebugOption = Annotated[bool, typer.Option("--debug", help="Show tracebacks of internal errors.")]

#: ``--slurm KEY=VALUE`` (repeatable): resources of ``--scheduler slurm``
SlurmOption = Annotated[
    list[str] | None,
    typer.Option(
        "--slurm",
        metavar="KEY=VALUE",
        help="With --scheduler slurm: workers=N (SLURM jobs), cores=N (per job), memory=8GB "
        "(per job), partition=P, walltime=HH:MM:SS, account=A, config=jobqueue.yaml "
        "(dask-jobqueue), extra='--qos=x' (#SBATCH line), timeout=S, logs=DIR. Repeatable.",
        show_default=False,
    ),
]

#: ``--scheduler ADDRESS|local|slurm``
SchedulerOption = Annotated[
    str | None,
    typer.Option(
        metavar="ADDRESS",
        help="Run on Dask: a scheduler address (tcp://host:8786), 'local' for a local "
        "cluster of --jobs workers, or 'slurm' for workers submitted as SLURM jobs (see "
        "--slurm). Needs pip install 'anisoctf[dask]' ('anisoctf[slurm]' for SLURM).",
        show_default=False,
    ),
]
