"""Specimen tilt from the defocus plane, and back (the tilt conventions live here).

Conventions (docs/conventions.md, pinned by tests/test_local.py::test_tilt_convention_*):

* the **tilt axis angle** is the direction of the tilt axis in the image, measured from +x
  (columns) towards +y (rows), in [0, 180);
* the **tilt angle** is signed: positive when the points on the +90° side of the axis (the axis
  direction rotated by +90° from +x towards +y) are *more underfocused* (larger defocus);
* the plane is ``D = d0 + tan(tilt) · s`` with ``s`` the signed distance (Å) from the axis,
  positive on the +90° side, so its gradient is ``tan(tilt) · (−sin axis, cos axis)``;
* with a magnification matrix ``M`` (``k_true = M k_obs``) specimen positions are
  ``r_true = M^-T r_obs``, so a gradient measured on image positions ``g_obs`` is
  ``g_true = M g_obs`` on specimen positions: tilt and axis are reported in the true frame.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["gradient_from_tilt", "tilt_from_gradient"]


def tilt_from_gradient(
    gx: float, gy: float, pixel_size: float, mag_matrix: ArrayLike | None = None
) -> tuple[float, float]:
    """Tilt angle and tilt axis angle (degrees) of a defocus plane.

    Parameters
    ----------
    gx, gy
        Gradient of the defocus (Å) per micrograph pixel along x (columns) and y (rows).
    pixel_size
        Å per pixel.
    mag_matrix
        ``M`` (``k_true = M k_obs``); the angles are then those of the true specimen frame.

    Returns
    -------
    tilt_deg, axis_deg
        Signed tilt in (−90, 90) and axis in [0, 180).
    """
    g = np.array([gx, gy], dtype=np.float64) / pixel_size
    if mag_matrix is not None:
        g = np.asarray(mag_matrix, dtype=np.float64) @ g
    mag = float(np.hypot(g[0], g[1]))
    if mag == 0.0:
        return 0.0, 0.0
    beta = math.degrees(math.atan2(g[1], g[0]))  # direction of steepest increase
    axis = beta - 90.0
    tilt = math.degrees(math.atan(mag))
    axis = axis % 360.0
    if axis >= 180.0:
        axis -= 180.0
        tilt = -tilt
    if axis >= 180.0 - 1e-12:  # rounding at the wrap
        axis = 0.0
    return tilt, axis


def gradient_from_tilt(
    tilt_deg: float, axis_deg: float, pixel_size: float, mag_matrix: ArrayLike | None = None
) -> tuple[float, float]:
    """Inverse of :func:`tilt_from_gradient`: ``(gx, gy)`` in Å of defocus per pixel."""
    t = math.tan(math.radians(tilt_deg))
    a = math.radians(axis_deg)
    g = np.array([-math.sin(a), math.cos(a)]) * t
    if mag_matrix is not None:
        g = np.linalg.solve(np.asarray(mag_matrix, dtype=np.float64), g)
    g = g * pixel_size
    return float(g[0]), float(g[1])
