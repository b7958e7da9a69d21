"""Command-line options shared by several ``anisoctf`` commands (typer ``Annotated`` types)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["FromJsonOption", "MagMatrixOption"]

#: ``--mag-matrix M00 M01 M10 M11``: RELION's ``_rlnMagMat`` convention
MagMatrixOption = Annotated[
    tuple[float, float, float, float] | None,
    typer.Option(
        "--mag-matrix",
        metavar="M00 M01 M10 M11",
        help="Magnification matrix in RELION's _rlnMagMat convention (k_true = M k_obs).",
        show_default=False,
    ),
]

#: ``--from-json FILE``: the matrix written by ``anisoctf aniso detect``
FromJsonOption = Annotated[
    Path | None,
    typer.Option(
        "--from-json",
        help="Take the matrix ('mag_matrix') from the JSON written by 'anisoctf aniso detect'.",
        show_default=False,
    ),
]
