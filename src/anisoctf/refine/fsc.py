"""FSC weighting of the particle-reference comparison (issue 15 item 3).

A reference is only worth what its half maps agree on. RELION's CtfRefine reads the
post-process FSC (``--f``, ``_rlnFourierShellCorrelationCorrected``) and multiplies its
per-frequency weights by it, ignoring frequencies from the first shell where it falls to zero
(``LegacyReferenceMap::load`` and ``RefinementHelper::drawFSC`` in RELION's
``src/jaz/single_particle``). Here the same weight is built from a
:class:`~anisoctf.records.fsc.FscCurve`, read from that file or computed from the two half
maps (:func:`half_map_fsc`, with an optional soft mask).

Arrays only; no files.
"""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft
from numpy.typing import NDArray

from anisoctf.records.fsc import FscCurve

__all__ = ["fsc_weight", "half_map_fsc"]


def half_map_fsc(
    half1: NDArray[np.floating],
    half2: NDArray[np.floating],
    apix: float,
    mask: NDArray[np.floating] | None = None,
) -> FscCurve:
    """FSC of two half maps in shells one Fourier voxel wide (shell ``i`` at ``i/(N·apix)``).

    ``FSC_i = Re Σ F1 F2* / sqrt(Σ|F1|² Σ|F2|²)`` over the voxels of shell ``i`` (the rfft's
    half space: each pair of Friedel mates counted once, which leaves the ratio unchanged);
    with ``mask`` both maps are multiplied by it first (no phase-randomisation correction:
    with a tight mask the FSC is then optimistic, as RELION's is before its correction).
    """
    a = np.asarray(half1, dtype=np.float64)
    b = np.asarray(half2, dtype=np.float64)
    if a.ndim != 3 or a.shape != b.shape or len(set(a.shape)) != 1:
        raise ValueError(f"half maps must be two cubes of one size, got {a.shape}, {b.shape}")
    if not apix > 0:
        raise ValueError(f"the pixel size must be positive, got {apix}")
    if mask is not None:
        m = np.asarray(mask, dtype=np.float64)
        if m.shape != a.shape:
            raise ValueError(f"the mask is {m.shape}, the half maps {a.shape}")
        a, b = a * m, b * m
    n = a.shape[0]
    fa, fb = sfft.rfftn(a, workers=-1), sfft.rfftn(b, workers=-1)
    k = np.fft.fftfreq(n) * n
    kz, ky, kx = np.meshgrid(k, k, np.fft.rfftfreq(n) * n, indexing="ij")
    shell = np.rint(np.sqrt(kx**2 + ky**2 + kz**2)).astype(np.int64).ravel()
    ns = n // 2 + 1
    keep = shell < ns
    s = shell[keep]
    cross = np.bincount(s, (fa * np.conj(fb)).real.ravel()[keep], minlength=ns)
    p1 = np.bincount(s, (np.abs(fa) ** 2).ravel()[keep], minlength=ns)
    p2 = np.bincount(s, (np.abs(fb) ** 2).ravel()[keep], minlength=ns)
    den = np.sqrt(p1 * p2)
    fsc = np.where(den > 0, cross / np.where(den > 0, den, 1.0), 0.0)
    return FscCurve(k_inv_A=np.arange(ns) / (n * apix), fsc=fsc, source="half maps")


def fsc_weight(curve: FscCurve, k_inv_A: NDArray[np.floating]) -> NDArray[np.float64]:
    """The comparison's weight at frequencies ``k_inv_A`` (1/Å): the FSC, linear between
    shells, clipped at 0, and 0 from the first shell after the origin where the FSC is ≤ 0
    (RELION's ``k_out``) or beyond the curve's last shell."""
    k, f = curve.k_inv_A, curve.fsc
    cut = np.flatnonzero((f <= 0) & (k > 0))
    k_out = float(k[cut[0]]) if cut.size else float(k[-1])
    kk = np.asarray(k_inv_A, dtype=np.float64)
    w = np.clip(np.interp(kk, k, f), 0.0, 1.0)
    return np.where(kk < k_out if cut.size else kk <= k_out, w, 0.0)
