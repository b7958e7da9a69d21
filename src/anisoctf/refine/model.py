"""The forward model of a particle image, vectorised over a batch of particles.

``X(k) = s · CTF(M k; D_p) · E(M k) · P(M k) · exp(-2πi k·(N/2 - origin)) + noise``

with ``k`` the observed half-plane frequency, ``M`` the group's magnification matrix, ``D_p``
the particle's true-frame defocus matrix, ``P`` the central slice of the reference
(:class:`~anisoctf.refine.projection.FourierProjector`) and ``s`` a per-particle scale. The CTF
formula is :mod:`anisoctf.optics.kernel`'s (batched over the particles there); this module only
shapes the particle arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from anisoctf.optics.ctf import FrequencyFeatures, Optics, frequency_features
from anisoctf.optics.kernel import chi_rad, ctf_constants, ctf_from_chi_fast
from anisoctf.refine.projection import image_frequencies

__all__ = ["GridFeatures", "batch_chi", "batch_ctf", "grid_features", "uva_to_zaa", "zaa_to_uva"]


@dataclass(frozen=True)
class GridFeatures:
    """True-frame features of an image's half-plane grid (1/Å units) and the grid itself."""

    box: int
    pixel_size: float
    kx: NDArray[np.float64]  # observed, cycles / pixel
    ky: NDArray[np.float64]
    feats: FrequencyFeatures  # true frame, 1/Å


def grid_features(box: int, pixel_size: float, mag_matrix: ArrayLike | None) -> GridFeatures:
    """Half-plane frequency grid of a ``box`` image and its true-frame CTF features."""
    kx, ky = image_frequencies(box)
    feats = frequency_features(kx / pixel_size, ky / pixel_size, mag_matrix)
    return GridFeatures(box=box, pixel_size=pixel_size, kx=kx, ky=ky, feats=feats)


def uva_to_zaa(
    u: ArrayLike, v: ArrayLike, angle_deg: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """(U, V, angle) → mean defocus ``z`` and Cartesian astigmatism ``(a1, a2)`` (arrays)."""
    u, v, t = (np.asarray(x, dtype=float) for x in (u, v, angle_deg))
    h = 0.5 * (u - v)
    t2 = np.deg2rad(2.0 * t)
    return 0.5 * (u + v), h * np.cos(t2), h * np.sin(t2)


def zaa_to_uva(
    z: ArrayLike, a1: ArrayLike, a2: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Inverse of :func:`uva_to_zaa`, normalised: U ≥ V, angle in [0, 180)."""
    z, a1, a2 = (np.asarray(x, dtype=float) for x in (z, a1, a2))
    h = np.hypot(a1, a2)
    ang = np.mod(0.5 * np.rad2deg(np.arctan2(a2, a1)), 180.0)
    ang = np.where(ang >= 180.0, 0.0, ang)
    return z + h, z - h, ang


def batch_chi(
    g: GridFeatures,
    z: ArrayLike,
    a1: ArrayLike,
    a2: ArrayLike,
    optics: Optics,
    phase_shift_deg: ArrayLike = 0.0,
) -> NDArray[np.float64]:
    """``chi`` (radians) of every particle on the grid: ``(P, box, box//2+1)`` float32."""
    z, a1, a2, ph = (
        np.atleast_1d(np.asarray(x, dtype=float)) for x in (z, a1, a2, phase_shift_deg)
    )
    z, a1, a2, ph = np.broadcast_arrays(z, a1, a2, ph)
    return chi_rad(g.feats, ctf_constants(optics), z, a1, a2, np.deg2rad(ph))


def batch_ctf(
    g: GridFeatures,
    z: ArrayLike,
    a1: ArrayLike,
    a2: ArrayLike,
    optics: Optics,
    phase_shift_deg: ArrayLike = 0.0,
    bfactor: ArrayLike = 0.0,
) -> NDArray[np.float32]:
    """The CTF (with the B-factor envelope) of every particle: ``(P, box, box//2+1)`` float32."""
    x = batch_chi(g, z, a1, a2, optics, phase_shift_deg)
    out = ctf_from_chi_fast(x, ctf_constants(optics))
    b = np.atleast_1d(np.asarray(bfactor, dtype=float))
    if np.any(b != 0):
        b = np.broadcast_to(b, (out.shape[0],))
        out *= np.exp(-0.25 * b[:, None, None] * g.feats.k2[None]).astype(np.float32)
    return out
