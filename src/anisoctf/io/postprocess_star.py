"""RELION post-process STAR files (``postprocess.star``): the FSC curve, read as
:class:`~anisoctf.records.fsc.FscCurve`.

RELION's ``relion_postprocess`` writes a ``data_fsc`` table with ``_rlnSpectralIndex``,
``_rlnResolution`` (1/Å), ``_rlnAngstromResolution`` and the FSC columns; CtfRefine (``--f``)
reads ``_rlnFourierShellCorrelationCorrected`` (the FSC corrected for the mask by phase
randomisation) and weights its comparison by it. The same column is read here.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from anisoctf.errors import InputError
from anisoctf.io.star_tables import find_table, float_column, read_star_blocks
from anisoctf.records.fsc import FscCurve

__all__ = ["FSC_CORRECTED", "RESOLUTION", "read_fsc_star"]

#: RELION's labels (``src/metadata_label.h``)
RESOLUTION = "rlnResolution"
FSC_CORRECTED = "rlnFourierShellCorrelationCorrected"
ANGSTROM_RESOLUTION = "rlnAngstromResolution"


def read_fsc_star(path: str | os.PathLike[str]) -> FscCurve:
    """The corrected FSC of a RELION post-process STAR.

    The shell frequency is ``_rlnResolution`` (1/Å), or ``1/_rlnAngstromResolution`` where
    only that is given. Raises a one-line :class:`~anisoctf.errors.InputError` naming the file
    when the table or the columns are missing, or the values are not numbers.
    """
    p = Path(path)
    blocks = read_star_blocks(p)
    hint = (
        "give the postprocess.star that relion_postprocess wrote (its data_fsc table holds "
        f"_{FSC_CORRECTED})"
    )
    name, df = find_table(p, blocks, [FSC_CORRECTED], hint, prefer=("fsc", ""))
    fsc = float_column(p, df, FSC_CORRECTED, name)
    if RESOLUTION in df.columns:
        k = float_column(p, df, RESOLUTION, name)
    elif ANGSTROM_RESOLUTION in df.columns:
        a = float_column(p, df, ANGSTROM_RESOLUTION, name)
        k = np.where(a > 0, 1.0 / np.where(a > 0, a, 1.0), 0.0)
        k[a >= 999.0] = 0.0  # RELION writes 999 Å for the origin shell
    else:
        raise InputError(
            f"data_{name} has neither _{RESOLUTION} nor _{ANGSTROM_RESOLUTION}; {hint}", path=p
        )
    order = np.argsort(k, kind="stable")
    k, fsc = k[order], fsc[order]
    if k.size < 2 or np.any(np.diff(k) <= 0):
        raise InputError(
            f"data_{name}: the FSC shells' frequencies are not distinct and increasing; {hint}",
            path=p,
        )
    return FscCurve(k_inv_A=k, fsc=fsc, source=str(p))
