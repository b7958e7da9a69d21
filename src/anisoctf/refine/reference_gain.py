"""The reference's radial gain: each resolution shell of the prediction scaled to the data's.

A reference that was low-pass filtered (FSC-weighted half maps, a map from a lower-resolution
refinement), that carries noise (a half map: its power is signal plus noise, the data's cross
term signal only) or that has another B-factor than the particles predicts rings of the
wrong relative strength, and that tilts the correlation towards other defocus values. On
simulated particles whose true change is zero, against FSC-filtered half maps of FSC 0.5 at
15 Å, per-micrograph defocus moved by up to 147 Å; RELION's FSC weight alone left 144 Å; the
gain measured here leaves 6.5 Å (``tests/test_fsc_weighting.py``, docs/refine.md). Issue 15
item 3.

Works on :mod:`anisoctf.refine.group`'s set-up and state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from anisoctf.refine.model import batch_ctf, grid_features

if TYPE_CHECKING:
    from anisoctf.refine.group import _Setup, _State

__all__ = ["GAIN_PARTICLES", "GAIN_SMOOTH", "amplitude_gain", "gain_at", "reference_summary"]


#: particles (at most) whose spectra measure the reference's radial gain
GAIN_PARTICLES = 1024
#: shells (one Fourier pixel wide) averaged on either side of each when measuring it
GAIN_SMOOTH = 2


def reference_summary(su: _Setup, s: _State) -> dict:
    """What weighted the reference: the FSC (source, resolution) and the radial gain of the
    last defocus pass at the band's shells (1/Å, gain)."""
    out: dict = {"fsc": None, "amplitude_gain": None}
    if su.fsc is not None:
        out["fsc"] = {
            "source": su.fsc.source,
            "resolution_0143_A": su.fsc.resolution_A(),
            "band_end_A": 1.0 / su.k_hi,
        }
    if s.gain is not None:
        k, g = s.gain
        inside = (k >= su.k_lo) & (k <= su.k_hi)
        out["amplitude_gain"] = {
            "resolution_A": [float(1.0 / x) for x in k[inside]],
            "gain": [float(x) for x in g[inside]],
        }
    return out


def gain_at(gain: tuple[NDArray, NDArray], k2: NDArray) -> NDArray[np.float64]:
    """The radial gain at true-frame frequencies with ``|Mk|² = k2`` (1/Å²)."""
    return np.interp(np.sqrt(k2), gain[0], gain[1])


def amplitude_gain(su: _Setup, s: _State) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """How much stronger the data are than the prediction, shell by shell (true frame).

    ``g(k) = Σ w Re(X · conj(P)) / Σ w |P|²`` over the pixels of each shell of the first
    :data:`GAIN_PARTICLES` particles, with ``P = sign · CTF · Q`` at their current defocus
    (numerator and denominator each summed over ±:data:`GAIN_SMOOTH` shells), then divided by
    its mean over the band (each particle's own scale takes the overall level). A reference
    that was low-pass filtered (FSC-weighted half maps, a map from a lower-resolution
    refinement) or has another B-factor than the particles predicts rings of the wrong
    relative strength; that tilts the correlation towards other defocus values (hundreds of
    Å with a 20 Å filter on simulated particles, where the true change is zero). Scaling each
    shell of the prediction by ``g`` removes the tilt; it changes nothing for a matched
    reference but noise, which the pooled particles keep small.
    """
    p = su.particles
    g0 = grid_features(su.box, su.apix, s.m)
    shell = np.sqrt(g0.feats.k2) * su.box * su.apix  # true-frame radius in Fourier pixels
    idx = np.rint(shell).astype(np.int64).ravel()
    ns = int(idx.max()) + 1
    num, den = np.zeros(ns), np.zeros(ns)
    w = su.weight.ravel()
    used = 0
    for rows in su.chunks:
        if used >= GAIN_PARTICLES:
            break
        x0, q = su.batch(rows, s.m)
        c = batch_ctf(
            g0, s.z[rows], s.a1[rows], s.a2[rows], su.optics, p.phase_shift[rows], p.bfactor[rows]
        )
        pred = (s.sign * c * q).reshape(len(rows), -1)
        x = x0.reshape(len(rows), -1)
        cross = np.sum(x.real * pred.real + x.imag * pred.imag, axis=0, dtype=np.float64)
        power = np.sum(pred.real**2 + pred.imag**2, axis=0, dtype=np.float64)
        num += np.bincount(idx, w * cross, minlength=ns)
        den += np.bincount(idx, w * power, minlength=ns)
        used += len(rows)
    kern = np.ones(2 * GAIN_SMOOTH + 1)
    num_s = np.convolve(num, kern, mode="same")
    den_s = np.convolve(den, kern, mode="same")
    ok = den_s > 1e-12 * max(float(den_s.max()), 1e-300)
    g = np.where(ok, num_s / np.where(ok, den_s, 1.0), 0.0)
    level = float(np.sum(num_s[ok]) / np.sum(den_s[ok])) if np.any(ok) else 0.0
    k = np.arange(ns) / (su.box * su.apix)
    if not level > 0:
        return k, np.ones(ns)
    g = np.clip(g / level, 0.0, 20.0)
    return k, np.where(ok, g, 1.0)
