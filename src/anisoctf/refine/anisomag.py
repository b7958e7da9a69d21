"""The magnification matrix from particles: linear least squares on the frequency displacement.

For a particle with observed spectrum ``X`` (origin moved to pixel 0), reference slice
``Q(k) = P(M₀ k)`` at the current matrix ``M₀``, CTF ``C`` and scale ``s``, a small change of
the matrix to ``M = (I + G) M₀`` displaces every true frequency ``t = M₀ k`` by ``d = G t``:

    X(k) ≈ s C [P(t) + ∇P(t) · d(k)]

(the CTF is held fixed: its defocus is rewritten with the same ``I + G`` afterwards, which keeps
its quadratic term unchanged, as RELION's CtfRefine does). Per pixel the least-squares terms

    A(k) = Σ_p w s² C² Re(u uᴴ),   b(k) = Σ_p w s C Re(ū (X − s C Q)),   u = ∇P(t)

are summed over all particles of an optics group (:class:`MagEquations`); the pixel grid is the
same for every particle, so this is the whole data reduction. ``∇P`` at the true frequency comes
from the slice itself: ``∇ₖQ = FFT(−2πi x q)`` with ``q`` the slice's real-space image
(origin at pixel 0), and ``∇P(t) = M₀⁻ᵀ ∇ₖQ``.

The matrix: minimise ``Σₖ dᵀ A d − 2 bᵀ d`` with ``d = G t`` — four unknowns, a 4×4 system
(:func:`solve_matrix`). Iterating (new ``M₀``, new slices) is Gauss–Newton; on noiseless data
the fixed point is the true matrix. The same equations solved per pixel bin give the
displacement field RELION shows, and solved per frequency shell the anisotropy of each shell
(:func:`shell_evidence`): the per-frequency evidence. With weights ``w = 1/σ²(k)`` (σ² the
noise power of the unnormalised ``rfft2``), ``cov(g) ≈ N⁻¹/2`` for the normal matrix ``N``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from anisoctf._lazy import lazy
from anisoctf.optics.magmat import MagMat
from anisoctf.refine.projection import image_frequencies, real_positions

#: scipy.fft costs 0.1–0.3 s to import; only the commands that need it pay for it
sfft = lazy("scipy.fft")

__all__ = [
    "MagEquations",
    "accumulate",
    "accumulate_band",
    "displacement_field",
    "slice_gradient",
    "shell_evidence",
    "solve_matrix",
    "update_matrix",
]


@dataclass
class MagEquations:
    """Per-pixel 2×2 least-squares terms of one optics group (half-plane layout)."""

    box: int
    axx: NDArray[np.float64]
    axy: NDArray[np.float64]
    ayy: NDArray[np.float64]
    bx: NDArray[np.float64]
    by: NDArray[np.float64]
    n_particles: int = 0

    @classmethod
    def zeros(cls, box: int) -> MagEquations:
        shape = (box, box // 2 + 1)
        return cls(box, *(np.zeros(shape) for _ in range(5)))

    def __iadd__(self, other: MagEquations) -> MagEquations:
        for name in ("axx", "axy", "ayy", "bx", "by"):
            getattr(self, name)[...] += getattr(other, name)
        self.n_particles += other.n_particles
        return self


def slice_gradient(q: NDArray[np.complexfloating], box: int) -> tuple[NDArray, NDArray]:
    """``∇ₖQ`` (per cycle/pixel) of half-plane slices ``q`` (P, box, box//2+1), origin at 0."""
    img = sfft.irfft2(q, s=(box, box), workers=-1)
    x, y = real_positions(box)
    gx = sfft.rfft2(img * x.astype(img.dtype), workers=-1) * (-2j * np.pi)
    gy = sfft.rfft2(img * y.astype(img.dtype), workers=-1) * (-2j * np.pi)
    return gx, gy


def accumulate(
    eqs: MagEquations,
    x0: NDArray[np.complexfloating],
    q: NDArray[np.complexfloating],
    ctf: NDArray[np.floating],
    scale: NDArray[np.floating],
    weight: NDArray[np.floating],
    m0: ArrayLike,
) -> None:
    """Add a batch of particles to ``eqs``.

    Parameters
    ----------
    x0
        Observed spectra with the origin moved to pixel 0 (P, box, box//2+1).
    q
        Reference slices at ``M₀ k`` (same shape).
    ctf
        CTF of each particle (same shape, real).
    scale
        Per-particle scale ``s`` (P,).
    weight
        Per-pixel weight ``w`` (box, box//2+1), zero outside the band.
    m0
        The current matrix ``M₀``.
    """
    p = x0.shape[0]
    w = np.asarray(weight, dtype=np.float64)
    idx = np.flatnonzero(w.reshape(-1) > 0)  # pixels with zero weight add nothing

    def band(a: NDArray) -> NDArray:
        return np.broadcast_to(a, x0.shape).reshape(p, -1)[:, idx]

    accumulate_band(eqs, band(x0), q, band(q), band(ctf), scale, w.reshape(-1)[idx], idx, m0)


def accumulate_band(
    eqs: MagEquations,
    x0: NDArray[np.complexfloating],
    q: NDArray[np.complexfloating],
    q_band: NDArray[np.complexfloating],
    ctf: NDArray[np.floating],
    scale: NDArray[np.floating],
    weight: NDArray[np.floating],
    pixels: NDArray[np.intp],
    m0: ArrayLike,
) -> None:
    """:func:`accumulate` on a subset of the pixels (the band), the slices given whole.

    Parameters
    ----------
    x0, q_band, ctf
        Observed spectra, reference slices and CTF on the pixels ``pixels`` only,
        ``(P, n_pixels)``.
    q
        The whole slices ``(P, box, box//2+1)`` (their gradient needs every pixel).
    scale
        Per-particle scale ``s`` (P,).
    weight
        Per-pixel weight on ``pixels`` (n_pixels,).
    pixels
        Flat indices into the ``(box, box//2+1)`` half plane.
    m0
        The current matrix ``M₀``.
    """
    box = eqs.box
    p = x0.shape[0]
    mi = np.linalg.inv(np.asarray(m0, dtype=float)).astype(np.float32)  # keep complex64
    gkx, gky = slice_gradient(q, box)
    gkx = gkx.reshape(p, -1)[:, pixels]
    gky = gky.reshape(p, -1)[:, pixels]
    # ∇P(t) = M0^-T ∇k Q
    gx = mi[0, 0] * gkx + mi[1, 0] * gky
    gy = mi[0, 1] * gkx + mi[1, 1] * gky
    sc = (scale[:, None] * ctf).astype(np.float32)
    r = x0 - sc * q_band
    ux = sc * gx
    uy = sc * gy
    w = np.asarray(weight, dtype=np.float64)

    def dot(a: NDArray, b: NDArray) -> NDArray[np.float64]:
        # Σ_p Re(a b̄) per pixel, accumulated in double precision
        return np.einsum("pj,pj->j", a.real, b.real, dtype=np.float64) + np.einsum(
            "pj,pj->j", a.imag, b.imag, dtype=np.float64
        )

    for name, a, b in (
        ("axx", ux, ux),
        ("ayy", uy, uy),
        ("axy", ux, uy),
        ("bx", ux, r),
        ("by", uy, r),
    ):
        getattr(eqs, name).reshape(-1)[pixels] += w * dot(a, b)
    eqs.n_particles += p


def _normal(
    eqs: MagEquations, m0: NDArray[np.float64], mask: NDArray[np.bool_]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """4×4 normal matrix and right-hand side over the pixels in ``mask``."""
    kx, ky = image_frequencies(eqs.box)
    tx = m0[0, 0] * kx + m0[0, 1] * ky
    ty = m0[1, 0] * kx + m0[1, 1] * ky
    tx, ty = tx[mask], ty[mask]
    a = np.array([[eqs.axx[mask], eqs.axy[mask]], [eqs.axy[mask], eqs.ayy[mask]]])
    b = np.array([eqs.bx[mask], eqs.by[mask]])
    tt = np.array([[tx * tx, tx * ty], [tx * ty, ty * ty]])
    n = np.empty((4, 4))
    for i in range(2):
        for j in range(2):
            n[2 * i : 2 * i + 2, 2 * j : 2 * j + 2] = np.sum(a[i, j] * tt, axis=-1)
    rhs = np.array([np.sum(b[0] * tx), np.sum(b[0] * ty), np.sum(b[1] * tx), np.sum(b[1] * ty)])
    return n, rhs


def solve_matrix(
    eqs: MagEquations, m0: ArrayLike, mask: NDArray[np.bool_] | None = None
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The update ``G`` (2×2) and the covariance (4×4) of its elements ``(g00, g01, g10, g11)``.

    Raises
    ------
    ValueError
        When the equations carry no information (no particles or an empty band).
    """
    m0 = np.asarray(m0, dtype=float)
    if mask is None:
        mask = np.ones(eqs.axx.shape, dtype=bool)
    n, rhs = _normal(eqs, m0, mask)
    if not np.all(np.isfinite(n)) or np.linalg.cond(n) > 1e12:
        raise ValueError("the magnification equations are singular (no signal in the band)")
    g = np.linalg.solve(n, rhs)
    cov = 0.5 * np.linalg.inv(n)
    return g.reshape(2, 2), cov


def update_matrix(m0: ArrayLike, g: ArrayLike) -> NDArray[np.float64]:
    """``M = (I + G) M₀``."""
    return (np.eye(2) + np.asarray(g, dtype=float)) @ np.asarray(m0, dtype=float)


def shell_evidence(
    eqs: MagEquations,
    m0: ArrayLike,
    pixel_size: float,
    band: tuple[float, float],
    n_shells: int = 8,
    n_draws: int = 200,
    seed: int = 0,
) -> list[dict[str, float]]:
    """Anisotropy and axis fitted separately in frequency shells (the per-frequency evidence).

    Each shell's matrix is ``(I + G_shell) M₀`` with ``G_shell`` solved from that shell's pixels
    only; the error bars are standard deviations over draws from ``N(g, N⁻¹/2)``. Besides the
    shell's own anisotropy and axis (biased upwards where noisy: an anisotropy is never
    negative) each row has the signed anisotropy along the axis fitted from all shells,
    ``200 (e₁ᵀ S e₁ − e₂ᵀ S e₂) / tr S`` with ``S = (M + Mᵀ)/2`` of the shell's matrix, which
    is linear in the data and scatters around the overall value when the anisotropy is real.

    Returns
    -------
    list of dict
        ``k_lo, k_hi`` (1/Å), ``resolution`` (Å, shell centre), ``n_pixels``,
        ``anisotropy_along_axis_percent``, ``anisotropy_along_axis_sd``,
        ``anisotropy_percent``, ``anisotropy_sd``, ``axis_deg``, ``axis_sd``.
    """
    m0 = np.asarray(m0, dtype=float)
    kx, ky = image_frequencies(eqs.box)
    k = np.hypot(kx, ky) / pixel_size
    edges = np.linspace(band[0], band[1], n_shells + 1)
    rng = np.random.default_rng(seed)
    g_all, _ = solve_matrix(eqs, m0, (k >= band[0]) & (k <= band[1]))
    try:
        theta = np.deg2rad(MagMat(update_matrix(m0, g_all)).axis_deg)
    except ValueError:
        theta = 0.0
    e1 = np.array([np.cos(theta), np.sin(theta)])
    e2 = np.array([-np.sin(theta), np.cos(theta)])

    def along(mat: NDArray[np.float64]) -> float:
        # signed anisotropy along the overall axis: linear in the matrix, so unbiased in noise
        sym = 0.5 * (mat + mat.T)  # the symmetric part, to first order in the rotation
        return float(200.0 * (e1 @ sym @ e1 - e2 @ sym @ e2) / np.trace(sym))

    out: list[dict[str, float]] = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        mask = (k >= lo) & (k < hi)
        row: dict[str, float] = {
            "k_lo": float(lo),
            "k_hi": float(hi),
            "resolution": float(2.0 / (lo + hi)),
            "n_pixels": int(mask.sum()),
        }
        try:
            g, cov = solve_matrix(eqs, m0, mask)
            mm = MagMat(update_matrix(m0, g))
        except (ValueError, np.linalg.LinAlgError):  # no signal, or a wild (invalid) matrix
            nan = float("nan")
            row.update(
                anisotropy_along_axis_percent=nan,
                anisotropy_along_axis_sd=nan,
                anisotropy_percent=nan,
                anisotropy_sd=nan,
                axis_deg=nan,
                axis_sd=nan,
            )
            out.append(row)
            continue
        draws = rng.multivariate_normal(g.reshape(-1), cov, size=n_draws)
        an, ax = [], []
        for d in draws:
            try:
                md = MagMat(update_matrix(m0, d.reshape(2, 2)))
            except ValueError:
                continue
            an.append(md.anisotropy_percent)
            ax.append(md.axis_deg)
        axd = (np.asarray(ax) - mm.axis_deg + 90.0) % 180.0 - 90.0
        al = [along(update_matrix(m0, d.reshape(2, 2))) for d in draws]
        row.update(
            anisotropy_along_axis_percent=along(mm.array),
            anisotropy_along_axis_sd=float(np.std(al)),
            anisotropy_percent=mm.anisotropy_percent,
            anisotropy_sd=float(np.std(an)) if an else float("nan"),
            axis_deg=mm.axis_deg,
            axis_sd=float(np.std(axd)) if ax else float("nan"),
        )
        out.append(row)
    return out


def displacement_field(
    eqs: MagEquations, m0: ArrayLike, g: ArrayLike, pixel_size: float, bin_px: int = 8
) -> dict[str, list]:
    """The per-frequency displacement RELION shows: solved in pixel bins, beside the model.

    The half plane is cut into ``bin_px × bin_px`` bins; in each the summed equations give
    the displacement ``d = A⁻¹ b`` of the true frequency (observed, 1/Å) and ``G t`` at the
    bin's mean frequency (model). Rows run over ky in FFT order shifted to increasing ky,
    columns over kx ≥ 0. Bins without signal are NaN.

    Returns
    -------
    dict
        ``kx``, ``ky`` (bin centres, 1/Å), ``observed_x``, ``observed_y``, ``model_x``,
        ``model_y`` (1/Å), nested lists ``[row][column]``.
    """
    m0 = np.asarray(m0, dtype=float)
    g = np.asarray(g, dtype=float)
    n = eqs.box
    kx, ky = image_frequencies(n)
    order = np.fft.fftshift(np.arange(n))  # rows in increasing ky
    arrs = [x[order] for x in (eqs.axx, eqs.axy, eqs.ayy, eqs.bx, eqs.by, kx, ky)]
    nb_y, nb_x = n // bin_px, (n // 2 + 1 + bin_px - 1) // bin_px

    def binned(a: NDArray) -> NDArray:
        pad = np.zeros((nb_y * bin_px, nb_x * bin_px))
        pad[: a.shape[0], : a.shape[1]] = a[: nb_y * bin_px]
        return pad.reshape(nb_y, bin_px, nb_x, bin_px).sum(axis=(1, 3))

    ones = np.ones_like(arrs[0])
    cnt = binned(ones)
    axx, axy, ayy, bx, by = (binned(a) for a in arrs[:5])
    mkx = binned(arrs[5]) / np.maximum(cnt, 1) / pixel_size
    mky = binned(arrs[6]) / np.maximum(cnt, 1) / pixel_size
    det = axx * ayy - axy * axy
    ok = det > 1e-12 * np.maximum(axx * ayy, 1e-300)
    safe = np.where(ok, det, 1.0)
    dx = np.where(ok, (ayy * bx - axy * by) / safe, np.nan) / pixel_size
    dy = np.where(ok, (axx * by - axy * bx) / safe, np.nan) / pixel_size
    tx = m0[0, 0] * mkx + m0[0, 1] * mky
    ty = m0[1, 0] * mkx + m0[1, 1] * mky
    mx = g[0, 0] * tx + g[0, 1] * ty
    my = g[1, 0] * tx + g[1, 1] * ty

    def lst(a: NDArray) -> list:
        return [[None if not np.isfinite(v) else float(v) for v in row] for row in a]

    return {
        "kx": lst(mkx),
        "ky": lst(mky),
        "observed_x": lst(dx),
        "observed_y": lst(dy),
        "model_x": lst(mx),
        "model_y": lst(my),
    }
