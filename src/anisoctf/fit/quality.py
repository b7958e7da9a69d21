"""How good is a fit: figure of merit, CTF fit resolution, and the 1D/2D views for plots.

Fit resolution: the spectrum is cut into *ring windows*, the pixels between two consecutive
zeros of the fitted CTF² (so one window holds exactly one Thon ring, whatever the astigmatism:
an equiphase average). In each window we regress the observed power on a local linear
background and the fitted CTF²; the ring "agrees" when the CTF² coefficient is positive and
significant (t > 3). The fit resolution is the outer edge of the last agreeing window before two
consecutive windows fail (misses before the first agreeing ring are forgiven in the first few
windows, where a strong low-frequency background can hide a ring), or where rings become too
fine for the spectrum's sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from anisoctf.fit.band import Band
from anisoctf.optics.ctf import CTFParams, Optics, chi
from anisoctf.optics.kernel import ctf2_from_chi, ctf_constants

__all__ = ["RingStats", "equiphase_radius", "ring_statistics"]


@dataclass(frozen=True)
class RingStats:
    """Per-ring-window agreement between observed spectrum and fitted CTF²."""

    k: NDArray[np.float64]  # mean true-frame |k| of each window (Å⁻¹)
    k_outer: NDArray[np.float64]  # outer edge of each window (Å⁻¹)
    t: NDArray[np.float64]  # t-statistic of the CTF² coefficient
    r: NDArray[np.float64]  # partial correlation with CTF² (0–1 scale, signed)
    amplitude: NDArray[np.float64]  # fitted CTF² coefficient
    intercept: NDArray[np.float64]
    slope: NDArray[np.float64]
    rho_mean: NDArray[np.float64]
    window: NDArray[np.int64]  # window index of each band pixel (−1 when unused)
    fit_resolution: float  # Å
    count: NDArray[np.float64]  # band pixels (or phase cells) in each window
    usable: NDArray[np.bool_]  # enough pixels and rings resolvable by the sampling
    first_window: int = 0  # floor(phase / pi) of window 0 (to place other pixels in windows)

    def windows_of(self, band: Band, params: CTFParams, optics: Optics) -> NDArray[np.int64]:
        """Window index of each pixel of another band (e.g. the display grid), clipped to the
        windows measured here."""
        x = _chi_eff(band, params, optics) - np.deg2rad(params.phase_shift_deg)
        win = np.floor(x / np.pi).astype(np.int64) - self.first_window
        return np.clip(win, 0, self.k.size - 1)

    def in_band(self, k_min: float, k_max: float) -> NDArray[np.bool_]:
        """Usable windows whose mean frequency lies in [k_min, k_max]."""
        return self.usable & (self.k >= k_min) & (self.k <= k_max)

    def agreeing(self, k_min: float, k_max: float, t_min: float = 3.0) -> int:
        """Number of rings in the band that agree significantly with the fit."""
        return int(np.sum(self.in_band(k_min, k_max) & (self.t > t_min)))

    def figure_of_merit(self, k_min: float, k_max: float) -> float:
        """Mean partial correlation of the rings with the fitted CTF² in the band (weighted
        by pixels); each ring's own linear background is removed first, so a smooth
        background the fit happened to absorb cannot inflate it."""
        sel = self.in_band(k_min, k_max)
        if not sel.any():
            return 0.0
        return float(np.sum(self.r[sel] * self.count[sel]) / np.sum(self.count[sel]))


def _chi_eff(band: Band, params: CTFParams, optics: Optics) -> NDArray:
    return chi(band.feats, params, optics) + ctf_constants(optics).amplitude_phase_rad


def ring_statistics(band: Band, params: CTFParams, optics: Optics, t_min: float = 3.0) -> RingStats:
    """Agreement of each Thon ring with the fit, and the fit resolution (see module doc)."""
    x = _chi_eff(band, params, optics)
    x = x - np.deg2rad(params.phase_shift_deg)
    # phase is monotonic in |k| only up to the Cs turnaround; windows are counted in phase
    win = np.floor(x / np.pi).astype(np.int64)
    first = int(win.min())
    win -= first
    nw = int(win.max()) + 1
    c2 = optics_ctf2(band, params, optics)
    rho = band.rho_true
    s = band.values

    def sums(v: NDArray) -> NDArray:
        return np.bincount(win, weights=v, minlength=nw)

    n = np.bincount(win, minlength=nw).astype(float)
    nn = np.maximum(n, 1)
    rm = sums(rho) / nn
    dr = rho - rm[win]
    # normal equations of s ~ a + b*dr + c*c2 per window (3x3, batched)
    s1, sr, sc = n, sums(dr), sums(c2)
    srr, src, scc = sums(dr * dr), sums(dr * c2), sums(c2 * c2)
    ys, yr, yc, yy = sums(s), sums(s * dr), sums(s * c2), sums(s * s)
    g = np.stack(
        [np.stack([s1, sr, sc], -1), np.stack([sr, srr, src], -1), np.stack([sc, src, scc], -1)],
        axis=1,
    )
    h = np.stack([ys, yr, yc], -1)
    ok = n >= 12
    g[~ok] = np.eye(3)
    h[~ok] = 0
    g = g + 1e-12 * np.eye(3) * np.maximum(np.trace(g, axis1=1, axis2=2), 1e-30)[:, None, None]
    coef = np.linalg.solve(g, h[..., None])[..., 0]
    rss = yy - np.einsum("wa,wa->w", coef, h)
    dof = np.maximum(n - 3, 1)
    sigma2 = np.maximum(rss / dof, 1e-300)
    ginv = np.linalg.inv(g)
    se = np.sqrt(sigma2 * np.maximum(ginv[:, 2, 2], 1e-300))
    t = np.where(ok, coef[:, 2] / se, 0.0)
    # partial correlation of s with c2 given the linear background
    r = t / np.sqrt(t * t + dof)
    kmean = sums(rho) / nn
    kout = np.zeros(nw)
    np.maximum.at(kout, win, rho)

    # rings finer than ~2.5 spectrum pixels cannot be resolved by the sampling
    width = np.zeros(nw)
    kin = np.full(nw, np.inf)
    np.minimum.at(kin, win, rho)
    width = (kout - kin) / band.pixel_step
    resolvable = width >= 2.5

    order = np.argsort(kmean)
    last_good = -1
    misses = 0
    seen = 0
    for w in order:
        if not ok[w]:
            continue
        if not resolvable[w]:
            break
        seen += 1
        if t[w] > t_min:
            last_good = w
            misses = 0
        elif last_good >= 0 or seen > 4:
            # the first rings may drown in a strong low-frequency background: only count
            # misses once a ring has agreed (or after the first few windows)
            misses += 1
            if misses >= 2:
                break
    fit_res = 1.0 / kout[last_good] if last_good >= 0 else 1.0 / band.k_min
    return RingStats(
        k=kmean,
        k_outer=kout,
        t=t,
        r=r,
        amplitude=coef[:, 2],
        intercept=coef[:, 0],
        slope=coef[:, 1],
        rho_mean=rm,
        window=win,
        fit_resolution=float(fit_res),
        count=n,
        usable=ok & resolvable,
        first_window=first,
    )


def optics_ctf2(band: Band, params: CTFParams, optics: Optics) -> NDArray:
    """CTF² (no envelope) at the band's pixels (:func:`anisoctf.optics.kernel.ctf2_from_chi`)."""
    return ctf2_from_chi(chi(band.feats, params, optics), ctf_constants(optics), overwrite=True)


def equiphase_radius(band: Band, params: CTFParams, optics: Optics) -> NDArray:
    """Equivalent isotropic frequency of each pixel: the |k| at which a CTF without astigmatism
    (mean defocus) has the same phase. Averaging along it is an equiphase average (EPA)."""
    consts = ctf_constants(optics)
    x = chi(band.feats, params, optics) - np.deg2rad(params.phase_shift_deg)
    # solve chi_iso(k) = x for k^2: a k^4 - b k^2 + x = 0 with the kernel's constants
    a = consts.cs_coef_rad
    b = consts.defocus_coef_rad * params.mean_defocus
    if a <= 0:
        return np.sqrt(np.maximum(x / b, 0.0))
    disc = b * b - 4 * a * x
    k2 = np.where(disc >= 0, (b - np.sqrt(np.maximum(disc, 0))) / (2 * a), b / (2 * a))
    return np.sqrt(np.maximum(k2, 0.0))
