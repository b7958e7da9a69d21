"""The defocus plane ``D = d0 + g·(r − centre)`` that maximises the summed tile scores.

Each tile has a score curve over a grid of defocus offsets from its reference defocus
(:func:`anisoctf.local.profiles.score_curves`, Δχ² against the background alone). A plane is
scored by summing every tile's curve at the plane's defocus there (:func:`plane_score`). The
plane is found by an exhaustive coarse-to-fine search over the gradient disc
(:func:`search_plane`), then refined continuously with Nelder–Mead (:func:`refine_plane`;
Nelder & Mead, Comput. J. 7, 308 (1965)); tiles that no plane through the majority explains are
found by RANSAC over tile triples (:func:`consensus_outliers`; Fischler & Bolles, Commun. ACM
24, 381 (1981)); the final plane is refitted with flat-topped Tukey biweights of each tile's own
peak against it (:func:`robust_tile_weights`; an iteratively reweighted M-estimate: Beaton & Tukey,
Technometrics 16, 147 (1974)), so a mixed tile (half carbon, half ice) whose peak is pulled to
the carbon's height cannot lean on the plane. The tilt's standard error is read from the
curvature of the summed score (:func:`tilt_standard_error`).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from anisoctf.local.band import MIN_PEAK_SCORE

__all__ = [
    "consensus_outliers",
    "interp_linear",
    "interp_rows",
    "max_filter",
    "nelder_mead",
    "peak",
    "plane_score",
    "refine_plane",
    "robust_tile_weights",
    "search_plane",
    "tilt_standard_error",
    "vote_caps",
]


def interp_rows(curves: NDArray, offsets: NDArray, q: NDArray) -> NDArray:
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


def plane_score(
    curves: NDArray, offsets: NDArray, z_ref: NDArray, xs: NDArray, ys: NDArray, p: NDArray
) -> float:
    q = p[0] + p[1] * xs + p[2] * ys - z_ref
    return float(interp_rows(curves, offsets, q[None, :]).sum())


def nelder_mead(f, simplex: NDArray, xatol: float, fatol: float, max_iter: int = 400) -> NDArray:
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


def refine_plane(
    curves: NDArray, offsets: NDArray, z_ref: NDArray, xs: NDArray, ys: NDArray, p0: NDArray
) -> NDArray:
    """Continuous maximisation of the summed tile scores over the plane (Nelder–Mead)."""
    h = float(offsets[1] - offsets[0])
    r = max(float(np.max(np.abs(np.concatenate([xs, ys])))), 1.0)
    scale = np.array([h, h / r, h / r])

    def neg(v: NDArray) -> float:
        return -plane_score(curves, offsets, z_ref, xs, ys, p0 + v * scale)

    return p0 + nelder_mead(neg, np.eye(4, 3), xatol=0.02, fatol=1e-3) * scale


def interp_linear(curves: NDArray, offsets: NDArray, q: NDArray) -> NDArray:
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


def max_filter(curves: NDArray, half: int) -> NDArray:
    """Running maximum of each row over ±``half`` samples (zeros beyond the ends)."""
    from numpy.lib.stride_tricks import sliding_window_view

    padded = np.pad(curves, ((0, 0), (half, half)))
    return sliding_window_view(padded, 2 * half + 1, axis=1).max(axis=2)


def search_plane(
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
        wide = max_filter(curves, int(step_h))
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
            tot = interp_linear(wide, offsets, d0 + ramp).sum(axis=1)
            i = int(np.argmax(tot))
            if tot[i] > top:
                top, top_p = float(tot[i]), np.array([d0, gx[i], gy[i]])
        best = top_p
        span_g, span_d = 1.5 * dg, 1.5 * step_h * h
    return best


def vote_caps(peaks: NDArray, factor: float = 2.0) -> NDArray:
    """Per-tile factors that cap each tile's peak score at ``factor`` × the median of the tiles
    with rings (1 for the others)."""
    ringed = peaks[peaks > MIN_PEAK_SCORE]
    if ringed.size == 0:
        return np.ones_like(peaks)
    cap = factor * float(np.median(ringed))
    return np.minimum(1.0, cap / np.maximum(peaks, 1e-12))


def consensus_outliers(
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
        p_, s_, top = peak(curves[t], offsets)
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


def robust_tile_weights(
    curves: NDArray,
    offsets: NDArray,
    z_ref: NDArray,
    xs: NDArray,
    ys: NDArray,
    plane: NDArray,
    floor: float = 30.0,
    c: float = 3.0,
) -> NDArray:
    """Flat-topped Tukey biweights of the tiles' own peaks against ``plane``.

    Each tile with significant rings (peak ``MIN_PEAK_SCORE`` above its median) has its own
    peak defocus and standard error ``sd`` (the curve's curvature: its fit quality); its
    standardised residual ``r = (peak − plane) / sqrt(sd² + floor²)`` (``floor``: the plane is
    not exactly the specimen) keeps weight 1 for ``|r| ≤ c`` (a consistent tile keeps its whole
    vote), then ``(1 − ((|r| − c)/c)²)²`` falls to 0 at ``|r| = 2c``. A
    significant peak on the edge of the offset grid (far from the plane) weighs 0; tiles
    without a significant peak keep weight 1 (their curves are flat and pull nothing).
    """
    nt = len(curves)
    w = np.ones(nt)
    q = plane[0] + plane[1] * xs + plane[2] * ys - z_ref
    for t in range(nt):
        pos, sd, top = peak(curves[t], offsets)
        if not top - float(np.median(curves[t])) > MIN_PEAK_SCORE:
            continue
        if not np.isfinite(sd):
            w[t] = 0.0
            continue
        r = max(abs(pos - q[t]) / float(np.hypot(sd, floor)) - c, 0.0)
        w[t] = (1.0 - (r / c) ** 2) ** 2 if r < c else 0.0
    return w


def peak(curve: NDArray, grid: NDArray) -> tuple[float, float, float]:
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


def tilt_standard_error(
    curves: NDArray, offsets: NDArray, z_ref: NDArray, xs: NDArray, ys: NDArray, plane: NDArray
) -> float:
    """Standard error of the tilt angle from the numerical Hessian of the summed score."""
    h = float(offsets[1] - offsets[0])
    r = max(float(np.max(np.hypot(xs, ys))), 1.0)
    steps = np.array([h, h / r, h / r])
    f0 = plane_score(curves, offsets, z_ref, xs, ys, plane)
    hess = np.zeros((3, 3))
    for i in range(3):
        for j in range(i, 3):
            ei = np.eye(3)[i] * steps[i]
            ej = np.eye(3)[j] * steps[j]
            fpp = plane_score(curves, offsets, z_ref, xs, ys, plane + ei + ej)
            fpm = plane_score(curves, offsets, z_ref, xs, ys, plane + ei - ej)
            fmp = plane_score(curves, offsets, z_ref, xs, ys, plane - ei + ej)
            fmm = plane_score(curves, offsets, z_ref, xs, ys, plane - ei - ej)
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
