"""Local defocus records: the settings, the patches, the defocus surface and the whole result.

The defocus surface of a micrograph is a plane (specimen tilt) plus a smooth residual.
Coordinates are micrograph pixels of the observed image: ``x`` = column, ``y`` = row, pixel
``(0, 0)`` at the centre of the first pixel (RELION's ``rlnCoordinateX/Y`` up to that half-pixel
convention, which is far below the surface's resolution). The surface is

    D(x, y) = d0 + gx (x − cx) + gy (y − cy) + R(x, y)

with ``(cx, cy) = (nx / 2, ny / 2)``, ``d0`` the mean defocus at the centre (Å, true frame),
``(gx, gy)`` in Å of defocus per pixel, and ``R`` a tensor-product uniform cubic B-spline over
the image (zero when the patches do not support one). The surface is a plain record that
round-trips through a small JSON document (:meth:`DefocusSurface.to_dict`; the file is
:mod:`anisoctf.io.surface`).

:func:`anisoctf.local.estimate.estimate_local` makes a :class:`LocalEstimate`; the method is
described there. These records import only numpy, so that readers, writers and reports can
use them without the science.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "DefocusSurface",
    "LocalEstimate",
    "LocalSettings",
    "PatchEstimate",
    "bspline_basis",
]


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


@dataclass(frozen=True)
class LocalSettings:
    """Options of the local estimation.

    Parameters
    ----------
    patches
        ``(nx, ny)``: patches along x (columns) and y (rows); neighbours overlap by half.
    box
        Tile size (pixels at the fitting pixel size).
    max_tilt_deg
        Largest specimen tilt searched.
    thickness
        Also estimate the sample thickness.
    max_thickness
        Largest thickness considered (Å).
    spline
        Allow a smooth residual on top of the plane.
    """

    patches: tuple[int, int] = (5, 5)
    box: int = 512
    max_tilt_deg: float = 60.0
    thickness: bool = False
    max_thickness: float = 4000.0
    spline: bool = True

    def __post_init__(self) -> None:
        if min(self.patches) < 1 or max(self.patches) > 50:
            raise ValueError(f"patches must be between 1x1 and 50x50, got {self.patches}")
        if not 0.0 <= self.max_tilt_deg < 80.0:
            raise ValueError(f"max tilt must be in [0, 80) degrees, got {self.max_tilt_deg}")


@dataclass(frozen=True)
class PatchEstimate:
    """Defocus of one patch.

    Attributes
    ----------
    x, y
        Patch centre (micrograph pixels).
    defocus
        Mean defocus at the centre (Å, true frame); NaN when the patch has no rings.
    sigma
        Standard error (Å).
    n_tiles
        Tiles that contributed.
    score
        Peak score (Δχ² over background alone).
    outlier
        True when the patch was left out of the surface (no rings, or inconsistent).
    """

    x: float
    y: float
    defocus: float
    sigma: float
    n_tiles: int
    score: float
    outlier: bool


@dataclass(frozen=True)
class LocalEstimate:
    """Result of :func:`anisoctf.local.estimate.fit_local`.

    Attributes
    ----------
    surface
        Defocus surface over the micrograph (plane + optional residual spline).
    tilt_angle, tilt_axis
        Specimen tilt (signed, degrees) and tilt axis angle ([0, 180) degrees); see
        :mod:`anisoctf.local.tilt` for the conventions.
    tilt_sigma
        Standard error of the tilt angle (degrees).
    patches
        The patch estimates (row-major: y outer, x inner).
    thickness
        Sample thickness (Å), or None when not estimated; NaN when the search ended at its
        limit (the rings do not bound it: no value, and a flag among ``warnings``).
    thickness_sigma
        Its standard error (Å); inf when the rings do not constrain it.
    astigmatism, angle_deg, phase_shift_deg
        Shared by all regions (from the global fit).
    n_tiles
        Tiles in the grid; ``tile`` their size in micrograph pixels.
    warnings
        Remarks for a person.
    """

    surface: DefocusSurface
    tilt_angle: float
    tilt_axis: float
    tilt_sigma: float
    patches: tuple[PatchEstimate, ...]
    thickness: float | None
    thickness_sigma: float
    astigmatism: float
    angle_deg: float
    phase_shift_deg: float
    n_tiles: int
    tile: int
    warnings: tuple[str, ...] = ()

    @property
    def reported_thickness(self) -> float | None:
        """The thickness as tables write it: None when not estimated, 0.0 (CTFFIND 5's "not
        estimated") when it was searched but is no value (NaN, at the search limit)."""
        if self.thickness is None:
            return None
        return float(self.thickness) if np.isfinite(self.thickness) else 0.0

    @property
    def patch_outliers(self) -> tuple[bool, ...]:
        """Each patch's outlier flag (True: left out of the surface), row-major."""
        return tuple(bool(p.outlier) for p in self.patches)

    def defocus_at(self, x: NDArray, y: NDArray) -> tuple[NDArray, NDArray, float]:
        """``(U, V, angle)`` at micrograph pixel positions (Å, Å, degrees)."""
        d = self.surface(x, y)
        h = 0.5 * self.astigmatism
        return d + h, d - h, self.angle_deg
