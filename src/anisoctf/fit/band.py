"""The spectrum pixels inside a resolution band, with everything the fit evaluates on them.

A :class:`Band` is built once per spectrum and band; the search, the refinement and the
quality measures all work on its flat arrays (no Python loops over pixels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy.interpolate import BSpline

from anisoctf.optics.ctf import FrequencyFeatures, Optics, frequency_features, frequency_grid
from anisoctf.spectrum.periodogram import Spectrum

__all__ = ["Band", "make_band", "radial_basis"]


@dataclass(frozen=True)
class Band:
    """Spectrum pixels with ``k_min <= |k_true| <= k_max``.

    Attributes
    ----------
    values
        Observed power at each pixel.
    index
        Flat indices of the pixels in the half-plane spectrum.
    rho
        ``|k_obs|`` (Å⁻¹): the detector's radial frequency (background lives here).
    rho_true
        ``|k_true|`` (Å⁻¹): the specimen's radial frequency (envelope lives here).
    theta_true
        Direction of ``k_true`` in radians, in [0, pi).
    feats
        True-frame frequency features for the CTF.
    k_min, k_max
        Band limits (Å⁻¹, true frame).
    pixel_step
        Radial frequency step of one spectrum pixel (Å⁻¹).
    """

    values: NDArray[np.float64]
    index: NDArray[np.int64]
    rho: NDArray[np.float64]
    rho_true: NDArray[np.float64]
    theta_true: NDArray[np.float64]
    feats: FrequencyFeatures
    k_min: float
    k_max: float
    pixel_step: float

    @property
    def size(self) -> int:
        """Number of pixels in the band."""
        return int(self.values.size)


def make_band(spectrum: Spectrum, optics: Optics, k_min: float, k_max: float) -> Band:
    """Collect the pixels of ``spectrum`` whose true-frame frequency lies in [k_min, k_max]."""
    box = spectrum.box
    kx, ky = frequency_grid((box, box), spectrum.pixel_size, rfft=True)
    kx, ky = np.broadcast_arrays(kx, ky)
    m = optics.M if optics.has_anisomag else np.eye(2)
    kxt = m[0, 0] * kx + m[0, 1] * ky
    kyt = m[1, 0] * kx + m[1, 1] * ky
    rt = np.hypot(kxt, kyt)
    sel = (rt >= k_min) & (rt <= k_max)
    # the kx = 0 column holds both +ky and -ky, which are the same point: keep one half
    sel[:, 0] &= ky[:, 0] >= 0
    idx = np.flatnonzero(sel)
    kx_s, ky_s = kx.ravel()[idx], ky.ravel()[idx]
    feats = frequency_features(kx_s, ky_s, m if optics.has_anisomag else None)
    kxt_s, kyt_s = kxt.ravel()[idx], kyt.ravel()[idx]
    return Band(
        values=spectrum.power.ravel()[idx].astype(np.float64),
        index=idx,
        rho=np.hypot(kx_s, ky_s),
        rho_true=rt.ravel()[idx],
        theta_true=np.mod(np.arctan2(kyt_s, kxt_s), np.pi),
        feats=feats,
        k_min=float(k_min),
        k_max=float(k_max),
        pixel_step=1.0 / (box * spectrum.pixel_size),
    )


def radial_basis(
    rho: NDArray[np.float64], k_min: float, k_max: float, n: int
) -> NDArray[np.float64]:
    """Cubic B-spline basis (``len(rho) × n``) on [k_min, k_max], knots even in sqrt(k).

    Sqrt spacing puts more flexibility at low frequency, where the background changes fast.
    """
    n = max(int(n), 4)
    degree = 3
    inner = np.linspace(np.sqrt(k_min), np.sqrt(k_max), n - degree + 1) ** 2
    t = np.concatenate([[inner[0]] * degree, inner, [inner[-1]] * degree])
    x = np.clip(rho, inner[0], inner[-1] * (1 - 1e-12))
    return BSpline.design_matrix(x, t, degree).toarray()
