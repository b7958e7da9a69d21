"""The diagnostic image of a CTF fit: CTFFIND's ``.ctf`` layout, for RELION's ``_rlnCtfImage``.

A float32 image of the centred power spectrum, observed in the left half and the fitted CTF² in
the right half (as CTFFIND's diagnostic, Rohou & Grigorieff 2015, J. Struct. Biol. 192:216).
"""

from __future__ import annotations

import numpy as np

from anisoctf.fit.result import CTFEstimate
from anisoctf.report.diagnostic import full_plane

__all__ = ["ctf_image_array"]


def _robust_scale(values: np.ndarray) -> tuple[float, float]:
    """Centre and spread of ``values`` insensitive to a few extreme pixels."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return 0.0, 1.0
    lo, med, hi = np.percentile(v, [16.0, 50.0, 84.0])
    spread = 0.5 * float(hi - lo)
    if not spread > 0:
        spread = float(np.std(v)) or 1.0
    return float(med), spread


def ctf_image_array(estimate: CTFEstimate) -> np.ndarray:
    """The centred diagnostic power spectrum as a float32 image (CTFFIND's ``.ctf`` layout).

    The observed spectrum fills the left half and the fitted CTF² the right half, both scaled
    to zero median and unit spread within the fitted band and clipped at ±4, so that the rings
    of the two halves continue into each other across the centre line when the fit is right.
    Frequencies below the band are set to 0.
    """
    diag = estimate.diagnostics
    if diag is None:
        raise ValueError("the CTF estimate carries no diagnostics")
    spec = np.asarray(diag.spectrum, dtype=np.float64)
    model = np.asarray(diag.model, dtype=np.float64)
    n = spec.shape[0]
    ky = np.fft.fftfreq(n, d=diag.pixel_size)[:, None]
    kx = np.fft.rfftfreq(n, d=diag.pixel_size)[None, :]
    kr = np.sqrt(kx * kx + ky * ky)
    k_lo, k_hi = diag.fit_band
    band = (kr >= k_lo) & (kr <= k_hi)
    inside = kr >= k_lo
    halves = []
    for a in (spec, model):
        centre, spread = _robust_scale(a[band] if band.sum() >= 16 else a.ravel())
        scaled = np.clip((a - centre) / spread, -4.0, 4.0)
        scaled[~inside] = 0.0
        halves.append(full_plane(scaled))
    c0 = n // 2
    out = np.empty((n, n), dtype=np.float32)
    out[:, :c0] = halves[0][:, :c0]
    out[:, c0:] = halves[1][:, c0:]
    return out

