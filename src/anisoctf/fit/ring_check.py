"""An independent check of where the Thon rings stop, and the ideal ring extent of a simulation.

Two references for the fit resolution of :func:`anisoctf.fit.quality.ring_resolution`, built so
that they share none of its steps but the CTF formula (:mod:`anisoctf.optics.kernel`):

:func:`independent_ring_check`
    A CTFFIND-like check on the *image* (Rohou & Grigorieff 2015, J. Struct. Biol. 192:216,
    "equiphase averaging"): its own periodogram (non-overlapping, untapered tiles), a 1D
    equiphase average along the fitted CTF's ellipses in bins of equal *frequency* (half a
    spectrum pixel), the background removed by a running mean over one local ring period, and
    the Pearson correlation with the equally filtered CTF² over windows of three rings. A window
    agrees when the correlation is significant at ``t >= T_MIN`` (``n / 2`` independent bins:
    the half-pixel bins are correlated in pairs); the rings stop after two failing windows.
:func:`expected_ring_extent`
    For a simulation whose expected spectrum is known: the last ring at which an ideal detector
    using all of the image's Fourier samples would still see a three-ring window of the CTF²
    modulation at ``t >= TRUTH_T = 3`` (Fisher information of the modulation's amplitude under the
    exponential noise of a periodogram). This is where the rings *truly* vanish at that
    threshold; estimators lose a little information to tapering and tiling, so they sit at or
    slightly below it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from anisoctf.fit.quality import cs_turnaround
from anisoctf.optics.ctf import CTFParams, Optics, chi, frequency_grid
from anisoctf.optics.kernel import ctf_constants, ctf_from_chi, frequency_features

__all__ = ["RingCheck", "expected_ring_extent", "independent_ring_check", "iso_frequency"]

#: significance at which an ideal detector still sees a three-ring window: the definition of
#: where the rings truly vanish (:func:`expected_ring_extent`)
TRUTH_T = 3.0
#: significance of a window in the independent check; like the estimator's, lower than
#: ``TRUTH_T`` because a real periodogram carries less information than the ideal one
T_MIN = 2.0


@dataclass(frozen=True)
class RingCheck:
    """Result of :func:`independent_ring_check`."""

    k_outer: NDArray[np.float64]  # outer edge of each window's centre ring (Å⁻¹)
    t: NDArray[np.float64]  # significance of the correlation in each window
    fit_resolution: float  # Å


def iso_frequency(chi_value: NDArray, params: CTFParams, optics: Optics) -> NDArray:
    """|k| (Å⁻¹) at which a CTF without astigmatism (the mean defocus) has phase ``chi_value``;
    NaN beyond the Cs turnaround."""
    consts = ctf_constants(optics)
    a = consts.cs_coef_rad
    b = consts.defocus_coef_rad * params.mean_defocus
    x = np.asarray(chi_value, dtype=np.float64) - np.deg2rad(params.phase_shift_deg)
    if a <= 0:
        return np.sqrt(np.maximum(x / b, 0.0))
    with np.errstate(invalid="ignore"):
        k2 = (b - np.sqrt(b * b - 4 * a * x)) / (2 * a)
    return np.sqrt(np.maximum(k2, 0.0))


def _periodogram(image: NDArray, tile: int) -> NDArray:
    ny, nx = image.shape
    acc = np.zeros((tile, tile // 2 + 1))
    n = 0
    for r in range(0, ny - tile + 1, tile):
        for c in range(0, nx - tile + 1, tile):
            t = np.asarray(image[r : r + tile, c : c + tile], dtype=np.float64)
            f = np.fft.rfft2(t - t.mean())
            acc += f.real**2 + f.imag**2
            n += 1
    return acc / (n * tile * tile)


def _grid_phase(
    shape: tuple[int, int], params: CTFParams, optics: Optics
) -> tuple[NDArray, NDArray, NDArray]:
    """Phase chi, CTF² and |k_true| on an rfft grid."""
    kx, ky = frequency_grid(shape, optics.pixel_size)
    feats = frequency_features(kx, ky, optics.M if optics.has_anisomag else None)
    c = chi(feats, params, optics)
    c2 = ctf_from_chi(c, ctf_constants(optics)) ** 2
    return c, c2, np.sqrt(feats.k2)


def independent_ring_check(
    image: NDArray, params: CTFParams, optics: Optics, k_min: float, tile: int = 1024
) -> RingCheck:
    """Where the rings of ``image`` stop following ``params`` (module doc).

    ``tile`` is capped at the image's smaller side (rounded down to even).
    """
    tile = min(tile, (min(image.shape) // 2) * 2)
    apix = optics.pixel_size
    power = _periodogram(image, tile)
    c, c2, _ = _grid_phase((tile, tile), params, optics)
    consts = ctf_constants(optics)
    k_iso = iso_frequency(c, params, optics)
    step = 1.0 / (tile * apix)
    k_hi = min(0.5 / apix, 0.98 * cs_turnaround(params, optics))
    dk = 0.5 * step
    nb = int((k_hi - k_min) / dk)
    ib = np.floor((k_iso - k_min) / dk)
    ok = np.isfinite(ib) & (ib >= 0) & (ib < nb)
    ib = ib[ok].astype(np.int64)
    cnt = np.bincount(ib, minlength=nb).astype(float)
    epa = np.bincount(ib, weights=power[ok], minlength=nb) / np.maximum(cnt, 1)
    cpa = np.bincount(ib, weights=c2[ok], minlength=nb) / np.maximum(cnt, 1)
    kc = k_min + (np.arange(nb) + 0.5) * dk
    # local ring period (Å⁻¹) from the isotropic phase's slope
    slope = 2 * consts.defocus_coef_rad * params.mean_defocus * kc - 4 * consts.cs_coef_rad * kc**3
    period = np.pi / np.maximum(slope, 1e-12)
    half = np.maximum(1, np.round(0.5 * period / dk)).astype(np.int64)
    cs_e = np.concatenate([[0.0], np.cumsum(epa)])
    cs_c = np.concatenate([[0.0], np.cumsum(cpa)])
    i = np.arange(nb)
    lo, hi = np.maximum(i - half, 0), np.minimum(i + half + 1, nb)
    res_e = epa - (cs_e[hi] - cs_e[lo]) / (hi - lo)
    res_c = cpa - (cs_c[hi] - cs_c[lo]) / (hi - lo)
    ring = np.floor((chi_iso := _iso_chi(kc, params, optics)) / np.pi).astype(np.int64)
    valid = (cnt > 0) & (lo > 0) & (hi < nb)
    ks, ts = [], []
    last, misses, seen = -1, 0, 0
    for j in range(int(ring[valid].min()) + 1, int(ring[valid].max())):
        sel = valid & (ring >= j - 1) & (ring <= j + 1)
        if sel.sum() < 6:
            continue
        if period[ring == j].min() < 2.5 * step:  # finer than the tiles resolve
            break
        r = float(np.corrcoef(res_e[sel], res_c[sel])[0, 1])
        n_ind = 0.5 * sel.sum()
        t = r * np.sqrt(max(n_ind - 2, 1) / max(1 - r * r, 1e-12))
        ks.append(float(kc[ring == j].max() + 0.5 * dk))
        ts.append(t)
        seen += 1
        if t >= T_MIN:
            last, misses = len(ts) - 1, 0
        elif last >= 0 or seen > 4:
            misses += 1
            if misses >= 2:
                break
    del chi_iso
    k_arr = np.asarray(ks)
    return RingCheck(
        k_outer=k_arr,
        t=np.asarray(ts),
        fit_resolution=float(1.0 / k_arr[last]) if last >= 0 else float(1.0 / k_min),
    )


def _iso_chi(k: NDArray, params: CTFParams, optics: Optics) -> NDArray:
    """Phase (with amplitude contrast and phase shift) of the isotropic mean-defocus CTF."""
    iso = CTFParams(params.mean_defocus, params.mean_defocus, 0.0, params.phase_shift_deg)
    kk = np.asarray(k, dtype=np.float64)
    feats = frequency_features(kk, np.zeros_like(kk))
    return (
        chi(feats, iso, optics)
        + ctf_constants(optics).amplitude_phase_rad
        - np.deg2rad(params.phase_shift_deg)
    )


def expected_ring_extent(
    shape: tuple[int, int],
    params: CTFParams,
    optics: Optics,
    expected_power: NDArray,
    modulation: NDArray,
    k_min: float,
    grid: int = 512,
) -> float:
    """Resolution (Å) where the rings of a simulation truly vanish (module doc).

    Parameters
    ----------
    shape
        (ny, nx) of the simulated image (its number of Fourier samples).
    params, optics
        The true CTF and optics.
    expected_power, modulation
        On the ``grid × grid`` rfft grid: the expected periodogram, and the expected power that
        multiplies CTF² (envelope, MTF and signal; the Thon-ring amplitude; NaN where it is
        unknown, e.g. at the CTF's zeros, leaves a pixel out).
    k_min
        Low-frequency limit (Å⁻¹).
    grid
        Size of the grid the two arrays are given on.
    """
    c, c2, k = _grid_phase((grid, grid), params, optics)
    x = (c + ctf_constants(optics).amplitude_phase_rad - np.deg2rad(params.phase_shift_deg)) / np.pi
    samples = shape[0] * shape[1] / float(grid * grid)  # image Fourier samples per grid pixel
    k_hi = min(0.5 / optics.pixel_size, 0.98 * cs_turnaround(params, optics))
    ok = (k >= k_min) & (k <= k_hi)
    ring = np.floor(x[ok]).astype(np.int64)
    r0 = int(ring.min())
    ring -= r0
    # Fisher information of the ring amplitude: (m / P)² var(CTF² in the ring) per sample
    ratio = modulation[ok] / expected_power[ok]
    info_px = np.where(np.isfinite(ratio), ratio, 0.0) ** 2 * samples
    nr = int(ring.max()) + 1
    n = np.bincount(ring, minlength=nr).astype(float)
    s_i = np.bincount(ring, weights=info_px, minlength=nr)
    m1 = np.bincount(ring, weights=info_px * c2[ok], minlength=nr)
    m2 = np.bincount(ring, weights=info_px * c2[ok] ** 2, minlength=nr)
    info = m2 - m1 * m1 / np.maximum(s_i, 1e-300)  # information after removing a local level
    kout = np.zeros(nr)
    np.maximum.at(kout, ring, k[ok])
    # the expected t is deterministic but need not fall monotonically (a strong low-frequency
    # background hides the first rings): the rings end at the outermost window that is seen
    last = -1
    for j in range(1, nr - 1):
        if n[j - 1] == 0 or n[j + 1] == 0:
            continue
        if np.sqrt(info[j - 1] + info[j] + info[j + 1]) >= TRUTH_T:
            last = j
    return float(1.0 / kout[last]) if last >= 0 else float(1.0 / k_min)
