"""How good is a fit: figure of merit, CTF fit resolution, and the 1D/2D views for plots.

Fit resolution (:func:`ring_resolution`, documented in docs/estimator.md): every pixel of the
full-resolution spectrum (no binning, no subsampling, so the statistic does not depend on the box)
gets its CTF phase under the fitted parameters; the pixels are averaged in bins of equal phase,
``RES_BINS_PER_RING`` per Thon ring (an equiphase average along the fitted CTF's ellipses). Over a
sliding window of ``RES_WINDOW_RINGS`` consecutive rings this profile is regressed on a local
quadratic background (in phase) and the fitted CTF²; the window *follows the fit* when the CTF²
coefficient is positive with t ≥ ``RES_T_MIN``. The noise of every profile point is estimated
from the window's own residuals, so neither the number of tiles nor their size enters. The fit
resolution is the outer edge of the centre ring of the last following window before
``RES_MISSES`` consecutive windows fail, or where the rings become finer than
``RES_MIN_PERIOD_PX`` spectrum pixels (the box's sampling limit), or Nyquist, or the Cs
turnaround of the phase.

Ring statistics for the figure of merit, the agreement in the plots and the diagnostic picture
(:func:`ring_statistics`): the spectrum is cut into *ring windows*, the pixels between two
consecutive zeros of the fitted CTF²; in each window the observed power is regressed on a local
linear background and the fitted CTF² (the partial correlation is the figure of merit).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from anisoctf.fit.band import Band, binned_power
from anisoctf.optics.ctf import CTFParams, Optics, chi
from anisoctf.optics.kernel import (
    FrequencyFeatures,
    ctf2_from_chi,
    ctf_constants,
    frequency_features,
)
from anisoctf.spectrum.periodogram import Spectrum

__all__ = [
    "RingResolution",
    "cs_turnaround",
    "equiphase_radius",
    "ring_resolution",
    "ring_statistics",
]

#: phase bins per Thon ring of the equiphase profile
RES_BINS_PER_RING = 8
#: rings per sliding window
RES_WINDOW_RINGS = 3
#: t of the CTF² coefficient in a window for the rings there to follow the fit
RES_T_MIN = 2.5
#: consecutive failing windows that end the rings
RES_MISSES = 2
#: rings finer than this many spectrum pixels (one period) are beyond the box's sampling
RES_MIN_PERIOD_PX = 2.5


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


@dataclass(frozen=True)
class RingResolution:
    """The sliding-window ring check behind the fit resolution (see module doc).

    Attributes
    ----------
    k_outer
        Outer edge (Å⁻¹, equivalent isotropic frequency) of the centre ring of each window.
    t
        t-statistic of the fitted CTF² in each window (positive: rings in phase with the fit).
    ring
        Ring number (floor(phase / pi)) of each window's centre ring.
    fit_resolution
        Å; where the rings stop following the fit.
    limit
        What ended the rings: ``"rings"`` (the windows stopped agreeing), ``"sampling"`` (rings
        finer than the box can resolve: a larger box may see further), ``"nyquist"`` or
        ``"turnaround"`` (the Cs turnaround of the phase).
    """

    k_outer: NDArray[np.float64]
    t: NDArray[np.float64]
    ring: NDArray[np.int64]
    fit_resolution: float
    limit: str

    def agreeing(self, k_min: float, k_max: float, t_min: float = 3.0) -> int:
        """Windows in [k_min, k_max] whose rings follow the fit significantly."""
        sel = (self.k_outer >= k_min) & (self.k_outer <= k_max) & (self.t > t_min)
        return int(np.sum(sel))


def cs_turnaround(params: CTFParams, optics: Optics) -> float:
    """Frequency (Å⁻¹) of the Cs turnaround of the phase for the smaller defocus (inf if none)."""
    consts = ctf_constants(optics)
    dmin = min(params.defocus_u, params.defocus_v)
    if consts.cs_coef_rad <= 0 or dmin <= 0:
        return np.inf
    return float(np.sqrt(consts.defocus_coef_rad * dmin / (2.0 * consts.cs_coef_rad)))


def ring_resolution(
    spectrum: Spectrum, params: CTFParams, optics: Optics, k_min: float
) -> RingResolution:
    """Where the Thon rings stop following the fitted CTF (module doc, docs/estimator.md).

    Parameters
    ----------
    spectrum
        The averaged periodogram the CTF was fitted to (any box).
    params, optics
        The fitted CTF and the optics (pixel size of ``spectrum``; the magnification matrix,
        if any, maps the spectrum's frequencies to the true frame).
    k_min
        Low-frequency limit of the fit (Å⁻¹).
    """
    nyq = 0.5 / spectrum.pixel_size
    k_turn = cs_turnaround(params, optics)
    k_hi = min(nyq, 0.98 * k_turn)
    step = 1.0 / (min(spectrum.shape) * spectrum.pixel_size)  # the coarser axis's step
    first, cnt, prof, cprof = _phase_profile(spectrum, params, optics, k_min, k_hi, step)
    nb = cnt.size
    nr = nb // RES_BINS_PER_RING + 1
    # equivalent isotropic frequency of each ring's edges (where its phase starts and ends)
    consts = ctf_constants(optics)
    chi_edges = (np.arange(nr + 1) + first) * np.pi - consts.amplitude_phase_rad
    k_edges = _iso_frequency(chi_edges + np.deg2rad(params.phase_shift_deg), params, optics)
    width_px = np.diff(k_edges) / step
    ts, rings, kouts = [], [], []
    limit = "nyquist" if k_hi >= nyq else "turnaround"
    last, misses, seen, sampled_out = -1, 0, 0, False
    half = RES_WINDOW_RINGS // 2
    for j in range(half, nr - half):
        lo, hi = (j - half) * RES_BINS_PER_RING, (j + half + 1) * RES_BINS_PER_RING
        c = cnt[lo:hi]
        full_rings = bool(np.all(c > 0))
        if not full_rings:
            continue  # a partial ring at the band's inner edge
        if not width_px[j + half] >= RES_MIN_PERIOD_PX:
            sampled_out = True
            break
        t = _window_t(prof[lo:hi], cprof[lo:hi])
        ts.append(t)
        rings.append(j + first)
        kouts.append(k_edges[j + 1])
        seen += 1
        if t >= RES_T_MIN:
            last, misses = len(ts) - 1, 0
        elif last >= 0 or seen > 4:  # strong low-frequency background may hide the first rings
            misses += 1
            if misses >= RES_MISSES:
                limit = "rings"
                break
    if sampled_out and limit != "rings":
        limit = "sampling"
    k_arr = np.asarray(kouts, dtype=np.float64)
    fit_res = 1.0 / k_arr[last] if last >= 0 else 1.0 / k_min
    return RingResolution(
        k_outer=k_arr,
        t=np.asarray(ts, dtype=np.float64),
        ring=np.asarray(rings, dtype=np.int64),
        fit_resolution=float(fit_res),
        limit=limit,
    )


def _bin_for(params: CTFParams, optics: Optics, k_hi: float, step: float) -> int:
    """Binning (1, 2, 4 or 8) that leaves every ring up to ``k_hi`` ≥ 8 binned pixels wide
    (binning then loses < 3 % of the ring contrast and saves memory on large micrographs)."""
    consts = ctf_constants(optics)
    slope = 2 * consts.defocus_coef_rad * max(params.defocus_u, params.defocus_v) * k_hi
    period_px = np.pi / max(slope, 1e-12) / step
    f = 1
    while f < 8 and period_px / (2 * f) >= 8.0:
        f *= 2
    return f


def _phase_profile(
    spectrum: Spectrum, params: CTFParams, optics: Optics, k_min: float, k_hi: float, step: float
) -> tuple[int, NDArray, NDArray, NDArray]:
    """Equiphase profile of the whole spectrum: pixel counts, mean power and mean CTF² in
    bins of ``pi / RES_BINS_PER_RING`` of phase, gathered in blocks of rows (bounded memory).
    Returns the ring number of bin 0 and the three arrays."""
    f = _bin_for(params, optics, k_hi, step)
    ny, nx = spectrum.shape
    if ny % (2 * f) or nx % (2 * f):
        f = 1
    power, kx1, ky1 = binned_power(spectrum, f)
    kx1 = kx1[:-1]  # the Nyquist column stands alone: leave it out
    consts = ctf_constants(optics)
    m = optics.M if optics.has_anisomag else None
    shift = np.deg2rad(params.phase_shift_deg)
    # the phase grows with |k|: bin 0 starts at the ring of the band's inner edge
    first = int(np.floor(_iso_phase(k_min, params, optics) / np.pi)) - 2
    acc: dict[str, NDArray] = {}
    rows = max(1, 2_000_000 // max(kx1.size, 1))
    for r0 in range(0, ky1.size, rows):
        ky = ky1[r0 : r0 + rows, None]
        feats = frequency_features(kx1[None, :], ky, m)
        k = np.sqrt(feats.k2)
        keep = (k >= k_min) & (k <= k_hi) & ((kx1[None, :] > 0) | (ky >= 0))
        if not keep.any():
            continue
        sub = FrequencyFeatures(
            k2=feats.k2[keep], c2=feats.c2[keep], s2=feats.s2[keep], k4=feats.k4[keep]
        )
        c = chi(sub, params, optics)
        x = (c + consts.amplitude_phase_rad - shift) / np.pi
        pos = np.floor((x - first) * RES_BINS_PER_RING).astype(np.int64)
        pos = np.maximum(pos, 0)
        c2 = ctf2_from_chi(c, consts, overwrite=True)
        vals = power[r0 : r0 + rows, : kx1.size][keep]
        n = int(pos.max()) + 1
        for key, w in (("n", None), ("p", vals), ("c", c2)):
            part = np.bincount(pos, weights=w, minlength=n).astype(np.float64)
            old = acc.get(key, np.zeros(0))
            if old.size < part.size:
                old = np.concatenate([old, np.zeros(part.size - old.size)])
            old[: part.size] += part
            acc[key] = old
    cnt = acc["n"]
    nb = (cnt.size // RES_BINS_PER_RING + 1) * RES_BINS_PER_RING
    pad = [np.concatenate([acc[key], np.zeros(nb - acc[key].size)]) for key in ("n", "p", "c")]
    cnt = pad[0]
    return first, cnt, pad[1] / np.maximum(cnt, 1), pad[2] / np.maximum(cnt, 1)


def _iso_phase(k: float, params: CTFParams, optics: Optics) -> float:
    """Phase (amplitude contrast and phase shift included) of the isotropic mean-defocus CTF
    at ``k``, the smallest over the astigmatism (the inner edge of the band's first ring)."""
    consts = ctf_constants(optics)
    d = min(params.defocus_u, params.defocus_v)
    c = consts.defocus_coef_rad * d * k * k - consts.cs_coef_rad * k**4
    return float(c + consts.amplitude_phase_rad - np.deg2rad(params.phase_shift_deg))


def _iso_frequency(chi_value: NDArray, params: CTFParams, optics: Optics) -> NDArray:
    """|k| at which a CTF without astigmatism (the mean defocus) has phase ``chi_value``
    (NaN beyond the Cs turnaround)."""
    consts = ctf_constants(optics)
    a = consts.cs_coef_rad
    b = consts.defocus_coef_rad * params.mean_defocus
    x = np.asarray(chi_value, dtype=np.float64)
    if a <= 0:
        return np.sqrt(np.maximum(x / b, 0.0))
    disc = b * b - 4 * a * x
    with np.errstate(invalid="ignore"):
        k2 = (b - np.sqrt(disc)) / (2 * a)
    return np.sqrt(np.maximum(k2, 0.0))


def _window_t(p: NDArray, c: NDArray) -> float:
    """t of ``c``'s coefficient in ``p ~ 1 + u + u² + c`` (u the position in the window)."""
    n = p.size
    u = np.linspace(-1.0, 1.0, n)
    a = np.stack([np.ones(n), u, u * u, c], axis=1)
    scale = float(np.mean(p)) or 1.0
    y = p / scale
    coef, _, rank, _ = np.linalg.lstsq(a, y, rcond=None)
    if rank < 4:
        return 0.0
    res = y - a @ coef
    dof = n - 4
    s2 = float(res @ res) / dof
    cov = np.linalg.inv(a.T @ a)
    se = np.sqrt(max(s2 * cov[3, 3], 1e-300))
    return float(coef[3] / se)
