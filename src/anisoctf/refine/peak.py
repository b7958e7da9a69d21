"""Sub-grid peaks: a parabola through each row's best grid point and its two neighbours.

One helper for every grid search of :mod:`anisoctf.refine` (the per-particle defocus offsets,
the Laplace posterior of :mod:`anisoctf.refine.height_prior`, the per-micrograph offsets), so
that they interpolate, clip and treat flat rows the same way. Arrays only.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

__all__ = ["parabola_peak"]


def parabola_peak(
    y: NDArray[np.floating],
) -> tuple[NDArray[np.int64], NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """The maximum of each row of ``y`` ``(P, J)``, ``J ≥ 3``, refined by a parabola.

    Returns ``j`` (the best grid index, kept in ``1 .. J−2`` so that it has two neighbours),
    ``frac`` (the vertex's offset from ``j`` in grid steps, clipped to ``±1``; 0 where the
    three points are not concave), ``curv`` (the second difference ``y[j−1] − 2y[j] + y[j+1]``
    per step², negative at a peak) and ``top`` (``y[j]``). For a log density,
    ``1/sqrt(−curv)`` steps is the Laplace SD.
    """
    y = np.asarray(y)
    rows = np.arange(y.shape[0])
    j = np.clip(np.argmax(y, axis=1), 1, y.shape[1] - 2)
    y0, y1, y2 = y[rows, j - 1], y[rows, j], y[rows, j + 1]
    curv = np.asarray(y0 - 2 * y1 + y2, dtype=np.float64)
    ok = curv < 0
    frac = np.where(ok, 0.5 * (y0 - y2) / np.where(ok, curv, -1.0), 0.0)
    return j, np.clip(frac, -1.0, 1.0), curv, y1
