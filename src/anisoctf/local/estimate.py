"""Local defocus of one micrograph: specimen tilt, patch defocus, the surface and thickness.

The micrograph's global fit (:func:`anisoctf.fit.estimate_ctf`) comes first and is never
changed here: its astigmatism and phase shift are shared by every region, and a region that
fails cannot spoil it. Then:

1. each tile of a grid (``box`` pixels, side by side) gets its periodogram and its 1D
   equiphase profile (:mod:`.profiles`), scored against a grid of defocus offsets;
2. the **plane** ``D = d0 + g·(r − centre)`` maximises the summed tile scores: an exhaustive
   search over the gradient disc (up to ``max_tilt``), then a continuous refinement;
3. the profiles are rebuilt around the plane (each tile's own reference defocus, the blur of
   the ramp across a tile in the model) and the plane is refined again;
4. each of the N×M overlapping **patches** takes the summed scores of its tiles, each shifted
   by the plane's change between tile and patch centre, and finds its defocus and standard
   error; patches without significant rings (carbon, contamination, empty) are flagged;
5. a smooth **residual** spline through the patches' departures from the plane is kept when it
   explains them significantly better (robust weights; outlier patches get zero weight);
6. optionally the **sample thickness**: the rings' oscillation is damped by
   ``sinc(λ k² t)`` (a uniform slab of thickness ``t``); the thickness maximises the summed
   tile scores with every tile at its surface defocus.

Everything is in the true frame when the optics carry a magnification matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from anisoctf.errors import FitError
from anisoctf.fit.result import CTFEstimate, FitSettings
from anisoctf.fit.search import profile_scores
from anisoctf.local.profiles import (
    TileProfiles,
    _ctf2,
    modulation,
    score_curves,
    tile_profiles,
)
from anisoctf.local.surface import DefocusSurface, fit_residual_spline
from anisoctf.local.tilt import tilt_from_gradient
from anisoctf.optics.ctf import Optics
from anisoctf.spectrum.tiles import TileSpectra, tile_spectra

__all__ = ["LocalEstimate", "LocalSettings", "PatchEstimate", "estimate_local", "fit_local"]

#: a patch (or tile) needs at least this peak score (Δχ² against background alone) above its
#: median over the offsets to count as having rings
MIN_PEAK_SCORE = 25.0
#: resolution (Å) of the first, wide plane search (the final fit uses the whole local band)
PASS1_RES = 6.5
#: the local band reaches at least this resolution (Å) where the tiles can sample the rings
LOCAL_RES = 5.0


@dataclass(frozen=True)
class LocalSettings:
    """Options of the local estimation.

    Parameters
    ----------
    patches
        ``(nx, ny)``: patches along x (columns) and y (rows); neighbours overlap by half.
    box
        Tile size (pixels at the fitting pixel size).
    max_tilt_deg
        Largest specimen tilt searched.
    thickness
        Also estimate the sample thickness.
    max_thickness
        Largest thickness considered (Å).
    spline
        Allow a smooth residual on top of the plane.
    """

    patches: tuple[int, int] = (5, 5)
    box: int = 512
    max_tilt_deg: float = 60.0
    thickness: bool = False
    max_thickness: float = 4000.0
    spline: bool = True

    def __post_init__(self) -> None:
        if min(self.patches) < 1 or max(self.patches) > 50:
            raise ValueError(f"patches must be between 1x1 and 50x50, got {self.patches}")
        if not 0.0 <= self.max_tilt_deg < 80.0:
            raise ValueError(f"max tilt must be in [0, 80) degrees, got {self.max_tilt_deg}")


@dataclass(frozen=True)
class PatchEstimate:
    """Defocus of one patch.

    Attributes
    ----------
    x, y
        Patch centre (micrograph pixels).
    defocus
        Mean defocus at the centre (Å, true frame); NaN when the patch has no rings.
    sigma
        Standard error (Å).
    n_tiles
        Tiles that contributed.
    score
        Peak score (Δχ² over background alone).
    outlier
        True when the patch was left out of the surface (no rings, or inconsistent).
    """

    x: float
    y: float
    defocus: float
    sigma: float
    n_tiles: int
    score: float
    outlier: bool


@dataclass(frozen=True)
class LocalEstimate:
    """Result of :func:`fit_local`.

    Attributes
    ----------
    surface
        Defocus surface over the micrograph (plane + optional residual spline).
    tilt_angle, tilt_axis
        Specimen tilt (signed, degrees) and tilt axis angle ([0, 180) degrees); see
        :mod:`anisoctf.local.tilt` for the conventions.
    tilt_sigma
        Standard error of the tilt angle (degrees).
    patches
        The patch estimates (row-major: y outer, x inner).
    thickness
        Sample thickness (Å), or None when not estimated.
    thickness_sigma
        Its standard error (Å); inf when the rings do not constrain it.
    astigmatism, angle_deg, phase_shift_deg
        Shared by all regions (from the global fit).
    n_tiles
        Tiles in the grid; ``tile`` their size in micrograph pixels.
    warnings
        Remarks for a person.
    """

    surface: DefocusSurface
    tilt_angle: float
    tilt_axis: float
    tilt_sigma: float
    patches: tuple[PatchEstimate, ...]
    thickness: float | None
    thickness_sigma: float
    astigmatism: float
    angle_deg: float
    phase_shift_deg: float
    n_tiles: int
    tile: int
    warnings: tuple[str, ...] = ()

    def defocus_at(self, x: NDArray, y: NDArray) -> tuple[NDArray, NDArray, float]:
        """``(U, V, angle)`` at micrograph pixel positions (Å, Å, degrees)."""
        d = self.surface(x, y)
        h = 0.5 * self.astigmatism
        return d + h, d - h, self.angle_deg


def _k_window(optics: Optics, defocus: float, extent: float) -> float:
    """Highest frequency whose ring oscillation a tile of ``extent`` Å still sees: the
    oscillation at ``k`` pairs image points ``τ = 2λzk`` apart (the CTF's delocalisation), and
    a tapered tile keeps ``R(τ)/R(0)`` of them (modelled in the profiles); beyond
    ``τ = 0.6 extent`` that is below about a third. On the pixel grid this is finer than two
    pixels per ring period: binning by exact phase does not mind."""
    return 0.3 * extent / (optics.wavelength * max(defocus, 1000.0))


def _k_rings(glob: CTFEstimate) -> float:
    """Highest frequency with rings worth fitting: a little beyond the global fit resolution,
    but never below ``1/LOCAL_RES``: the global fit's resolution understates a tilted
    micrograph's rings (the tilt blurs them in the whole-image spectrum)."""
    res = glob.fit_resolution
    k_fit = 1.1 / res if np.isfinite(res) and res > 0 else np.inf
    return max(k_fit, 1.0 / LOCAL_RES)


def _k_pass2(glob: CTFEstimate, plane: NDArray, xs: NDArray, ys: NDArray, lam: float) -> float:
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


def _local_band(
    settings: FitSettings, glob: CTFEstimate, tiles: TileSpectra, optics: Optics
) -> tuple[float, float]:
    """Band of the tile profiles: the fit band, cut where a tile no longer sees the rings
    (:func:`_k_window`) and where the global fit lost them (but not before ``LOCAL_RES``)."""
    k_min = 1.0 / settings.min_res
    z = max(glob.params.defocus_u, 1000.0)
    step = 1.0 / (tiles.box * tiles.pixel_size)
    k_sample = _k_window(optics, z, 1.0 / step)
    k_max = min(1.0 / settings.max_res, k_sample, _k_rings(glob), 0.5 / tiles.pixel_size)
    if k_max < 2.0 * k_min:
        k_max = min(2.0 * k_min, 0.5 / tiles.pixel_size)
    return k_min, k_max


def _interp_rows(curves: NDArray, offsets: NDArray, q: NDArray) -> NDArray:
    """Each tile's curve at offsets ``q`` (..., n_tiles) by Catmull–Rom cubic interpolation
    (smooth, so a maximum need not sit on a grid point); 0 outside the grid."""
    h = offsets[1] - offsets[0]
    pos = (q - offsets[0]) / h
    i = np.floor(pos).astype(np.int64)
    f = pos - i
    nt, nj = curves.shape
    ok = (i >= 0) & (i < nj - 1)
    i = np.clip(i, 0, nj - 2)
    t = np.arange(nt)
    p1 = curves[t, i]
    p2 = curves[t, i + 1]
    p0 = curves[t, np.maximum(i - 1, 0)]
    p3 = curves[t, np.minimum(i + 2, nj - 1)]
    f2 = f * f
    f3 = f2 * f
    v = 0.5 * (
        2.0 * p1
        + (p2 - p0) * f
        + (2.0 * p0 - 5.0 * p1 + 4.0 * p2 - p3) * f2
        + (3.0 * p1 - p0 - 3.0 * p2 + p3) * f3
    )
    return np.where(ok, v, 0.0)


def _plane_score(
    curves: NDArray, offsets: NDArray, z_ref: NDArray, xs: NDArray, ys: NDArray, p: NDArray
) -> float:
    q = p[0] + p[1] * xs + p[2] * ys - z_ref
    return float(_interp_rows(curves, offsets, q[None, :]).sum())


def _nelder_mead(f, simplex: NDArray, xatol: float, fatol: float, max_iter: int = 400) -> NDArray:
    """Minimise ``f`` from the given starting simplex (standard Nelder–Mead: reflection,
    expansion, contraction, shrink); stops when the simplex is smaller than ``xatol`` in every
    coordinate and its values agree within ``fatol``. (Our own, so that a local fit does not
    import scipy.optimize, which costs a tenth of a second per process.)"""
    x = np.array(simplex, dtype=np.float64)
    fx = np.array([f(v) for v in x])
    for _ in range(max_iter):
        order = np.argsort(fx)
        x, fx = x[order], fx[order]
        if np.max(np.abs(x[1:] - x[0])) <= xatol and np.max(np.abs(fx[1:] - fx[0])) <= fatol:
            break
        centre = x[:-1].mean(axis=0)
        xr = centre + (centre - x[-1])
        fr = f(xr)
        if fr < fx[0]:
            xe = centre + 2.0 * (centre - x[-1])
            fe = f(xe)
            x[-1], fx[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < fx[-2]:
            x[-1], fx[-1] = xr, fr
        else:
            outside = fr < fx[-1]
            xc = centre + 0.5 * ((xr if outside else x[-1]) - centre)
            fc = f(xc)
            if fc < (fr if outside else fx[-1]):
                x[-1], fx[-1] = xc, fc
            else:  # shrink towards the best vertex
                x[1:] = x[0] + 0.5 * (x[1:] - x[0])
                fx[1:] = [f(v) for v in x[1:]]
    return x[int(np.argmin(fx))]


def _refine_plane(
    curves: NDArray, offsets: NDArray, z_ref: NDArray, xs: NDArray, ys: NDArray, p0: NDArray
) -> NDArray:
    """Continuous maximisation of the summed tile scores over the plane (Nelder–Mead)."""
    h = float(offsets[1] - offsets[0])
    r = max(float(np.max(np.abs(np.concatenate([xs, ys])))), 1.0)
    scale = np.array([h, h / r, h / r])

    def neg(v: NDArray) -> float:
        return -_plane_score(curves, offsets, z_ref, xs, ys, p0 + v * scale)

    return p0 + _nelder_mead(neg, np.eye(4, 3), xatol=0.02, fatol=1e-3) * scale


def _interp_linear(curves: NDArray, offsets: NDArray, q: NDArray) -> NDArray:
    """Linear interpolation of each tile's curve at offsets ``q`` (..., n_tiles); 0 outside."""
    h = offsets[1] - offsets[0]
    pos = (q - offsets[0]) / h
    i = pos.astype(np.int64)
    f = pos - i
    nt, nj = curves.shape
    bad = (pos < 0) | (i >= nj - 1)
    i = np.clip(i, 0, nj - 2)
    flat = curves.ravel()
    base = i + (np.arange(nt) * nj)
    v = flat[base] * (1.0 - f) + flat[base + 1] * f
    v[bad] = 0.0
    return v


def _max_filter(curves: NDArray, half: int) -> NDArray:
    """Running maximum of each row over ±``half`` samples (zeros beyond the ends)."""
    from numpy.lib.stride_tricks import sliding_window_view

    padded = np.pad(curves, ((0, 0), (half, half)))
    return sliding_window_view(padded, 2 * half + 1, axis=1).max(axis=2)


def _search_plane(
    curves: NDArray,
    offsets: NDArray,
    z_ref: NDArray,
    xs: NDArray,
    ys: NDArray,
    d_centre: float,
    max_grad: float,
) -> NDArray:
    """Exhaustive search of ``(d0, gx, gy)`` (gradient in Å per Å), coarse to fine.

    Each level scores a grid of planes on the tile curves max-filtered over the level's
    defocus step (so no peak falls between grid points), then the next level searches a finer
    grid around the best plane.
    """
    h = float(offsets[1] - offsets[0])
    r = max(float(np.max(np.hypot(xs, ys))), 1.0)
    best = np.array([d_centre, 0.0, 0.0])
    span_g, span_d = max_grad, 6.0 * 2.0 * h
    for step_h in (8.0, 2.0):
        wide = _max_filter(curves, int(step_h))
        dg = step_h * h / r
        ng = int(np.ceil(span_g / dg))
        gv = np.arange(-ng, ng + 1) * dg
        gx, gy = np.meshgrid(best[1] + gv, best[2] + gv, indexing="ij")
        keep = (gx**2 + gy**2 <= (max_grad + 1e-12) ** 2) & (
            (gx - best[1]) ** 2 + (gy - best[2]) ** 2 <= (span_g + 1e-12) ** 2
        )
        gx, gy = gx[keep], gy[keep]
        nd = int(np.ceil(span_d / (step_h * h)))
        d0s = best[0] + np.arange(-nd, nd + 1) * step_h * h
        ramp = gx[:, None] * xs[None, :] + gy[:, None] * ys[None, :] - z_ref[None, :]
        top, top_p = -np.inf, best
        for d0 in d0s:
            tot = _interp_linear(wide, offsets, d0 + ramp).sum(axis=1)
            i = int(np.argmax(tot))
            if tot[i] > top:
                top, top_p = float(tot[i]), np.array([d0, gx[i], gy[i]])
        best = top_p
        span_g, span_d = 1.5 * dg, 1.5 * step_h * h
    return best


def _vote_caps(peaks: NDArray, factor: float = 2.0) -> NDArray:
    """Per-tile factors that cap each tile's peak score at ``factor`` × the median of the tiles
    with rings (1 for the others)."""
    ringed = peaks[peaks > MIN_PEAK_SCORE]
    if ringed.size == 0:
        return np.ones_like(peaks)
    cap = factor * float(np.median(ringed))
    return np.minimum(1.0, cap / np.maximum(peaks, 1e-12))


def _consensus_outliers(
    curves: NDArray,
    offsets: NDArray,
    z_ref: NDArray,
    xs: NDArray,
    ys: NDArray,
    step: float,
    trials: int = 3000,
) -> NDArray | None:
    """Tiles outside the largest set of tile peaks that one plane explains (None if unclear).

    Each tile with rings has its own peak defocus and standard error; planes through random
    triples of them are scored by how many peaks they pass within ``max(3 SD, 2 step)``.
    """
    nt = len(curves)
    pos = np.zeros(nt)
    sd = np.full(nt, np.inf)
    ringed = np.zeros(nt, dtype=bool)
    for t in range(nt):
        p_, s_, top = _peak(curves[t], offsets)
        pos[t], sd[t] = p_ + z_ref[t], s_
        ringed[t] = top - float(np.median(curves[t])) > MIN_PEAK_SCORE and np.isfinite(s_)
    idx = np.flatnonzero(ringed)
    if idx.size < 6:
        return None
    rng = np.random.default_rng(0)
    tri = idx[rng.integers(0, idx.size, (trials, 3))]
    tri = tri[(tri[:, 0] != tri[:, 1]) & (tri[:, 0] != tri[:, 2]) & (tri[:, 1] != tri[:, 2])]
    a = np.stack([np.ones(tri.shape), xs[tri], ys[tri]], axis=2)  # (T, 3, 3)
    det = np.linalg.det(a)
    ok = np.abs(det) > 1e-6 * (np.ptp(xs) * np.ptp(ys) + 1.0)
    tri, a = tri[ok], a[ok]
    if len(tri) == 0:
        return None
    coef = np.linalg.solve(a, pos[tri][..., None])[..., 0]  # (T, 3)
    pred = coef[:, :1] + coef[:, 1:2] * xs[idx][None, :] + coef[:, 2:3] * ys[idx][None, :]
    tol = np.maximum(3.0 * sd[idx], 2.0 * step)
    inl = np.abs(pred - pos[idx][None, :]) <= tol[None, :]
    best = int(np.argmax(inl.sum(axis=1)))
    good = inl[best]
    if good.sum() < 0.5 * idx.size:  # no clear majority: leave the tiles as they are
        return None
    out = np.zeros(nt, dtype=bool)
    out[idx[~good]] = True
    return out


def _peak(curve: NDArray, grid: NDArray) -> tuple[float, float, float]:
    """Sub-grid peak position, standard error (curvature of a Δχ² curve) and peak height."""
    i = int(np.argmax(curve))
    if 0 < i < curve.size - 1:
        a, b, c = curve[i - 1], curve[i], curve[i + 1]
        den = a - 2.0 * b + c
        h = grid[1] - grid[0]
        if den < 0:
            shift = 0.5 * (a - c) / den
            pos = grid[i] + shift * h
            curv = -den / h**2  # -d²S/dδ²
            return (
                float(pos),
                float(np.sqrt(2.0 / curv)),
                float(b - 0.125 * (a - c) * (a - c) / den),
            )
    return float(grid[i]), float("inf"), float(curve[i])


def _thickness_curve(
    prof: TileProfiles,
    optics: Optics,
    offsets: NDArray,
    thick: NDArray,
    phase_deg: float,
    spreads: NDArray,
    weights: NDArray,
    decay: NDArray | None = None,
) -> NDArray:
    """Summed tile score against the sample thickness (each tile at its surface defocus).

    The envelope of the rings is ``(c0 + c1 k) · exp(−b k²)`` with ``c0, c1`` free per tile
    and the Gaussian decay ``b`` (a B-factor, the detector) shared by all tiles and profiled
    out: a smooth fading of the rings must not read as thickness, while the nodes of
    ``sinc(λ k² t)`` and the contrast reversal beyond them can only come from thickness.
    """
    decay = (
        np.concatenate([np.arange(0.0, 100.0, 10.0), np.arange(100.0, 401.0, 25.0)])
        if decay is None
        else decay
    )
    total = np.zeros((thick.size, decay.size))
    for t in range(prof.y.shape[0]):
        ok = prof.n[t] > 0
        if ok.sum() < 16 or weights[t] <= 0:
            continue
        k2 = prof.k2[t]
        rows = np.empty((thick.size, k2.size))
        for i, th in enumerate(thick):
            mod = modulation(k2, optics, float(th), (spreads[t, 0], spreads[t, 1]))
            rows[i] = _ctf2(prof, t, np.array([offsets[t]]), optics, phase_deg, mod)[0]
        damp = np.exp(-decay[:, None] * k2[None, :])  # (n_b, n_bins)
        c2 = (rows[:, None, :] * damp[None, :, :]).reshape(-1, k2.size)
        total += weights[t] * profile_scores(
            np.sqrt(k2), prof.y[t], prof.n[t], c2, prof.k_min, prof.k_max
        ).reshape(thick.size, decay.size)
    return total.max(axis=1)


def _fit_thickness(
    tiles: TileSpectra,
    opt: Optics,
    p,
    settings: FitSettings,
    local: LocalSettings,
    surface: DefocusSurface,
    apix: float,
    fit_resolution: float = float("nan"),
) -> tuple[float, float, list[str]]:
    """Sample thickness (Å), its standard error and remarks.

    ``tiles`` may be larger than those of the defocus fit: the band reaches as far as a tile
    can sample the rings, beyond the global fit resolution (past the first node of a thick
    sample the rings come back with reversed contrast), and a larger tile samples finer rings.
    Each tile sits at its surface defocus, with the ramp across it in the model.
    """
    warnings: list[str] = []
    lam = opt.wavelength
    z = max(p.defocus_u, 1000.0)
    step_k = 1.0 / (tiles.box * tiles.pixel_size)
    k_min = 1.0 / settings.min_res
    k_max = min(
        1.0 / settings.max_res, 1.0 / (2.0 * lam * z * 3.0 * step_k), 0.5 / tiles.pixel_size
    )
    if np.isfinite(fit_resolution) and fit_resolution > 0:
        # beyond the rings the global fit saw (plus room for the lobe after a node) there is
        # only noise, which a thick-sample model would "explain" by switching the rings off
        k_max = min(k_max, 2.0 / fit_resolution)
    tx, ty = tiles.centres[:, 0], tiles.centres[:, 1]
    z_ref = surface(tx, ty)
    prof = tile_profiles(tiles, opt, p, z_ref, k_min, k_max, apix, exact_window=True)
    side = tiles.tile * 0.9  # pixels (the taper shortens the tile a little)
    spreads = np.stack(
        [
            np.full(tiles.n_tiles, abs(surface.gx) * side),
            np.full(tiles.n_tiles, abs(surface.gy) * side),
        ],
        axis=1,
    )
    # nodes of sinc(λ k² t) move by a ring or so across the band per step
    step = max(10.0, 0.05 / (lam * k_max * k_max))
    thick = np.arange(0.0, local.max_thickness + step, step)
    curve = _thickness_curve(
        prof, opt, np.zeros(tiles.n_tiles), thick, p.phase_shift_deg, spreads, tiles.weights
    )
    i = int(np.argmax(curve))
    pos, sd, top = _peak(curve, thick)
    gain = float(top - curve[0])
    # thinnest sample whose first ring node (k² = 1/(λt)) lies well inside the band
    t_limit = 1.0 / (lam * (0.7 * k_max) ** 2)
    if i == 0 or gain < 25.0:
        warnings.append(
            f"no sign of sample thickness (detectable from about {t_limit:.0f} Å, when the "
            f"first ring node lies inside {1 / k_max:.1f} Å)"
        )
        return 0.0, float("inf"), warnings
    thickness = float(max(pos, 0.0))
    if thickness >= local.max_thickness - step:
        warnings.append("thickness at the limit of the search range")
    if thickness < t_limit:
        warnings.append(
            f"thickness {thickness:.0f} Å is below what the rings show reliably "
            f"(~{t_limit:.0f} Å); treat it as an upper bound"
        )
    return thickness, float(sd), warnings


def _patch_centres(shape: tuple[int, int], patches: tuple[int, int]) -> tuple[NDArray, NDArray]:
    ny, nx = shape
    npx, npy = patches
    px = (np.arange(npx) + 1.0) * nx / (npx + 1.0)
    py = (np.arange(npy) + 1.0) * ny / (npy + 1.0)
    gy, gx = np.meshgrid(py, px, indexing="ij")
    return gx.ravel(), gy.ravel()


def fit_local(
    tiles: TileSpectra,
    optics: Optics,
    glob: CTFEstimate,
    settings: FitSettings | None = None,
    local: LocalSettings | None = None,
    name: str | None = None,
    thickness_tiles: TileSpectra | None = None,
) -> LocalEstimate:
    """Fit the defocus plane, the patches, the surface (and the thickness) from tile spectra.

    Parameters
    ----------
    tiles
        Per-tile periodograms of the micrograph (:func:`anisoctf.spectrum.tiles.tile_spectra`).
    optics
        Optics of the micrograph (pixel size of the micrograph).
    glob
        The micrograph's global CTF estimate (astigmatism and phase are shared).
    settings
        The fit settings of the global estimate (resolution band).
    local
        Patch grid and options.
    name
        File name for messages.
    thickness_tiles
        Tiles for the thickness (larger ones sample finer rings); default ``tiles``.
    """
    settings = settings or FitSettings()
    local = local or LocalSettings()
    opt = optics.with_pixel_size(tiles.pixel_size)
    p = glob.params
    phase = p.phase_shift_deg
    k_min, k_max = _local_band(settings, glob, tiles, opt)
    apix = optics.pixel_size  # micrograph pixels
    ny, nx = tiles.image_shape
    cx, cy = 0.5 * nx, 0.5 * ny
    xs = (tiles.centres[:, 0] - cx) * apix  # Å from the centre (observed frame)
    ys = (tiles.centres[:, 1] - cy) * apix
    w = tiles.weights
    z_glob = p.mean_defocus
    warnings: list[str] = []

    lam = opt.wavelength
    h = 0.125 / (np.pi * lam * k_max * k_max)  # ≤ 1/8 rad of phase per step at the band edge
    max_grad = float(np.tan(np.deg2rad(local.max_tilt_deg)))

    # pass 1 (a first plane): every tile referred to the global defocus, in a lower band
    # (coarser defocus steps over the wide range the tilt allows)
    k_max1 = max(min(k_max, 1.0 / PASS1_RES), min(2.0 * k_min, k_max))
    h1 = 0.125 / (np.pi * lam * k_max1 * k_max1)
    reach = max_grad * float(np.max(np.hypot(xs, ys))) + 6.0 * 2.0 * h1 + 200.0
    reach = min(reach, 0.9 * z_glob)
    offsets = np.arange(-np.ceil(reach / h1), np.ceil(reach / h1) + 1) * h1
    z_ref = np.full(tiles.n_tiles, z_glob)
    prof = tile_profiles(tiles, opt, p, z_ref, k_min, k_max1, apix, row_stride=2)
    curves = score_curves(prof, opt, offsets, phase) * w[:, None]
    peaks = curves.max(axis=1) - np.median(curves, axis=1)
    if not np.any(peaks > MIN_PEAK_SCORE):
        raise FitError("no tile of the micrograph shows Thon rings on its own", path=name)
    # votes, not just evidence: a tile's weight is capped at twice the typical tile's, so a
    # region with much stronger rings (carbon at another height) cannot carry the plane alone
    cap = _vote_caps(peaks)
    curves = curves * cap[:, None]
    plane = _search_plane(curves, offsets, z_ref, xs, ys, z_glob, max_grad)
    plane = _refine_plane(curves, offsets, z_ref, xs, ys, plane)
    # consensus: the plane through the most tiles' own peaks (RANSAC over tile triples); tiles
    # outside it (carbon at another height, contamination) are faded out and the plane searched
    # again, so that a minority with strong rings cannot tilt it
    outside = _consensus_outliers(curves, offsets, z_ref, xs, ys, h1)
    if outside is not None and outside.any():
        keep = np.where(outside, 0.02, 1.0)
        plane = _search_plane(curves * keep[:, None], offsets, z_ref, xs, ys, z_glob, max_grad)
        plane = _refine_plane(curves * keep[:, None], offsets, z_ref, xs, ys, plane)
        cap = cap * keep

    # pass 2: profiles around the plane, with the ramp's blur across each tile in the model,
    # over a band that ends where the global fit lost the rings, unless the tilt itself (the
    # defocus spread across the whole image) is what blurred them there
    k_max = min(k_max, _k_pass2(glob, plane, xs, ys, lam))
    h = 0.125 / (np.pi * lam * k_max * k_max)
    for _ in range(1):
        z_ref = plane[0] + plane[1] * xs + plane[2] * ys
        side = tiles.tile * apix * 0.9  # the taper shortens the tile a little
        spreads = np.stack(
            [np.full_like(xs, abs(plane[1]) * side), np.full_like(xs, abs(plane[2]) * side)], axis=1
        )
        prof = tile_profiles(tiles, opt, p, z_ref, k_min, k_max, apix)
        n2 = int(np.ceil(max(600.0, 12.0 * h) / h))
        offsets2 = np.arange(-n2, n2 + 1) * h
        curves2 = score_curves(prof, opt, offsets2, phase, spreads=spreads)
        # tiles whose own peak disagrees strongly with the plane (carbon at another height,
        # contamination) are down-weighted before the final plane
        wt = w * np.minimum(cap, 1.0)
        for t in range(tiles.n_tiles):
            pos, sd, top = _peak(curves2[t], offsets2)
            if top - np.median(curves2[t]) > 4 * MIN_PEAK_SCORE and abs(pos) > 5 * sd + 150.0:
                wt[t] *= 0.1
        plane = _refine_plane(curves2 * wt[:, None], offsets2, z_ref, xs, ys, plane)
    z_ref_final = z_ref
    curves2 = curves2 * wt[:, None]

    # uncertainty of the gradient: curvature of the summed score around the optimum
    tilt_sigma = _tilt_sigma(curves2, offsets2, z_ref_final, xs, ys, plane)

    # patches
    pxs, pys = _patch_centres(tiles.image_shape, local.patches)
    half_x = nx / (local.patches[0] + 1.0)
    half_y = ny / (local.patches[1] + 1.0)
    tx, ty = tiles.centres[:, 0], tiles.centres[:, 1]
    patch_list: list[PatchEstimate] = []
    grid = offsets2
    for qx, qy in zip(pxs, pys, strict=True):
        member = (np.abs(tx - qx) <= half_x) & (np.abs(ty - qy) <= half_y)
        if not member.any():
            member = np.zeros(tiles.n_tiles, dtype=bool)
            member[int(np.argmin(np.hypot(tx - qx, ty - qy)))] = True
        idx = np.flatnonzero(member)
        d_plane = plane[0] + plane[1] * (qx - cx) * apix + plane[2] * (qy - cy) * apix
        # tile t at patch defocus d_plane + δ has offset (d_plane + δ + ramp) − z_ref_t
        ramp = plane[1] * (tx[idx] - qx) * apix + plane[2] * (ty[idx] - qy) * apix
        q = d_plane + grid[:, None] + ramp[None, :] - z_ref_final[idx][None, :]
        total = _interp_rows(curves2[idx], offsets2, q).sum(axis=1)
        pos, sd, top = _peak(total, grid)
        has_rings = top - float(np.median(total)) > MIN_PEAK_SCORE and np.isfinite(sd)
        patch_list.append(
            PatchEstimate(
                x=float(qx),
                y=float(qy),
                defocus=float(d_plane + pos) if has_rings else float("nan"),
                sigma=float(sd) if has_rings else float("inf"),
                n_tiles=int(idx.size),
                score=float(top),
                outlier=not has_rings,
            )
        )

    gx_pix, gy_pix = plane[1] * apix, plane[2] * apix
    surface = DefocusSurface(shape=(ny, nx), d0=float(plane[0]), gx=float(gx_pix), gy=float(gy_pix))
    surface, patch_list = _robust_surface(surface, patch_list, local)
    n_out = sum(pp.outlier for pp in patch_list)
    if n_out:
        warnings.append(f"{n_out} of {len(patch_list)} patches left out of the surface")

    tilt, axis = tilt_from_gradient(gx_pix, gy_pix, apix, optics.M if optics.has_anisomag else None)

    thickness = None
    thickness_sigma = float("inf")
    if local.thickness:
        th_tiles = thickness_tiles or tiles
        thickness, thickness_sigma, more = _fit_thickness(
            th_tiles,
            optics.with_pixel_size(th_tiles.pixel_size),
            p,
            settings,
            local,
            surface,
            apix,
            glob.fit_resolution,
        )
        warnings += more

    return LocalEstimate(
        surface=surface,
        tilt_angle=float(tilt),
        tilt_axis=float(axis),
        tilt_sigma=float(tilt_sigma),
        patches=tuple(patch_list),
        thickness=thickness,
        thickness_sigma=float(thickness_sigma),
        astigmatism=float(p.astigmatism),
        angle_deg=float(p.angle_deg),
        phase_shift_deg=float(phase),
        n_tiles=tiles.n_tiles,
        tile=tiles.tile,
        warnings=tuple(warnings),
    )


def _tilt_sigma(
    curves: NDArray, offsets: NDArray, z_ref: NDArray, xs: NDArray, ys: NDArray, plane: NDArray
) -> float:
    """Standard error of the tilt angle from the numerical Hessian of the summed score."""
    h = float(offsets[1] - offsets[0])
    r = max(float(np.max(np.hypot(xs, ys))), 1.0)
    steps = np.array([h, h / r, h / r])
    f0 = _plane_score(curves, offsets, z_ref, xs, ys, plane)
    hess = np.zeros((3, 3))
    for i in range(3):
        for j in range(i, 3):
            ei = np.eye(3)[i] * steps[i]
            ej = np.eye(3)[j] * steps[j]
            fpp = _plane_score(curves, offsets, z_ref, xs, ys, plane + ei + ej)
            fpm = _plane_score(curves, offsets, z_ref, xs, ys, plane + ei - ej)
            fmp = _plane_score(curves, offsets, z_ref, xs, ys, plane - ei + ej)
            fmm = _plane_score(curves, offsets, z_ref, xs, ys, plane - ei - ej)
            hess[i, j] = hess[j, i] = (fpp - fpm - fmp + fmm) / (4 * steps[i] * steps[j])
    del f0
    try:
        cov = np.linalg.inv(-0.5 * hess)  # log-likelihood = score / 2
    except np.linalg.LinAlgError:
        return float("inf")
    g = np.hypot(plane[1], plane[2])
    if g > 0:
        u = np.array([0.0, plane[1] / g, plane[2] / g])
        var_g = float(u @ cov @ u)
    else:
        var_g = float(0.5 * (cov[1, 1] + cov[2, 2]))
    if not var_g > 0:
        return float("inf")
    return float(np.rad2deg(np.sqrt(var_g) / (1.0 + g * g)))


def _robust_surface(
    plane: DefocusSurface, patches: list[PatchEstimate], local: LocalSettings
) -> tuple[DefocusSurface, list[PatchEstimate]]:
    """Flag inconsistent patches and add a residual spline where the patches demand one."""
    ok = np.array([not pp.outlier for pp in patches])
    if ok.sum() == 0:
        return plane, patches
    x = np.array([pp.x for pp in patches])
    y = np.array([pp.y for pp in patches])
    d = np.array([pp.defocus for pp in patches])
    sd = np.array([pp.sigma for pp in patches])
    # model error floor: the patches are not points, the specimen not a perfect plane
    s = np.sqrt(np.where(ok, sd, 1.0) ** 2 + 10.0**2)
    resid = np.where(ok, d - plane.plane(x, y), 0.0)
    fit = np.zeros_like(resid)
    coef = np.zeros((0, 0))
    npx, npy = local.patches
    ncoef = (min(max(npy - 1, 0), 4), min(max(npx - 1, 0), 4))
    use_spline = local.spline and min(ncoef) >= 4 and ok.sum() >= 9
    good = ok.copy()
    for _ in range(4):
        if use_spline and good.sum() >= 9:
            c, gain, edf = fit_residual_spline(
                x[good], y[good], resid[good], s[good], plane.shape, ncoef
            )
            if gain > 2.0 * edf + 10.0:  # AIC-like: keep only a residual the data support
                coef = c
            else:
                coef = np.zeros((0, 0))
        cand = DefocusSurface(plane.shape, plane.d0, plane.gx, plane.gy, coef)
        fit = cand.residual(x, y)
        z = np.abs(resid - fit) / s
        # robust scale of the standardised residuals (at least 1: the errors are honest)
        scale = max(1.0, 1.4826 * float(np.median(z[good]))) if good.any() else 1.0
        new_good = ok & (z <= 4.0 * scale) | (ok & (np.abs(resid - fit) < 60.0))
        if np.array_equal(new_good, good):
            break
        good = new_good
    surf = DefocusSurface(plane.shape, plane.d0, plane.gx, plane.gy, coef)
    out = [
        PatchEstimate(pp.x, pp.y, pp.defocus, pp.sigma, pp.n_tiles, pp.score, not bool(g))
        for pp, g in zip(patches, good, strict=True)
    ]
    return surf, out


def _tiles_for_band(
    image: NDArray,
    optics: Optics,
    glob: CTFEstimate,
    settings: FitSettings,
    box: int,
    workers: int,
) -> TileSpectra:
    """The tile periodograms, from the micrograph binned 2×2 when the local band ends well
    below the binned Nyquist frequency (a quarter of the FFT work, the same tiles in Å).

    Binning by block means folds frequencies above the new Nyquist back into the band, damped
    by the block filter (to a third or less of their power at 0.3 cycles/pixel, where the CTF
    envelope has faded too); the margin kept below the new Nyquist keeps that off the band.
    """
    apix = optics.pixel_size
    ny, nx = np.shape(image)
    if settings.fit_pixel_size is None and box >= 256:
        extent = box * apix
        z = max(glob.params.defocus_u, 1000.0)
        k_sample = _k_window(optics, z, extent)
        k_max = min(1.0 / settings.max_res, k_sample, _k_rings(glob))
        if k_max <= 0.8 * 0.25 / apix:
            a = np.asarray(image)
            h, w = ny // 2, nx // 2
            binned = a[: 2 * h, : 2 * w].reshape(h, 2, w, 2).mean(axis=(1, 3), dtype=np.float32)
            t = tile_spectra(binned, 2.0 * apix, box=box // 2, workers=workers)
            return TileSpectra(
                power=t.power,
                centres=2.0 * t.centres + 0.5,
                pixel_size=t.pixel_size,
                tile=2 * t.tile,
                image_shape=(int(ny), int(nx)),
                weights=t.weights,
            )
    return tile_spectra(
        image, apix, box=box, fit_pixel_size=settings.fit_pixel_size, workers=workers
    )


def estimate_local(
    image: NDArray,
    optics: Optics,
    glob: CTFEstimate,
    settings: FitSettings | None = None,
    local: LocalSettings | None = None,
    workers: int = 1,
    name: str | None = None,
) -> LocalEstimate:
    """Local defocus of a micrograph whose global CTF ``glob`` is known.

    Parameters
    ----------
    image
        The micrograph (rows = y, columns = x).
    optics
        Its optics (pixel size of ``image``; magnification matrix for the true frame).
    glob
        Its global estimate (from :func:`anisoctf.fit.estimate_ctf`).
    settings
        Fit settings of the global estimate (band, fit pixel size).
    local
        Patch grid and options (``LocalSettings()`` if None).
    workers
        Threads for the FFTs.
    name
        File name for messages.

    Returns
    -------
    LocalEstimate
    """
    settings = settings or FitSettings()
    local = local or LocalSettings()
    ny, nx = np.shape(image)
    box = local.box
    while box > 128 and min(ny, nx) < 2 * box:  # at least 2×2 tiles
        box //= 2
    tiles = _tiles_for_band(image, optics, glob, settings, box, workers)
    if tiles.n_tiles < 4:
        raise FitError(
            f"image of {nx}x{ny} px is too small for local defocus (needs 2x2 tiles of {box} px)",
            path=name,
        )
    th_tiles = None
    if local.thickness and min(ny, nx) >= 4 * box:  # larger tiles sample finer rings
        th_tiles = tile_spectra(
            image,
            optics.pixel_size,
            box=2 * box,
            fit_pixel_size=settings.fit_pixel_size,
            workers=workers,
        )
    return fit_local(tiles, optics, glob, settings, local, name, thickness_tiles=th_tiles)
