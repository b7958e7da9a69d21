"""A defocus table: the per-row CTF of a RELION or cryoSPARC table, as plain arrays.

The formats layer (:mod:`anisoctf.io.relion_defocus`, :mod:`anisoctf.io.cryosparc_defocus`)
fills it from a STAR table or a ``.cs`` dataset and writes it back; the science
(:mod:`anisoctf.magnification.tables`) moves it between the observed and the true frame.
Units follow RELION: defocus in Å (underfocus positive), the U-axis angle in degrees.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import NDArray

__all__ = ["DefocusTable"]


@dataclass(frozen=True, eq=False)
class DefocusTable:
    """Per-row defocus of a table (one entry per row, in file order).

    Parameters
    ----------
    defocus_u, defocus_v
        Defocus along the major and minor axes (Å). Rows that are not to be rewritten may hold
        NaN.
    angle_deg
        Angle of the U axis (degrees).
    group
        Optics group (RELION) or exposure group (cryoSPARC) of every row; 1 when the table has
        none.
    micrograph
        The micrograph of every row (a name or a uid), for the shared-astigmatism step; None
        when the table does not say.
    """

    defocus_u: NDArray[np.float64]
    defocus_v: NDArray[np.float64]
    angle_deg: NDArray[np.float64]
    group: NDArray[np.int64]
    micrograph: NDArray | None = None

    def __post_init__(self) -> None:
        n = len(self.group)
        for name in ("defocus_u", "defocus_v", "angle_deg"):
            size = len(getattr(self, name))
            if size != n:
                raise ValueError(f"DefocusTable.{name} has {size} rows, not {n}")
        if self.micrograph is not None and len(self.micrograph) != n:
            raise ValueError(f"DefocusTable.micrograph has {len(self.micrograph)} rows, not {n}")

    def __len__(self) -> int:
        return len(self.group)

    def with_defocus(
        self, u: NDArray[np.float64], v: NDArray[np.float64], angle_deg: NDArray[np.float64]
    ) -> DefocusTable:
        """The same rows with new defocus values."""
        return replace(self, defocus_u=u, defocus_v=v, angle_deg=angle_deg)
