"""A Fourier shell correlation curve: what the reference is worth at each resolution.

Read from a RELION post-process STAR (:mod:`anisoctf.io.postprocess_star`) or computed from two
half maps (:func:`anisoctf.refine.fsc.half_map_fsc`); used by :mod:`anisoctf.refine` to weight
the comparison of particles with the reference frequency by frequency (issue 15 item 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = ["FscCurve"]


@dataclass(frozen=True)
class FscCurve:
    """FSC per shell.

    Attributes
    ----------
    k_inv_A
        Shell frequencies (1/Å), increasing, the first one usually 0 (RELION's
        ``_rlnResolution``).
    fsc
        The FSC of each shell (RELION's ``_rlnFourierShellCorrelationCorrected`` when read
        from a post-process STAR).
    source
        Where it came from (a file name, or ``"half maps"``), for messages and summaries.
    """

    k_inv_A: NDArray[np.float64]
    fsc: NDArray[np.float64]
    source: str = ""

    def __post_init__(self) -> None:
        k = np.asarray(self.k_inv_A, dtype=np.float64)
        f = np.asarray(self.fsc, dtype=np.float64)
        if k.ndim != 1 or k.shape != f.shape or k.size < 2:
            raise ValueError("an FSC curve needs two or more shells, one FSC value per shell")
        if not (np.all(np.isfinite(k)) and np.all(np.isfinite(f))):
            raise ValueError("the FSC curve holds NaN or infinite values")
        if np.any(np.diff(k) <= 0) or k[0] < 0:
            raise ValueError("the FSC curve's frequencies must be non-negative and increasing")
        object.__setattr__(self, "k_inv_A", k)
        object.__setattr__(self, "fsc", f)

    def resolution_A(self, threshold: float = 0.143) -> float:
        """The resolution (Å) where the FSC first falls below ``threshold`` (linear between
        shells); ``inf`` if it starts below, the last shell's if it never falls."""
        k, f = self.k_inv_A, self.fsc
        below = np.flatnonzero((f < threshold) & (k > 0))
        if below.size == 0:
            return float(1.0 / k[-1])
        i = int(below[0])
        if i == 0 or k[i - 1] <= 0 and f[i - 1] < threshold:
            return float("inf")
        t = (f[i - 1] - threshold) / (f[i - 1] - f[i])
        kk = k[i - 1] + t * (k[i] - k[i - 1])
        return float(1.0 / kk) if kk > 0 else float("inf")
