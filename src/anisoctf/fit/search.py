"""Coarse, exhaustive search for defocus, astigmatism and phase shift.

The band is split into angular sectors (in the true frame). For each sector, a 1D radial profile
is compared with the CTF² of every candidate defocus by *variable projection*: a smooth
background and a smooth envelope are fitted by weighted linear least squares for each
candidate, and the score is the drop of the weighted residual (a log-likelihood ratio, so the
scores of independent sectors add up). Astigmatism is then found by maximising, over a grid of
mean defocus and Cartesian astigmatism ``(a1, a2)``, the sum of the sector scores at each sector's
defocus ``z + a1 cos 2φ + a2 sin 2φ``. Nothing is bounded by clamping: the astigmatism grid is a
disc in Cartesian components.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import NDArray

from anisoctf.errors import FitError
from anisoctf.fit.band import Band, radial_basis
from anisoctf.optics.ctf import Optics
from anisoctf.optics.kernel import (
    FrequencyFeatures,
    chi_rad,
    ctf2_from_chi_fast,
    ctf_constants,
)

__all__ = ["SearchResult", "coarse_search", "profile_scores"]


@dataclass(frozen=True)
class SearchResult:
    """Best candidates of the coarse search (descending score)."""

    candidates: list[tuple[float, float, float, float]]  # (z, a1, a2, phase_deg)
    scores: list[float]
    defocus_grid: NDArray[np.float64]
    profile_score: NDArray[np.float64]  # all-sector score against the defocus grid
    significance: float  # best score in units of the score's noise level


def _ctf2_1d(k: NDArray, df: NDArray, phase_rad: NDArray, optics: Optics) -> NDArray:
    """CTF² on a (candidates × k) grid (the kernel's float32 fast path: a coarse score table)."""
    k2 = k * k
    feats = FrequencyFeatures(k2=k2, c2=k2, s2=k2, k4=k2 * k2)  # c2, s2 unused: no astigmatism
    x = chi_rad(feats, ctf_constants(optics), df, phase_shift_rad=phase_rad)
    return ctf2_from_chi_fast(x, ctf_constants(optics))


#: a candidate whose CTF² column keeps less than this fraction of its weighted norm once the
#: smooth background is projected out is (to rounding) a background shape: it explains nothing
#: the background cannot, and its projected Gram matrix is rounding noise
_MIN_PROJECTED_FRACTION = 1e-6


def _projected_drop(g0: NDArray, g: NDArray, h: NDArray, psi: NDArray) -> NDArray:
    """Residual drop ``h^T g^-1 h`` of each candidate (0 where the envelope comes out negative).

    ``g0`` is the Gram matrix of a candidate's envelope × CTF² columns, ``g`` the same after
    projecting out the background (``g = g0 - P``, shapes ``(..., pA, pA)``). Where the CTF²
    varies too little across the band to be told from a smooth background (rings far finer
    than the bins, where CTF² averages to ½, or a phase shift that turns the few rings of a
    small defocus into a smooth slope), ``g`` is the difference of two nearly equal numbers,
    and its inverse is rounding noise: such candidates score 0, and the regularisation is
    relative to ``g0``, not to ``g``, for the same reason.
    """
    scale = np.trace(g0, axis1=-2, axis2=-1)
    kept = np.trace(g, axis1=-2, axis2=-1)
    eye = np.eye(g.shape[-1])
    g = g + (1e-9 * scale)[..., None, None] * eye
    coef = np.linalg.solve(g, h[..., None])[..., 0]
    drop = np.einsum("...a,...a->...", h, coef)
    amp = coef @ psi.mean(axis=0)
    live = (kept > _MIN_PROJECTED_FRACTION * scale) & (amp > 0)
    return np.where(live, drop, 0.0)


def profile_scores(
    k: NDArray,
    y: NDArray,
    n: NDArray,
    ctf2: NDArray,
    k_min: float,
    k_max: float,
    n_bg: int = 5,
    n_env: int = 2,
) -> NDArray:
    """Variable-projection score of each candidate CTF² for one radial profile.

    Parameters
    ----------
    k, y, n
        Bin centres (Å⁻¹), mean power and pixel count of each bin (empty bins have n = 0).
    ctf2
        Candidate CTF² values, shape (n_candidates, len(k)).
    n_bg, n_env
        Number of smooth basis functions for background and envelope.

    Returns
    -------
    ndarray
        Weighted residual drop for each candidate (0 where the fitted envelope is negative).
    """
    ok = n > 0
    k, y, n, ctf2 = k[ok], y[ok], n[ok], ctf2[:, ok]
    phi = radial_basis(k, k_min, k_max, n_bg)
    # Gamma noise: variance of a bin mean ~ y_smooth^2 / n; smooth y by its own background fit
    ys = phi @ np.linalg.lstsq(phi * np.sqrt(n)[:, None], y * np.sqrt(n), rcond=None)[0]
    ys = np.maximum(ys, 1e-3 * np.max(np.abs(ys)) + 1e-30)
    sw = np.sqrt(n) / ys
    q, _ = np.linalg.qr(phi * sw[:, None])
    yw = y * sw
    yp = yw - q @ (q.T @ yw)
    if n_env <= 1:
        psi = np.ones((k.size, 1))
    else:
        psi = np.stack([(k / k_max) ** i for i in range(n_env)], axis=1)
    # candidate columns z_ja = sw * psi_a * ctf2_j, projected off the background space q;
    # everything reduces to matrix products with the (J x nb) candidate matrix
    u = sw[:, None] * psi  # (nb, pA)
    qtz = np.einsum("ib,ia->abi", q, u)  # (pA, pB, nb): q_b * u_a
    proj = np.stack([ctf2 @ qtz[a].T for a in range(u.shape[1])], axis=1)  # (J, pA, pB)
    uu = np.einsum("ia,ib->abi", u, u).reshape(-1, k.size)  # (pA*pA, nb)
    g0 = ((ctf2 * ctf2) @ uu.T).reshape(-1, u.shape[1], u.shape[1])
    g = g0 - np.einsum("jab,jcb->jac", proj, proj)
    h = ctf2 @ (u * yp[:, None])  # (J, pA); yp is orthogonal to q so no correction
    return _projected_drop(g0, g, h, psi)


def _bin_profile(
    rho: NDArray,
    values: NDArray,
    weights: NDArray,
    k_min: float,
    k_max: float,
    width: float,
    centred: bool = False,
) -> tuple[NDArray, NDArray, NDArray]:
    """Weighted radial profile; each bin's frequency is its pixels' mean (or its centre)."""
    nb = max(8, int(np.ceil((k_max - k_min) / width)))
    edges = np.linspace(k_min, k_max, nb + 1)
    i = np.clip(np.searchsorted(edges, rho) - 1, 0, nb - 1)
    n = np.bincount(i, weights=weights, minlength=nb)
    s = np.bincount(i, weights=values * weights, minlength=nb)
    kc = np.bincount(i, weights=rho * weights, minlength=nb)
    centres = 0.5 * (edges[1:] + edges[:-1])
    k = centres if centred else np.where(n > 0, kc / np.maximum(n, 1), centres)
    return k, np.where(n > 0, s / np.maximum(n, 1), 0.0), n


def _bin_sector_profiles(
    rho: NDArray,
    values: NDArray,
    weights: NDArray,
    sector: NDArray,
    n_sectors: int,
    k_min: float,
    k_max: float,
    width: float,
) -> tuple[NDArray, NDArray, NDArray]:
    """:func:`_bin_profile` (``centred=True``) of every sector at once: bin centres, and
    ``(n_sectors, n_bins)`` mean power and weight."""
    nb = max(8, int(np.ceil((k_max - k_min) / width)))
    edges = np.linspace(k_min, k_max, nb + 1)
    i = np.clip(np.searchsorted(edges, rho) - 1, 0, nb - 1)
    flat = sector * nb + i
    n = np.bincount(flat, weights=weights, minlength=n_sectors * nb).reshape(n_sectors, nb)
    s = np.bincount(flat, weights=values * weights, minlength=n_sectors * nb)
    s = s.reshape(n_sectors, nb)
    return 0.5 * (edges[1:] + edges[:-1]), np.where(n > 0, s / np.maximum(n, 1), 0.0), n


def _sector_scores(
    k: NDArray,
    ys: NDArray,
    ns: NDArray,
    ctf2: NDArray,
    k_min: float,
    k_max: float,
    n_bg: int = 5,
    n_env: int = 2,
) -> NDArray:
    """:func:`profile_scores` of several profiles on the same bins (rows of ``ys``, ``ns``)
    against one candidate table: the per-profile projections are small; the products with
    the (candidates × bins) table are done for all profiles in one matrix product each.
    Empty bins carry zero weight, exactly as if they were left out."""
    n_p, nb = ys.shape
    phi = radial_basis(k, k_min, k_max, n_bg)
    if n_env <= 1:
        psi = np.ones((nb, 1))
    else:
        psi = np.stack([(k / k_max) ** i for i in range(n_env)], axis=1)
    pa = psi.shape[1]
    qtz = np.empty((n_p, pa, n_bg, nb))
    uu = np.empty((n_p, pa * pa, nb))
    uy = np.empty((n_p, pa, nb))
    for p in range(n_p):
        y, n = ys[p], ns[p]
        sq = np.sqrt(n)
        ok = n > 0
        fit = np.linalg.lstsq((phi * sq[:, None])[ok], (y * sq)[ok], rcond=None)[0]
        ysm = phi @ fit
        ysm = np.maximum(ysm, 1e-3 * np.max(np.abs(ysm[ok])) + 1e-30)
        sw = np.where(ok, sq / ysm, 0.0)
        q, _ = np.linalg.qr((phi * sw[:, None])[ok])
        qf = np.zeros((nb, q.shape[1]))
        qf[ok] = q
        yw = y * sw
        yp = yw - qf @ (qf.T @ yw)
        u = sw[:, None] * psi
        qtz[p] = np.einsum("ib,ia->abi", qf, u)
        uu[p] = np.einsum("ia,ib->abi", u, u).reshape(-1, nb)
        uy[p] = (u * yp[:, None]).T
    nj = ctf2.shape[0]
    proj = (ctf2 @ qtz.reshape(-1, nb).T).reshape(nj, n_p, pa, n_bg)
    g0 = ((ctf2 * ctf2) @ uu.reshape(-1, nb).T).reshape(nj, n_p, pa, pa)
    g = g0 - np.einsum("jpab,jpcb->jpac", proj, proj)
    h = (ctf2 @ uy.reshape(-1, nb).T).reshape(nj, n_p, pa)
    return _projected_drop(g0, g, h, psi).T


def _require_finite(scores: NDArray, what: str) -> None:
    """A NaN or Inf score is a failure, never a candidate: ``np.argmax`` takes a NaN for the
    maximum, so one non-finite score would otherwise become the search's answer."""
    if not np.all(np.isfinite(scores)):
        bad = int(np.count_nonzero(~np.isfinite(scores)))
        raise FitError(
            f"the coarse search's {what} scores hold {bad} NaN/Inf value(s) (a degenerate "
            "spectrum or CTF model); check the micrograph, --apix and the optics"
        )


def coarse_search(
    band: Band,
    optics: Optics,
    df_min: float,
    df_max: float,
    max_astig: float,
    phase_plate: bool = False,
    n_sectors: int = 18,
    n_best: int = 3,
) -> SearchResult:
    """Exhaustive search over mean defocus, astigmatism and (optionally) phase shift.

    Parameters
    ----------
    band
        Spectrum pixels of the coarse band.
    optics
        Optics (wavelength, Cs, amplitude contrast).
    df_min, df_max
        Mean defocus range (Å).
    max_astig
        Largest |U − V| (Å) considered.
    phase_plate
        Search the phase shift too, over [0°, 180°) in 15° steps (CTF² has period 180° in
        the phase shift, so this is every shift; the refinement takes it from there).
    n_sectors
        Angular sectors over 180°.
    n_best
        Number of distinct candidates returned.

    Raises
    ------
    FitError
        Where the spectrum or any score is NaN or Inf (:func:`_require_finite`).
    """
    if not np.all(np.isfinite(band.values)) or not np.all(np.isfinite(band.weights)):
        raise FitError("the spectrum holds NaN or Inf values; check the micrograph's pixels")
    lam = optics.wavelength
    kc = band.k_max
    step = 0.25 / (np.pi * lam * kc * kc)  # phase change of ≤ 0.25 rad at the band edge
    grid = np.arange(df_min, df_max + step, step)
    phases = np.deg2rad(np.arange(0.0, 180.0, 15.0)) if phase_plate else np.zeros(1)
    width = 0.5 * band.pixel_step
    values = band.values

    # 1. all-sector profile: defocus (and phase) ignoring astigmatism
    k, y, n = _bin_profile(band.rho_true, values, band.weights, band.k_min, band.k_max, width)
    df_all = np.repeat(grid, len(phases))
    ph_all = np.tile(phases, len(grid))
    s_all = profile_scores(k, y, n, _ctf2_1d(k, df_all, ph_all, optics), band.k_min, band.k_max)
    s_all = s_all.reshape(len(grid), len(phases))
    _require_finite(s_all, "defocus and phase")
    best_phase = phases[int(np.argmax(s_all.max(axis=0)))]
    profile_score = s_all[:, int(np.argmax(s_all.max(axis=0)))]

    # 2. per-sector score curves at that phase
    sec = np.minimum((band.theta_true / np.pi * n_sectors).astype(int), n_sectors - 1)
    curves = np.zeros((n_sectors, grid.size))
    centres = (np.arange(n_sectors) + 0.5) * np.pi / n_sectors
    # every sector's profile shares the bin centres, so one CTF² table serves all, and the
    # sectors are scored together (see _sector_scores)
    live_s = np.flatnonzero(np.bincount(sec, minlength=n_sectors) >= 50)
    if live_s.size:
        ks, ys, ns = _bin_sector_profiles(
            band.rho_true, values, band.weights, sec, n_sectors, band.k_min, band.k_max, width
        )
        c2 = _ctf2_1d(ks, grid, np.full(grid.size, best_phase), optics)
        curves[live_s] = _sector_scores(ks, ys[live_s], ns[live_s], c2, band.k_min, band.k_max)
        _require_finite(curves, "sector")

    # 3. grid over (z, a1, a2): sum of sector scores at the sector defocus
    h_max = 0.5 * max_astig
    na = int(np.ceil(h_max / step))
    av = np.arange(-na, na + 1) * step
    a1, a2 = np.meshgrid(av, av, indexing="ij")
    disc = a1**2 + a2**2 <= (h_max + 1e-9) ** 2
    a1, a2 = a1[disc], a2[disc]
    # sector defocus offset in grid steps, for each astigmatism candidate: (n_ast, n_sectors)
    off = a1[:, None] * np.cos(2 * centres)[None, :] + a2[:, None] * np.sin(2 * centres)[None, :]
    off = off / step
    live = [sc for sc in range(n_sectors) if curves[sc].any()]

    # linear interpolation of each sector's curve at column + offset: the columns are whole
    # grid points, so the integer part and the fraction of the offset are all that varies
    # (a gather from a zero-padded curve instead of a search per value, like np.interp with
    # zero outside the grid)
    pad = int(np.ceil(np.abs(off).max())) + 2 if off.size else 2
    whole = np.floor(off).astype(np.int64)
    frac = off - whole
    curves_p = np.zeros((n_sectors, grid.size + 2 * pad + 1))
    curves_p[:, pad : pad + grid.size] = curves

    def totals(cols: NDArray) -> NDArray:
        c = cols.astype(np.int64)
        out = np.zeros((a1.size, cols.size))
        for sc in live:
            j = whole[:, sc : sc + 1] + (c + pad)[None, :]
            fp = curves_p[sc]
            v = fp[j]
            v += frac[:, sc : sc + 1] * (fp[j + 1] - v)
            x = c[None, :] + off[:, sc : sc + 1]
            v[(x < 0) | (x > grid.size - 1)] = 0.0
            out += v
        return out

    # branch and bound over defocus: no astigmatism can score more at z than the sum of each
    # sector's best score within ±h_max of z, so columns are evaluated best-bound first and
    # the search stops once no remaining column can beat the n_best-th score found
    reach = int(np.ceil(h_max / step)) + 1
    bound = np.zeros(grid.size)
    for sc in live:
        padded = np.pad(curves[sc], reach)  # zeros beyond the grid, like the scores' interp
        bound += sliding_window_view(padded, 2 * reach + 1).max(axis=1)
    order = np.argsort(bound)[::-1]
    total = np.full((a1.size, grid.size), -np.inf)
    done = 0
    while done < order.size:
        cols = order[done : done + 32]
        total[:, cols] = totals(cols)
        done += cols.size
        kth = np.sort(total.max(axis=0))[::-1][min(4 * n_best, grid.size) - 1]
        if done < order.size and bound[order[done]] < kth:
            break
    total[~np.isfinite(total)] = -np.inf

    # 4. distinct best candidates
    cands: list[tuple[float, float, float, float]] = []
    scores: list[float] = []
    # only evaluated columns are finite; rank the best few thousand entries among them
    finite = np.flatnonzero(np.isfinite(total.ravel()))
    top = min(5000, finite.size)
    best = finite[np.argpartition(total.ravel()[finite], finite.size - top)[finite.size - top :]]
    flat = best[np.argsort(total.ravel()[best])[::-1]]
    for f in flat:
        ia, iz = np.unravel_index(f, total.shape)
        z, b1, b2 = grid[iz], a1[ia], a2[ia]
        if any(
            abs(z - c[0]) < 4 * step and np.hypot(b1 - c[1], b2 - c[2]) < 4 * step for c in cands
        ):
            continue
        cands.append((float(z), float(b1), float(b2), float(np.rad2deg(best_phase))))
        scores.append(float(total[ia, iz]))
        if len(cands) >= n_best:
            break
    noise = float(np.median(np.abs(profile_score - np.median(profile_score)))) + 1e-30
    signif = float((profile_score.max() - np.median(profile_score)) / noise)
    return SearchResult(cands, scores, grid, profile_score, signif)
