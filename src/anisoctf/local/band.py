"""The frequency band of the tile profiles: where a tile still sees the rings.

A tile of extent ``L`` sees the ring oscillation at ``k`` only while the CTF's delocalisation
``τ = 2λzk`` (the distance between the image points the oscillation pairs) stays well inside it
(the window autocorrelation in :mod:`anisoctf.local.profiles`); the global fit's resolution
says where the rings fade (Rohou & Grigorieff, J. Struct. Biol. 192, 216 (2015), for the fit
resolution; Mindell & Grigorieff, J. Struct. Biol. 142, 334 (2003), for tilted specimens).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from anisoctf.fit.result import CTFEstimate, FitSettings
from anisoctf.optics.ctf import Optics
from anisoctf.spectrum.tiles import TileSpectra

__all__ = [
    "LOCAL_RES",
    "MIN_PEAK_SCORE",
    "PASS1_RES",
    "k_pass2",
    "k_rings",
    "k_window",
    "local_band",
]

#: a patch (or tile) needs at least this peak score (Δχ² against background alone) above its
#: median over the offsets to count as having rings
MIN_PEAK_SCORE = 25.0
#: resolution (Å) of the first, wide plane search (the final fit uses the whole local band)
PASS1_RES = 6.5
#: the local band reaches at least this resolution (Å) where the tiles can sample the rings
LOCAL_RES = 5.0


def k_window(optics: Optics, defocus: float, extent: float) -> float:
    """Highest frequency whose ring oscillation a tile of ``extent`` Å still sees: the
    oscillation at ``k`` pairs image points ``τ = 2λzk`` apart (the CTF's delocalisation), and
    a tapered tile keeps ``R(τ)/R(0)`` of them (modelled in the profiles); beyond
    ``τ = 0.6 extent`` that is below about a third. On the pixel grid this is finer than two
    pixels per ring period: binning by exact phase does not mind."""
    return 0.3 * extent / (optics.wavelength * max(defocus, 1000.0))


def k_rings(glob: CTFEstimate) -> float:
    """Highest frequency with rings worth fitting: a little beyond the global fit resolution,
    but never below ``1/LOCAL_RES``: the global fit's resolution understates a tilted
    micrograph's rings (the tilt blurs them in the whole-image spectrum)."""
    res = glob.fit_resolution
    k_fit = 1.1 / res if np.isfinite(res) and res > 0 else np.inf
    return max(k_fit, 1.0 / LOCAL_RES)


def k_pass2(glob: CTFEstimate, plane: NDArray, xs: NDArray, ys: NDArray, lam: float) -> float:
    """Band limit of the final pass: a little beyond the global fit resolution, unless the
    plane's defocus spread over the image would by itself have blurred the whole-image rings
    near there (phase spread ≥ 1 rad); then the tiles, each nearly at one defocus, are trusted
    further (no limit here)."""
    res = glob.fit_resolution
    if not (np.isfinite(res) and res > 0):
        return np.inf
    k_fit = 1.1 / res
    ramp = plane[1] * xs + plane[2] * ys
    spread = float(np.ptp(ramp)) if ramp.size else 0.0
    if spread <= 0:
        return k_fit
    k_tilt = np.sqrt(2.0 / (np.pi * lam * spread))  # π λ k² spread / 2 = 1
    return k_fit if k_fit < 0.8 * k_tilt else np.inf


def local_band(
    settings: FitSettings, glob: CTFEstimate, tiles: TileSpectra, optics: Optics
) -> tuple[float, float]:
    """Band of the tile profiles: the fit band, cut where a tile no longer sees the rings
    (:func:`k_window`) and where the global fit lost them (but not before ``LOCAL_RES``)."""
    k_min = 1.0 / settings.min_res
    z = max(glob.params.defocus_u, 1000.0)
    step = 1.0 / (tiles.box * tiles.pixel_size)
    k_sample = k_window(optics, z, 1.0 / step)
    k_max = min(1.0 / settings.max_res, k_sample, k_rings(glob), 0.5 / tiles.pixel_size)
    if k_max < 2.0 * k_min:
        k_max = min(2.0 * k_min, 0.5 / tiles.pixel_size)
    return k_min, k_max
