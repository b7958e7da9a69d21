"""Robust straight line ``y = c + g m`` with a 2-D response: the statistics of the detection.

* start: componentwise Theil–Sen slopes and median intercepts (Theil, Proc. K. Ned. Akad.
  Wet. 53, 386 (1950); Sen, J. Am. Stat. Assoc. 63, 1379 (1968); breakdown point 29 %);
* fit: iteratively reweighted least squares with Tukey's biweight on the length of the 2-D
  residual over a robust sigma held fixed (an MM-type scheme: Yohai, Ann. Stat. 15, 642
  (1987); Beaton & Tukey, Technometrics 16, 147 (1974), for the biweight), the sigma
  ``median |r| / sqrt(2 ln 2)`` (the median radius of a 2-D Gaussian) with a d.o.f. correction;
* the Tukey constant widened for few points (:func:`tukey_constant`);
* the heteroscedasticity-consistent (HC1) covariance of the slope (White, Econometrica 48, 817
  (1980); MacKinnon & White, J. Econom. 29, 305 (1985)), the Wald statistic ``g^T C^-1 g`` and
  its p-value in Hotelling's form (Hotelling, Ann. Math. Stat. 2, 360 (1931)).

The method and the reasons for each choice are in :mod:`anisoctf.magnification.detect`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from anisoctf._lazy import lazy

special = lazy("scipy.special")  # imported on first use (a second off every start-up)

__all__ = [
    "TUKEY_C",
    "RobustLine",
    "irls",
    "robust_line",
    "robust_sigma",
    "sandwich_cov",
    "theil_sen",
    "tukey_constant",
    "wald_p_value",
    "wald_statistic",
]

#: Tukey biweight tuning constant (in robust sigmas of the 2-D residual)
TUKEY_C = 4.685

# median of the radius of a 2-D isotropic Gaussian with unit sigma per component
_RAYLEIGH_MEDIAN = math.sqrt(2.0 * math.log(2.0))
# robust sigma never drops below this (Å): CTF programs report defocus to ~0.01 Å, and a
# noise-free table would otherwise give weights 0/0
_SIGMA_FLOOR = 0.05
_SCALE_STAGES = 2  # scale from the start, then once more from the first converged fit
# Theil-Sen start: all pairs up to this many micrographs, else a random sample of pairs
_THEIL_SEN_ALL_PAIRS = 400
_THEIL_SEN_PAIRS = 80_000


@dataclass
class RobustLine:
    """A fitted line ``y = c + g m`` (``y`` 2-D) with its final weights."""

    intercept: NDArray[np.float64]  # (2,)
    slope: NDArray[np.float64]  # (2,)
    weights: NDArray[np.float64]  # (n,) Tukey weights in [0, 1]
    sigma: float  # robust sigma per component (Å)
    residuals: NDArray[np.float64]  # (n, 2)


def theil_sen(m: NDArray[np.float64], y: NDArray[np.float64], rng: np.random.Generator):
    """Componentwise Theil–Sen slope and median intercept (breakdown point 29 %)."""
    n = m.size
    if n <= _THEIL_SEN_ALL_PAIRS:
        i, j = np.triu_indices(n, k=1)
    else:
        i = rng.integers(0, n, _THEIL_SEN_PAIRS)
        j = rng.integers(0, n, _THEIL_SEN_PAIRS)
    dm = m[j] - m[i]
    ok = np.abs(dm) > 1e-9 * max(float(np.max(np.abs(m))), 1.0)
    if np.count_nonzero(ok) == 0:
        return None
    slopes = (y[j][ok] - y[i][ok]) / dm[ok, None]
    g = np.median(slopes, axis=0)
    c = np.median(y - m[:, None] * g, axis=0)
    return c, g


def tukey_constant(n: int) -> float:
    """Tukey constant for ``n`` micrographs: ``TUKEY_C`` widened for a scale with few d.o.f.

    A point of a Gaussian table lies beyond ``TUKEY_C = 4.685`` sigmas with probability
    ``p = exp(-4.685²/2) = 1.7e-5`` when the sigma is known. With the sigma estimated from
    ``nu = 2 (n - 2)`` residual components the squared, scaled residual over 2 follows
    ``F(2, nu)``, so the constant keeping the same ``p`` is ``sqrt(2 F⁻¹(1 - p; 2, nu))``:
    10.8 for 6 micrographs, 5.3 for 24, 4.82 for 100, → 4.685.
    """
    p = math.exp(-0.5 * TUKEY_C**2)
    nu = 2.0 * max(n - 2, 1)
    return float(math.sqrt(2.0 * special.fdtri(2.0, nu, 1.0 - p)))


def robust_sigma(d: NDArray[np.float64], n_params: int = 2) -> float:
    """Per-component sigma from 2-D residual lengths (``median / sqrt(2 ln 2)``, d.o.f.)."""
    n = d.size
    scale = float(np.median(d)) / _RAYLEIGH_MEDIAN * math.sqrt(n / max(n - n_params, 1))
    return max(scale, _SIGMA_FLOOR)


def irls(
    x: NDArray[np.float64],
    y: NDArray[np.float64],
    c0: NDArray[np.float64],
    g: NDArray[np.float64],
    sigma: float,
    tukey_c: float,
    max_iter: int,
) -> tuple[NDArray[np.float64], NDArray[np.float64]] | None:
    """Tukey-biweight IRLS of ``y = c0 + g x`` at a fixed scale ``sigma``."""
    for _ in range(max_iter):
        r = y - c0[None, :] - x[:, None] * g[None, :]
        u = np.hypot(r[:, 0], r[:, 1]) / (tukey_c * sigma)
        w = np.where(u < 1.0, (1.0 - u * u) ** 2, 0.0)
        sw = float(np.sum(w))
        if np.count_nonzero(w) < 3 or sw <= 0.0:
            return None
        xw = float(np.sum(w * x)) / sw
        dx = x - xw
        sxx = float(np.sum(w * dx * dx))
        if not sxx > 1e-12 * max(float(np.sum(w * x * x)), 1.0):
            return None
        g_new = np.sum((w * dx)[:, None] * y, axis=0) / sxx
        c0_new = np.sum(w[:, None] * y, axis=0) / sw - g_new * xw
        step = max(float(np.max(np.abs(g_new - g))) * math.sqrt(sxx / sw),
                   float(np.max(np.abs(c0_new - c0))))  # fmt: skip
        g, c0 = g_new, c0_new
        if step < 1e-7 * sigma:
            break
    if not (np.all(np.isfinite(g)) and np.all(np.isfinite(c0))):
        return None
    return c0, g


def robust_line(
    m: NDArray[np.float64],
    y: NDArray[np.float64],
    start: tuple[NDArray[np.float64], NDArray[np.float64]],
    *,
    sigma: float | None = None,
    tukey_c: float = TUKEY_C,
    max_iter: int = 200,
) -> RobustLine | None:
    """Robust line ``y = c + g m``: Tukey-biweight IRLS at a fixed scale.

    Re-estimating the scale at every step lets a redescending fit collapse onto a few points
    of a small table (the scale shrinks, the others get rejected), so the scale is held fixed:
    given (bootstrap resamples use the full table's), or else estimated twice, from the
    residuals of ``start`` and then from those of the first converged fit (an MM-type scheme).
    Returns None when the fit degenerates (fewer than 3 points left, no defocus spread).
    """
    m_ref = float(np.median(m))
    x = m - m_ref
    g = np.asarray(start[1], dtype=float)
    c0 = np.asarray(start[0], dtype=float) + g * m_ref  # intercept at m_ref

    def resid(c0_, g_):
        r_ = y - c0_[None, :] - x[:, None] * g_[None, :]
        return r_, np.hypot(r_[:, 0], r_[:, 1])

    sigma_given = sigma
    stages = 1 if sigma is not None else _SCALE_STAGES
    for _ in range(stages):
        if sigma_given is None:
            sigma = robust_sigma(resid(c0, g)[1])
        assert sigma is not None
        out = irls(x, y, c0, g, sigma, tukey_c, max_iter)
        if out is None:
            return None
        c0, g = out
    assert sigma is not None
    r, d = resid(c0, g)
    u = d / (tukey_c * sigma)
    w = np.where(u < 1.0, (1.0 - u * u) ** 2, 0.0)
    return RobustLine(intercept=c0 - g * m_ref, slope=g, weights=w, sigma=sigma, residuals=r)


def sandwich_cov(m: NDArray[np.float64], line: RobustLine) -> NDArray[np.float64]:
    """HC1 covariance of the slope of a weighted fit (weights held fixed)."""
    w = line.weights
    used = w > 0
    n = int(np.count_nonzero(used))
    sw = float(np.sum(w))
    xw = float(np.sum(w * m)) / sw
    dx = m - xw
    sxx = float(np.sum(w * dx * dx))
    h = w * dx / sxx
    r = line.residuals
    cov = (h[:, None, None] ** 2 * r[:, :, None] * r[:, None, :]).sum(axis=0)
    return cov * (n / max(n - 2, 1))


def wald_statistic(g: NDArray[np.float64], cov: NDArray[np.float64]) -> float:
    """``g^T C^-1 g`` (inf when C is singular and g is not 0)."""
    if not np.all(np.isfinite(cov)):
        return float("nan")
    try:
        sol = np.linalg.solve(cov, g)
    except np.linalg.LinAlgError:
        return float("inf") if np.any(g != 0) else 0.0
    w = float(g @ sol)
    return w if w >= 0.0 else float("inf")


def wald_p_value(wald: float, n_used: int) -> float:
    """p-value of ``W = g^T C^-1 g`` for 2 slopes with ``n_used - 2`` residual d.o.f.

    Hotelling's form: ``W (nu - 1) / (2 nu)`` follows F(2, nu - 1) with ``nu = n_used - 2``;
    for many micrographs this is the chi-squared (2 d.o.f.) Wald test, ``p = exp(-W / 2)``.
    """
    if math.isnan(wald):
        return float("nan")
    if math.isinf(wald):
        return 0.0
    nu = n_used - 2
    if nu < 2:
        return float("nan")
    return float(special.fdtrc(2.0, nu - 1.0, wald * (nu - 1.0) / (2.0 * nu)))
