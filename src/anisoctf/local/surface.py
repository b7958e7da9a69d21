"""The defocus surface of a micrograph: a plane (specimen tilt) plus a smooth residual.

Coordinates are micrograph pixels of the observed image: ``x`` = column, ``y`` = row, pixel
``(0, 0)`` at the centre of the first pixel (RELION's ``rlnCoordinateX/Y`` up to that half-pixel
convention, which is far below the surface's resolution). The surface is

    D(x, y) = d0 + gx (x − cx) + gy (y − cy) + R(x, y)

with ``(cx, cy) = (nx / 2, ny / 2)``, ``d0`` the mean defocus at the centre (Å, true frame),
``(gx, gy)`` in Å of defocus per pixel, and ``R`` a tensor-product uniform cubic B-spline over
the image (zero when the patches do not support one). The surface is a plain record that
round-trips through a small JSON document (:meth:`DefocusSurface.to_dict`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["DefocusSurface", "bspline_basis", "fit_residual_spline"]

SURFACE_FORMAT = "anisoctf-defocus-surface"
SURFACE_VERSION = 1


def bspline_basis(x: ArrayLike, lo: float, hi: float, n: int) -> NDArray[np.float64]:
    """Uniform cubic B-spline basis (``len(x) × n``, ``n ≥ 4``) on ``[lo, hi]``; points outside
    are clamped to the interval. Each row sums to one."""
    x = np.atleast_1d(np.asarray(x, dtype=np.float64))
    n = max(int(n), 4)
    h = (hi - lo) / (n - 3)
    t = (np.clip(x, lo, hi) - lo) / h
    i = np.minimum(t.astype(np.int64), n - 4)
    f = t - i
    f2, f3 = f * f, f * f * f
    out = np.zeros((x.size, n))
    r = np.arange(x.size)
    out[r, i] = (1.0 - f) ** 3 / 6.0
    out[r, i + 1] = (3.0 * f3 - 6.0 * f2 + 4.0) / 6.0
    out[r, i + 2] = (-3.0 * f3 + 3.0 * f2 + 3.0 * f + 1.0) / 6.0
    out[r, i + 3] = f3 / 6.0
    return out


@dataclass(frozen=True)
class DefocusSurface:
    """Mean defocus (Å, true frame) as a function of micrograph pixel position.

    Attributes
    ----------
    shape
        ``(ny, nx)`` of the micrograph in pixels.
    d0
        Defocus at the image centre ``(nx / 2, ny / 2)`` (Å) from the plane.
    gx, gy
        Plane gradient in Å of defocus per pixel along x (columns) and y (rows).
    coef
        Residual spline coefficients, shape ``(n_y, n_x)``; empty for a plane.
    """

    shape: tuple[int, int]
    d0: float
    gx: float
    gy: float
    coef: NDArray[np.float64] = field(default_factory=lambda: np.zeros((0, 0)))

    @property
    def centre(self) -> tuple[float, float]:
        """``(cx, cy)`` in pixels."""
        return 0.5 * self.shape[1], 0.5 * self.shape[0]

    def plane(self, x: ArrayLike, y: ArrayLike) -> NDArray[np.float64]:
        """The plane part at pixel positions ``(x, y)``."""
        cx, cy = self.centre
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        return self.d0 + self.gx * (x - cx) + self.gy * (y - cy)

    def residual(self, x: ArrayLike, y: ArrayLike) -> NDArray[np.float64]:
        """The smooth residual part at pixel positions ``(x, y)`` (0 without a spline)."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        x, y = np.broadcast_arrays(x, y)
        if self.coef.size == 0:
            return np.zeros(x.shape)
        ny, nx = self.shape
        bx = bspline_basis(x.ravel(), 0.0, float(nx), self.coef.shape[1])
        by = bspline_basis(y.ravel(), 0.0, float(ny), self.coef.shape[0])
        return np.einsum("pi,ij,pj->p", by, self.coef, bx).reshape(x.shape)

    def __call__(self, x: ArrayLike, y: ArrayLike) -> NDArray[np.float64]:
        """Defocus (Å) at pixel positions ``(x, y)``."""
        return self.plane(x, y) + self.residual(x, y)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (see docs/local.md for the format)."""
        return {
            "shape": [int(self.shape[0]), int(self.shape[1])],
            "d0": float(self.d0),
            "gx": float(self.gx),
            "gy": float(self.gy),
            "spline": [[float(v) for v in row] for row in self.coef],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DefocusSurface:
        """Inverse of :meth:`to_dict` (raises KeyError/ValueError/TypeError on bad input)."""
        shape = tuple(int(v) for v in d["shape"])
        if len(shape) != 2 or min(shape) <= 0:
            raise ValueError(f"bad surface shape {d['shape']!r}")
        coef = np.asarray(d.get("spline") or np.zeros((0, 0)), dtype=np.float64)
        if coef.size and (coef.ndim != 2 or min(coef.shape) < 4):
            raise ValueError("spline coefficients must be a 2D array of at least 4x4")
        if coef.size == 0:
            coef = np.zeros((0, 0))
        vals = [float(d["d0"]), float(d["gx"]), float(d["gy"])]
        if not all(np.isfinite(vals)) or not np.all(np.isfinite(coef)):
            raise ValueError("non-finite surface values")
        return cls(shape=(shape[0], shape[1]), d0=vals[0], gx=vals[1], gy=vals[2], coef=coef)


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
