"""The residual spline of a micrograph's defocus surface (plane + smooth residual).

The surface itself, :class:`DefocusSurface`, and its B-spline basis are plain records in
:mod:`anisoctf.records.local` (re-exported here); this module fits the residual spline through
the patches' departures from the plane (penalised least squares, P-spline roughness penalty:
Eilers & Marx, Statist. Sci. 11, 89 (1996)).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from anisoctf.records.local import DefocusSurface, bspline_basis

__all__ = ["DefocusSurface", "bspline_basis", "fit_residual_spline"]


def _difference_penalty(n: int) -> NDArray[np.float64]:
    d = np.diff(np.eye(n), 2, axis=0)
    return d.T @ d


def fit_residual_spline(
    x: NDArray,
    y: NDArray,
    r: NDArray,
    sigma: NDArray,
    shape: tuple[int, int],
    n_coef: tuple[int, int],
    smoothing: float = 1.0,
) -> tuple[NDArray[np.float64], float, float]:
    """Penalised least-squares spline through residuals ``r`` (Å) at pixels ``(x, y)``.

    Parameters
    ----------
    x, y, r, sigma
        Patch positions (pixels), residuals from the plane and their standard errors (Å).
    shape
        ``(ny, nx)`` of the micrograph.
    n_coef
        ``(n_y, n_x)`` coefficients (each ≥ 4).
    smoothing
        Weight of the second-difference roughness penalty (in units of the data weights).

    Returns
    -------
    coef, chi2_gain, edf
        Coefficients, drop of the weighted sum of squares against a zero residual, and the
        effective number of parameters (trace of the hat matrix).
    """
    ny, nx = shape
    by = bspline_basis(y, 0.0, float(ny), n_coef[0])
    bx = bspline_basis(x, 0.0, float(nx), n_coef[1])
    design = (by[:, :, None] * bx[:, None, :]).reshape(len(x), -1)
    w = 1.0 / np.maximum(np.asarray(sigma, dtype=np.float64), 1e-6) ** 2
    py, px = _difference_penalty(n_coef[0]), _difference_penalty(n_coef[1])
    pen = np.kron(py, np.eye(n_coef[1])) + np.kron(np.eye(n_coef[0]), px)
    # ridge keeps the coefficients of unsupported regions near zero (no wild extrapolation)
    scale = float(np.median(w)) * smoothing
    a = design.T @ (design * w[:, None]) + scale * (pen + 0.05 * np.eye(pen.shape[0]))
    coef = np.linalg.solve(a, design.T @ (w * r))
    fit = design @ coef
    gain = float(np.sum(w * r * r) - np.sum(w * (r - fit) ** 2))
    hat = design @ np.linalg.solve(a, (design * w[:, None]).T)
    return coef.reshape(n_coef), gain, float(np.trace(hat))
