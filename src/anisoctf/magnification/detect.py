"""Detect anisotropic magnification from the CTF fits of many micrographs.

A CTF fit that does not know the magnification matrix ``M`` (``k_true = M k_obs``) reports the
observed-frame defocus matrix of each micrograph ``i``,

    D_obs,i = M^T (z_i I + A_i) M = z_i S + M^T A_i M,        S = M^T M,

with ``z_i`` the true mean defocus and ``A_i`` the real (objective-lens) astigmatism, a
traceless symmetric matrix that is the same for all micrographs up to a small random scatter.
Write a symmetric 2×2 matrix through its mean ``m = (Dxx + Dyy)/2`` and Cartesian astigmatism
``a = ((Dxx - Dyy)/2, Dxy)`` (``a = h (cos 2θ, sin 2θ)``, ``h = (U - V)/2``), and
``S = s0 I + [[s1, s2], [s2, -s1]]``. With ``B = M^T A M`` constant, ``m_i = z_i s0 + b0`` and
``a_i = z_i (s1, s2) + (b1, b2)``; eliminating ``z_i``,

    a_i = g m_i + c,        g = (s1, s2) / s0,        c = (b1, b2) - g b0,

**exactly** (no small-anisotropy approximation): the observed astigmatism is a straight line in
the observed mean defocus, and its slope ``g`` fixes ``S`` up to a scale. The per-micrograph
scatter of ``A_i`` and the fit errors are the noise of that line.

What is fitted and reported (:func:`detect_anisomag`):

* the line ``a = g m + c`` (both components at once, common weights) by iteratively reweighted
  least squares with Tukey's biweight on the length of the 2-D residual over a robust sigma
  (``median |r| / sqrt(2 ln 2)``, the median radius of a 2-D Gaussian, with a d.o.f.
  correction), started from componentwise Theil–Sen slopes. The sigma is held fixed during the
  iterations (taken from the start's residuals, then once more from the first converged fit's),
  because a redescending fit whose scale is re-estimated at every step can collapse onto a few
  points of a small table. The Tukey constant is 4.685 for many micrographs and is widened for
  few (:func:`tukey_constant`: 10.8 for 6, 5.3 for 24), so that a good micrograph is wrongly
  rejected with the same small probability (1.7e-5) whatever their number. A micrograph
  beyond it gets weight 0 and is *rejected*: a failed fit with a wrong defocus and a wrong
  astigmatism, or a 3000 Å astigmatism, does not bias the line. (A micrograph whose defocus
  alone is wrong moves along the line by only ``|g|`` times the error, e.g. 60 Å for 5000 Å at
  1.2 %, and cannot always be told apart; its pull on the slope is bounded by its weight);
* ``S = [[1 + g1, g2], [g2, 1 - g1]] / sqrt(1 - |g|²)`` (det 1) and ``M = S^(1/2)``, the
  symmetric positive square root. ``M`` is only defined up to a rotation on the left (which
  rotates ``A`` with it) and up to an isotropic scale (which multiplies every ``z_i``); the
  symmetric, unit-determinant choice is reported. Anisotropy and axis then follow exactly:
  ``anisotropy % = 200 (1 - sqrt(1 - |g|²)) / |g| ≈ 100 |g|`` and
  ``axis = atan2(g2, g1) / 2`` (:class:`~anisoctf.optics.magmat.MagMat`);
* the real astigmatism: the weighted mean of every used micrograph's astigmatism moved to the
  true frame with that ``M`` (``D_true = M^-T D_obs M^-1``);
* uncertainty: a bootstrap over micrographs (default 400 resamples, fixed seed), each resample
  refitted robustly (started from the full-data line); 95 % percentile intervals for the
  anisotropy and the axis (the axis interval is written around ``axis_deg``, not reduced mod
  180, so it may start below 0 or end above 180);
* ``significant``: a Wald test of ``g = 0`` at ``p < 0.001``, with ``W = g^T C^-1 g``
  computed with the bootstrap covariance *and* with the heteroscedasticity-consistent
  (sandwich, HC1) covariance of the weighted fit, taking the smaller ``W`` (the more
  conservative). Because ``C`` is estimated from few micrographs the p-value uses Hotelling's
  form, ``W (nu - 1) / (2 nu) ~ F(2, nu - 1)`` with ``nu = n_used - 2``, which tends to the
  usual ``p = exp(-W/2)`` (chi-squared, 2 d.o.f.) for many micrographs; *and* the lower end of
  the anisotropy interval must be above 0. The bootstrap anisotropy is a magnitude, positive
  whenever the slope is not exactly 0, so that second condition only guards against a
  degenerate bootstrap: the Wald test decides. (For the same reason the percentile interval
  of a small anisotropy lies above the estimate's noise floor and may not contain the point
  estimate; it is meaningful once the anisotropy is well above its standard error.) With
  ``n_bootstrap=0`` no intervals are computed and the sandwich test alone decides.

The precision is set by the scatter of the real astigmatism and the spread of defocus: the
standard error of each slope component is about ``sigma_a / (sd(m) sqrt(n))``, e.g. 20 Å
scatter per component, defocus 0.5–3 µm (sd 7200 Å) and 24 micrographs give 0.06 % in the
anisotropy and 1.4° in the axis at 1.2 %.

Plot (:func:`plot_detection`) and JSON (:func:`write_detection_json`) are written atomically.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from anisoctf._lazy import lazy
from anisoctf.errors import InputError
from anisoctf.io.atomic import write_bytes_atomic, write_text_atomic
from anisoctf.optics.frames import defocus_table_to_true
from anisoctf.optics.magmat import MagMat, to_relion

special = lazy("scipy.special")  # imported on first use (a second off every start-up)

__all__ = [
    "DEFAULT_BOOTSTRAP",
    "MIN_DEFOCUS_SPREAD",
    "MIN_MICROGRAPHS",
    "P_THRESHOLD",
    "TUKEY_C",
    "AnisoDetection",
    "ResidualRow",
    "anisotropy_from_slope",
    "astigmatism_components",
    "detect_anisomag",
    "format_p",
    "magmat_from_slope",
    "plot_detection",
    "residual_report",
    "tukey_constant",
    "write_detection_json",
]

#: bootstrap resamples by default
DEFAULT_BOOTSTRAP = 400
#: the Wald test's significance level
P_THRESHOLD = 1e-3
#: fewest micrographs a detection accepts (and fewest that must survive outlier rejection)
MIN_MICROGRAPHS = 6
#: smallest robust standard deviation of the mean defocus (Å) that separates slope and intercept
MIN_DEFOCUS_SPREAD = 500.0
#: Tukey biweight tuning constant (in robust sigmas of the 2-D residual)
TUKEY_C = 4.685

# median of the radius of a 2-D isotropic Gaussian with unit sigma per component
_RAYLEIGH_MEDIAN = math.sqrt(2.0 * math.log(2.0))
# robust sigma never drops below this (Å): CTF programs report defocus to ~0.01 Å, and a
# noise-free table would otherwise give weights 0/0
_SIGMA_FLOOR = 0.05
_SCALE_STAGES = 2  # scale from the start, then once more from the first converged fit
# slopes at or above this are not anisomag (|g| = 0.5 is 50 % anisotropy)
_MAX_SLOPE = 0.5
# Theil-Sen start: all pairs up to this many micrographs, else a random sample of pairs
_THEIL_SEN_ALL_PAIRS = 400
_THEIL_SEN_PAIRS = 80_000


# ============================================================================ helpers
def astigmatism_components(
    defocus_u: ArrayLike, defocus_v: ArrayLike, angle_deg: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Mean defocus ``(U + V)/2`` and Cartesian astigmatism ``(h cos 2θ, h sin 2θ)``.

    ``h = (U - V)/2``. Vectorised over table columns (Å and degrees in, Å out).
    """
    u = np.asarray(defocus_u, dtype=float)
    v = np.asarray(defocus_v, dtype=float)
    t = np.deg2rad(2.0 * np.asarray(angle_deg, dtype=float))
    h = 0.5 * (u - v)
    return 0.5 * (u + v), h * np.cos(t), h * np.sin(t)


def anisotropy_from_slope(g1: ArrayLike, g2: ArrayLike) -> NDArray[np.float64]:
    """Anisotropy in per cent of the symmetric det-1 ``M`` whose slope is ``(g1, g2)``.

    Exact: ``200 (1 - sqrt(1 - t²)) / t`` with ``t = |g|`` (``≈ 100 t``); NaN for ``t >= 1``.
    """
    t = np.hypot(np.asarray(g1, dtype=float), np.asarray(g2, dtype=float))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(t > 0.0, 200.0 * (1.0 - np.sqrt(1.0 - t * t)) / np.where(t > 0, t, 1.0), 0.0)
    return np.where(t < 1.0, out, np.nan)


def _axis_from_slope(g1: ArrayLike, g2: ArrayLike) -> NDArray[np.float64]:
    """Axis (degrees in [0, 180)) of the slope vector: ``atan2(g2, g1) / 2``."""
    a = np.mod(0.5 * np.rad2deg(np.arctan2(g2, g1)), 180.0)
    return np.where(a >= 180.0, 0.0, a)


def magmat_from_slope(g1: float, g2: float) -> MagMat:
    """The symmetric, unit-determinant ``M`` whose ``S = M^T M`` gives the slope ``(g1, g2)``.

    ``S = [[1 + g1, g2], [g2, 1 - g1]] / sqrt(1 - g1² - g2²)`` and ``M = S^(1/2)``.

    Raises
    ------
    ValueError
        For ``|g| >= 1`` (no positive definite ``S``).
    """
    q = g1 * g1 + g2 * g2
    if not q < 1.0:
        raise ValueError(f"slope {(g1, g2)} has |g| >= 1; no magnification matrix gives it")
    s = np.array([[1.0 + g1, g2], [g2, 1.0 - g1]]) / math.sqrt(1.0 - q)
    lam, vec = np.linalg.eigh(s)
    m = vec @ np.diag(np.sqrt(lam)) @ vec.T
    return MagMat(0.5 * (m + m.T))


def _angle_diff(a: NDArray[np.float64] | float, b: float) -> NDArray[np.float64]:
    """``a - b`` for axis angles, wrapped into [-90, 90)."""
    return np.mod(np.asarray(a, dtype=float) - b + 90.0, 180.0) - 90.0


def format_p(p: float) -> str:
    """A p-value for people: two digits, ``< 1e-300`` for an underflow to 0."""
    return "< 1e-300" if p == 0.0 else f"= {p:.2g}"


def _finite_or_none(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


# ============================================================================ robust line
@dataclass
class _Line:
    """A fitted line ``y = c + g m`` (``y`` 2-D) with its final weights."""

    intercept: NDArray[np.float64]  # (2,)
    slope: NDArray[np.float64]  # (2,)
    weights: NDArray[np.float64]  # (n,) Tukey weights in [0, 1]
    sigma: float  # robust sigma per component (Å)
    residuals: NDArray[np.float64]  # (n, 2)


def _theil_sen(m: NDArray[np.float64], y: NDArray[np.float64], rng: np.random.Generator):
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


def _robust_sigma(d: NDArray[np.float64], n_params: int = 2) -> float:
    """Per-component sigma from 2-D residual lengths (``median / sqrt(2 ln 2)``, d.o.f.)."""
    n = d.size
    scale = float(np.median(d)) / _RAYLEIGH_MEDIAN * math.sqrt(n / max(n - n_params, 1))
    return max(scale, _SIGMA_FLOOR)


def _irls(
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


def _robust_line(
    m: NDArray[np.float64],
    y: NDArray[np.float64],
    start: tuple[NDArray[np.float64], NDArray[np.float64]],
    *,
    sigma: float | None = None,
    tukey_c: float = TUKEY_C,
    max_iter: int = 200,
) -> _Line | None:
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
            sigma = _robust_sigma(resid(c0, g)[1])
        assert sigma is not None
        out = _irls(x, y, c0, g, sigma, tukey_c, max_iter)
        if out is None:
            return None
        c0, g = out
    assert sigma is not None
    r, d = resid(c0, g)
    u = d / (tukey_c * sigma)
    w = np.where(u < 1.0, (1.0 - u * u) ** 2, 0.0)
    return _Line(intercept=c0 - g * m_ref, slope=g, weights=w, sigma=sigma, residuals=r)


def _sandwich_cov(m: NDArray[np.float64], line: _Line) -> NDArray[np.float64]:
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


def _wald(g: NDArray[np.float64], cov: NDArray[np.float64]) -> float:
    """``g^T C^-1 g`` (inf when C is singular and g is not 0)."""
    if not np.all(np.isfinite(cov)):
        return float("nan")
    try:
        sol = np.linalg.solve(cov, g)
    except np.linalg.LinAlgError:
        return float("inf") if np.any(g != 0) else 0.0
    w = float(g @ sol)
    return w if w >= 0.0 else float("inf")


def _wald_p_value(wald: float, n_used: int) -> float:
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


# ============================================================================ results
@dataclass(frozen=True)
class ResidualRow:
    """One micrograph in the fit: observed astigmatism against the line's prediction.

    All astigmatism values are observed-frame Cartesian components in Å
    (``h cos 2θ, h sin 2θ`` with ``h = (U - V)/2``); ``predicted`` is the full model
    ``g m + c`` (anisomag plus the constant real astigmatism) and ``anisomag`` its part
    ``g m`` alone. ``weight`` is the final Tukey weight (0 = rejected).
    """

    name: str
    mean_defocus: float
    observed: tuple[float, float]
    predicted: tuple[float, float]
    anisomag: tuple[float, float]
    residual: float
    weight: float
    rejected: bool

    @staticmethod
    def _polar(a: tuple[float, float]) -> tuple[float, float]:
        h = math.hypot(*a)
        ang = math.degrees(0.5 * math.atan2(a[1], a[0])) % 180.0 if h > 0 else 0.0
        return 2.0 * h, ang

    @property
    def observed_astigmatism(self) -> tuple[float, float]:
        """Observed ``(U - V, angle)``."""
        return self._polar(self.observed)

    @property
    def predicted_astigmatism(self) -> tuple[float, float]:
        """Predicted ``(U - V, angle)``."""
        return self._polar(self.predicted)

    def to_dict(self) -> dict[str, Any]:
        ou, oa = self.observed_astigmatism
        pu, pa = self.predicted_astigmatism
        return {
            "name": self.name,
            "mean_defocus": self.mean_defocus,
            "observed_a1": self.observed[0],
            "observed_a2": self.observed[1],
            "predicted_a1": self.predicted[0],
            "predicted_a2": self.predicted[1],
            "anisomag_a1": self.anisomag[0],
            "anisomag_a2": self.anisomag[1],
            "observed_u_minus_v": ou,
            "observed_angle_deg": oa,
            "predicted_u_minus_v": pu,
            "predicted_angle_deg": pa,
            "residual": self.residual,
            "weight": self.weight,
            "rejected": self.rejected,
        }


@dataclass(frozen=True, eq=False)
class AnisoDetection:
    """Outcome of :func:`detect_anisomag` (see the module notes for the method).

    Attributes
    ----------
    mag_matrix
        Symmetric, unit-determinant ``M`` (RELION convention ``k_true = M k_obs``).
    anisotropy_percent, axis_deg
        Of ``mag_matrix`` (``MagMat.anisotropy_percent`` / ``axis_deg``).
    anisotropy_ci, axis_ci
        Bootstrap percentile intervals at ``confidence`` (NaN without a bootstrap). The axis
        interval is around ``axis_deg`` (not reduced mod 180).
    slope, slope_cov, intercept
        The line ``a = g m + c`` in the observed frame (slope dimensionless, intercept in Å) and
        the covariance used by the Wald test (the bootstrap one when available).
    wald_statistic, p_value, p_threshold, significant
        The test of ``g = 0`` (see the module notes).
    real_astigmatism, real_astigmatism_angle
        ``U - V`` (Å) and angle (degrees, true frame) of the mean real astigmatism.
    astigmatism_scatter
        Robust sigma (Å) of the per-micrograph residual, per component.
    n_micrographs, n_used, n_rejected, rejected
        Counts and the names of the rejected micrographs (Tukey weight 0).
    defocus_range, defocus_spread
        Smallest and largest observed mean defocus of the used micrographs (Å) and the robust
        standard deviation of all mean defoci (Å).
    n_bootstrap, n_bootstrap_valid, seed
        Resamples requested, resamples that gave a fit, and the seed.
    residuals
        One :class:`ResidualRow` per input micrograph, in input order.
    notes
        Remarks (e.g. the frame conversion done by the caller).
    """

    mag_matrix: MagMat
    anisotropy_percent: float
    axis_deg: float
    anisotropy_ci: tuple[float, float]
    axis_ci: tuple[float, float]
    confidence: float
    slope: tuple[float, float]
    slope_cov: tuple[tuple[float, float], tuple[float, float]]
    intercept: tuple[float, float]
    wald_statistic: float
    p_value: float
    p_threshold: float
    significant: bool
    real_astigmatism: float
    real_astigmatism_angle: float
    astigmatism_scatter: float
    n_micrographs: int
    n_used: int
    n_rejected: int
    rejected: tuple[str, ...]
    defocus_range: tuple[float, float]
    defocus_spread: float
    n_bootstrap: int
    n_bootstrap_valid: int
    seed: int
    residuals: tuple[ResidualRow, ...]
    notes: tuple[str, ...] = ()
    bootstrap_slopes: NDArray[np.float64] = field(
        default_factory=lambda: np.zeros((0, 2)), repr=False
    )
    bootstrap_intercepts: NDArray[np.float64] = field(
        default_factory=lambda: np.zeros((0, 2)), repr=False
    )

    def predict(self, mean_defocus: ArrayLike) -> NDArray[np.float64]:
        """Observed-frame astigmatism ``(a1, a2)`` the fit predicts at these mean defoci."""
        m = np.asarray(mean_defocus, dtype=float)
        return np.asarray(self.intercept)[None, :] + m.reshape(-1, 1) * np.asarray(self.slope)

    def band(
        self, mean_defocus: ArrayLike
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]] | None:
        """Bootstrap ``confidence`` band of the predicted line: (low, high), each ``(k, 2)``."""
        if self.bootstrap_slopes.shape[0] < 10:
            return None
        m = np.asarray(mean_defocus, dtype=float).reshape(1, -1, 1)
        pred = self.bootstrap_intercepts[:, None, :] + m * self.bootstrap_slopes[:, None, :]
        q = 50.0 * (1.0 - self.confidence)
        lo, hi = np.percentile(pred, [q, 100.0 - q], axis=0)
        return lo, hi

    def to_dict(self, residuals: bool = True) -> dict[str, Any]:
        """JSON-ready record (NaN written as null)."""
        f = _finite_or_none
        d: dict[str, Any] = {
            "mag_matrix": [list(r) for r in self.mag_matrix.matrix],
            "relion": to_relion(self.mag_matrix),
            "convention": "k_true = M k_obs (RELION _rlnMagMat); M symmetric, det 1",
            "anisotropy_percent": self.anisotropy_percent,
            "anisotropy_ci": [f(x) for x in self.anisotropy_ci],
            "axis_deg": self.axis_deg,
            "axis_ci": [f(x) for x in self.axis_ci],
            "confidence_level": self.confidence,
            "significant": self.significant,
            "p_value": f(self.p_value),
            "wald_statistic": f(self.wald_statistic),
            "p_threshold": self.p_threshold,
            "slope": list(self.slope),
            "slope_covariance": [[f(x) for x in r] for r in self.slope_cov],
            "intercept": list(self.intercept),
            "real_astigmatism": {
                "u_minus_v": self.real_astigmatism,
                "angle_deg": self.real_astigmatism_angle,
                "frame": "true",
            },
            "astigmatism_scatter": self.astigmatism_scatter,
            "n_micrographs": self.n_micrographs,
            "n_used": self.n_used,
            "n_rejected": self.n_rejected,
            "rejected": list(self.rejected),
            "defocus_range": list(self.defocus_range),
            "defocus_spread": self.defocus_spread,
            "bootstrap": {
                "n_requested": self.n_bootstrap,
                "n_valid": self.n_bootstrap_valid,
                "seed": self.seed,
            },
            "notes": list(self.notes),
        }
        if residuals:
            d["residuals"] = residual_report(self)
        return d

    def summary_lines(self) -> list[str]:
        """A few plain-text lines for people."""
        lo, hi = self.anisotropy_ci
        alo, ahi = self.axis_ci
        m = self.mag_matrix.matrix
        pct = f"{100 * self.confidence:.0f} %"
        lines = [
            f"magnification matrix (k_true = M k_obs): [[{m[0][0]:.6f}, {m[0][1]:.6f}], "
            f"[{m[1][0]:.6f}, {m[1][1]:.6f}]]",
            f"anisotropy {self.anisotropy_percent:.3f} % [{lo:.3f}, {hi:.3f}] ({pct} CI), "
            f"axis {self.axis_deg:.1f}° [{alo:.1f}, {ahi:.1f}]",
            f"real astigmatism {self.real_astigmatism:.0f} Å at {self.real_astigmatism_angle:.1f}°"
            f" (scatter {self.astigmatism_scatter:.0f} Å per component)",
            f"significant: {'yes' if self.significant else 'no'} (Wald p {format_p(self.p_value)}, "
            f"threshold {self.p_threshold:g})",
            f"micrographs: {self.n_used} used, {self.n_rejected} rejected; mean defocus "
            f"{self.defocus_range[0]:.0f}–{self.defocus_range[1]:.0f} Å",
        ]
        return lines


def residual_report(detection: AnisoDetection) -> list[dict[str, Any]]:
    """Per micrograph: observed vs predicted apparent astigmatism (JSON-ready dicts).

    Keys: ``name``, ``mean_defocus``, ``observed_a1/a2``, ``predicted_a1/a2`` (full line),
    ``anisomag_a1/a2`` (the part ``g m`` due to anisomag), ``observed_u_minus_v``,
    ``observed_angle_deg``, ``predicted_u_minus_v``, ``predicted_angle_deg``, ``residual``
    (length of the 2-D residual, Å), ``weight`` and ``rejected``.
    """
    return [r.to_dict() for r in detection.residuals]


# ============================================================================ detection
def _check_inputs(
    defocus_u: ArrayLike,
    defocus_v: ArrayLike,
    angle_deg: ArrayLike,
    names: Sequence[str] | None,
    min_micrographs: int,
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64], list[str]]:
    u = np.asarray(defocus_u, dtype=float).ravel()
    v = np.asarray(defocus_v, dtype=float).ravel()
    a = np.asarray(angle_deg, dtype=float).ravel()
    if not (u.size == v.size == a.size):
        raise InputError(
            f"defocus U, V and angle have different lengths ({u.size}, {v.size}, {a.size})"
        )
    n = u.size
    names = [f"micrograph_{i + 1}" for i in range(n)] if names is None else [str(s) for s in names]
    if len(names) != n:
        raise InputError(f"{len(names)} names for {n} micrographs")
    bad = np.flatnonzero(~(np.isfinite(u) & np.isfinite(v) & np.isfinite(a)))
    if bad.size:
        i = int(bad[0])
        raise InputError(
            f"{names[i]}: defocus U/V/angle is not finite ({u[i]}, {v[i]}, {a[i]}); "
            "remove the micrograph or re-run its CTF fit"
        )
    if n < min_micrographs:
        raise InputError(
            f"only {n} micrograph(s); anisomag detection needs at least {min_micrographs} "
            "(better 20 or more over a wide defocus range)"
        )
    return u, v, a, names


def detect_anisomag(
    defocus_u: ArrayLike,
    defocus_v: ArrayLike,
    angle_deg: ArrayLike,
    names: Sequence[str] | None = None,
    *,
    n_bootstrap: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    confidence: float = 0.95,
    p_threshold: float = P_THRESHOLD,
    min_micrographs: int = MIN_MICROGRAPHS,
    min_defocus_spread: float = MIN_DEFOCUS_SPREAD,
    notes: Sequence[str] = (),
) -> AnisoDetection:
    """Estimate the magnification matrix from observed-frame CTF fits of many micrographs.

    Parameters
    ----------
    defocus_u, defocus_v, angle_deg
        One value per micrograph (Å, Å, degrees), as fitted *without* a magnification matrix
        (e.g. CTFFIND's defocus 1, defocus 2 and azimuth, or ``_rlnDefocusU/V/Angle``).
    names
        Micrograph names for the report (default ``micrograph_1``, ...).
    n_bootstrap
        Bootstrap resamples over micrographs (0: no intervals; the sandwich Wald test alone
        decides significance).
    seed
        Seed of the bootstrap (and of the Theil–Sen pair sample above 400 micrographs).
    confidence
        Level of the percentile intervals.
    p_threshold
        Significance level of the Wald test.
    min_micrographs
        Fewest micrographs accepted, before and after outlier rejection.
    min_defocus_spread
        Smallest robust SD (1.4826 × MAD, Å) of the mean defocus accepted.
    notes
        Remarks copied into the result.

    Returns
    -------
    AnisoDetection

    Raises
    ------
    InputError
        Fewer than ``min_micrographs`` micrographs (or survivors), non-finite values, a
        defocus spread too small to separate the slope from the intercept, or a table whose
        best line implies no magnification matrix (slope ≥ 0.5).
    """
    u, v, a, names = _check_inputs(defocus_u, defocus_v, angle_deg, names, min_micrographs)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    n = u.size
    m, a1, a2 = astigmatism_components(u, v, a)
    y = np.column_stack([a1, a2])
    spread = 1.4826 * float(np.median(np.abs(m - np.median(m))))
    if not spread >= min_defocus_spread:
        raise InputError(
            f"the mean defocus of the {n} micrographs spreads only {spread:.0f} Å (robust SD; "
            f"need ≥ {min_defocus_spread:.0f} Å), too little to separate astigmatism that grows "
            "with defocus from constant astigmatism; add micrographs over a wider defocus "
            "range (e.g. 0.5–3 µm)"
        )
    rng = np.random.default_rng(seed)
    start = _theil_sen(m, y, rng)
    tukey_c = tukey_constant(n)
    line = None if start is None else _robust_line(m, y, start, tukey_c=tukey_c)
    if line is None:
        raise InputError(
            "no robust line through astigmatism against defocus (too many outliers or "
            "too few distinct defocus values); check the CTF fits"
        )
    used = line.weights > 0
    n_used = int(np.count_nonzero(used))
    if n_used < min_micrographs:
        raise InputError(
            f"only {n_used} of {n} micrographs agree with a common line ({n - n_used} rejected "
            f"as outliers); need {min_micrographs}; check the CTF fits"
        )
    g = line.slope
    if not float(np.hypot(*g)) < _MAX_SLOPE:
        raise InputError(
            f"astigmatism grows by {float(np.hypot(*g)):.2f} Å per Å of defocus, which no "
            "plausible magnification matrix gives; the table is not consistent with anisomag"
        )
    mag = magmat_from_slope(float(g[0]), float(g[1]))

    # real astigmatism: every used micrograph in the true frame, Tukey-weighted mean
    ut, vt, at = defocus_table_to_true(u[used], v[used], a[used], mag)
    _, t1, t2 = astigmatism_components(ut, vt, at)
    wu = line.weights[used]
    real = np.array([np.sum(wu * t1), np.sum(wu * t2)]) / float(np.sum(wu))
    real_h = float(np.hypot(*real))
    real_angle = float(_axis_from_slope(real[0], real[1])) if real_h > 0.0 else 0.0

    # bootstrap over micrographs
    boot_g: list[NDArray[np.float64]] = []
    boot_c: list[NDArray[np.float64]] = []
    start_full = (line.intercept, line.slope)
    for _ in range(n_bootstrap):
        idx = rng.integers(0, n, n)
        mb = m[idx]
        if np.ptp(mb) <= 0.0:
            continue
        lb = _robust_line(mb, y[idx], start_full, sigma=line.sigma, tukey_c=tukey_c)
        if lb is None or not float(np.hypot(*lb.slope)) < 1.0:
            continue
        boot_g.append(lb.slope)
        boot_c.append(lb.intercept)
    bg = np.array(boot_g).reshape(-1, 2)
    bc = np.array(boot_c).reshape(-1, 2)
    n_valid = int(bg.shape[0])

    aniso = float(mag.anisotropy_percent)
    axis = float(mag.axis_deg)
    q = 50.0 * (1.0 - confidence)
    nan2 = (float("nan"), float("nan"))
    cov_hc = _sandwich_cov(m, line)
    w_hc = _wald(g, cov_hc)
    boot_ok = n_valid >= max(20, n_bootstrap // 2)
    if boot_ok:
        ab = anisotropy_from_slope(bg[:, 0], bg[:, 1])
        a_ci = tuple(float(x) for x in np.nanpercentile(ab, [q, 100.0 - q]))
        da = _angle_diff(_axis_from_slope(bg[:, 0], bg[:, 1]), axis)
        d_lo, d_hi = np.percentile(da, [q, 100.0 - q])
        x_ci = (axis + float(d_lo), axis + float(d_hi))
        cov_boot = np.cov(bg.T)
        w_boot = _wald(g, cov_boot)
        cov = cov_boot
        wald = float(np.nanmin([w_boot, w_hc]))
    else:
        a_ci, x_ci = nan2, nan2
        cov = cov_hc
        wald = w_hc
    p_value = _wald_p_value(wald, n_used)
    if n_bootstrap > 0 and not boot_ok:
        notes = (*notes, f"only {n_valid} of {n_bootstrap} bootstrap resamples gave a fit")
    significant = bool(
        math.isfinite(p_value)
        and p_value < p_threshold
        and (n_bootstrap == 0 or (boot_ok and a_ci[0] > 0.0))
    )

    pred = line.intercept[None, :] + m[:, None] * g[None, :]
    resid = np.hypot(*(y - pred).T)
    rows = tuple(
        ResidualRow(
            name=names[i],
            mean_defocus=float(m[i]),
            observed=(float(a1[i]), float(a2[i])),
            predicted=(float(pred[i, 0]), float(pred[i, 1])),
            anisomag=(float(g[0] * m[i]), float(g[1] * m[i])),
            residual=float(resid[i]),
            weight=float(line.weights[i]),
            rejected=not bool(used[i]),
        )
        for i in range(n)
    )
    return AnisoDetection(
        mag_matrix=mag,
        anisotropy_percent=aniso,
        axis_deg=axis,
        anisotropy_ci=a_ci,  # type: ignore[arg-type]
        axis_ci=x_ci,
        confidence=float(confidence),
        slope=(float(g[0]), float(g[1])),
        slope_cov=((float(cov[0, 0]), float(cov[0, 1])), (float(cov[1, 0]), float(cov[1, 1]))),
        intercept=(float(line.intercept[0]), float(line.intercept[1])),
        wald_statistic=float(wald),
        p_value=p_value,
        p_threshold=float(p_threshold),
        significant=significant,
        real_astigmatism=2.0 * real_h,
        real_astigmatism_angle=real_angle,
        astigmatism_scatter=float(line.sigma),
        n_micrographs=n,
        n_used=n_used,
        n_rejected=n - n_used,
        rejected=tuple(names[i] for i in np.flatnonzero(~used)),
        defocus_range=(float(np.min(m[used])), float(np.max(m[used]))),
        defocus_spread=spread,
        n_bootstrap=int(n_bootstrap),
        n_bootstrap_valid=n_valid,
        seed=int(seed),
        residuals=rows,
        notes=tuple(notes),
        bootstrap_slopes=bg,
        bootstrap_intercepts=bc,
    )


# ============================================================================ output
def write_detection_json(
    detection: AnisoDetection, path: str | os.PathLike[str], residuals: bool = True
) -> None:
    """Write :meth:`AnisoDetection.to_dict` as indented JSON, atomically."""
    text = json.dumps(detection.to_dict(residuals=residuals), indent=2, allow_nan=False)
    write_text_atomic(path, text + "\n")


def plot_detection(
    detection: AnisoDetection, path: str | os.PathLike[str], title: str | None = None
) -> None:
    """Apparent astigmatism against defocus: two panels (``a1``, ``a2``), fit, band, verdict.

    Points: used micrographs (coloured by weight) and rejected ones (red crosses; drawn at the
    panel edge when they lie outside it). Line: the fit ``a = g m + c``; shaded: its bootstrap
    band; dashed: the constant part ``c`` alone (what the astigmatism would be without anisomag).
    The PNG is written atomically.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    d = detection
    m = np.array([r.mean_defocus for r in d.residuals])
    obs = np.array([r.observed for r in d.residuals]).reshape(-1, 2)
    rej = np.array([r.rejected for r in d.residuals], dtype=bool)
    lo_m, hi_m = float(np.min(m[~rej])), float(np.max(m[~rej]))
    pad = 0.05 * (hi_m - lo_m)
    grid = np.linspace(lo_m - pad, hi_m + pad, 100)
    pred = d.predict(grid)
    band = d.band(grid)

    fig = Figure(figsize=(11.0, 5.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for k, ax in enumerate(axes):
        y_used = obs[~rej, k]
        parts = [y_used, pred[:, k], np.array([d.intercept[k]])]
        if band is not None:
            parts += [band[0][:, k], band[1][:, k]]
        y_lo, y_hi = float(np.min(np.concatenate(parts))), float(np.max(np.concatenate(parts)))
        ypad = 0.08 * max(y_hi - y_lo, 1.0)
        y_lo, y_hi = y_lo - ypad, y_hi + ypad
        if band is not None:
            ax.fill_between(
                grid / 1e4, band[0][:, k], band[1][:, k], color="tab:blue", alpha=0.2,
                lw=0, label=f"{100 * d.confidence:.0f} % bootstrap band",
            )  # fmt: skip
        ax.plot(grid / 1e4, pred[:, k], color="tab:blue", lw=1.6, label="fit  a = g·defocus + c")
        ax.axhline(d.intercept[k], color="0.4", lw=1.0, ls="--", label="constant part c")
        ax.scatter(
            m[~rej] / 1e4, obs[~rej, k], s=18, c="k", alpha=0.8, zorder=3, label="micrographs"
        )
        if np.any(rej):
            ax.scatter(
                m[rej] / 1e4, np.clip(obs[rej, k], y_lo + ypad / 4, y_hi - ypad / 4), s=40,
                marker="x", color="tab:red", zorder=4, label=f"rejected ({int(np.sum(rej))})",
            )  # fmt: skip
        ax.set_ylim(y_lo, y_hi)
        ax.set_xlabel("mean defocus (µm)")
        name = "a1 = h cos 2θ" if k == 0 else "a2 = h sin 2θ"
        ax.set_ylabel(f"apparent astigmatism {name} (Å)")
        ax.grid(alpha=0.3)
        if k == 0:
            ax.legend(loc="best", fontsize=8)
    lo, hi = d.anisotropy_ci
    alo, ahi = d.axis_ci
    verdict = "SIGNIFICANT" if d.significant else "not significant"
    text = (
        f"anisotropy {d.anisotropy_percent:.3f} % [{lo:.3f}, {hi:.3f}]   "
        f"axis {d.axis_deg:.1f}° [{alo:.1f}, {ahi:.1f}]   ({100 * d.confidence:.0f} % CI)\n"
        f"{verdict}: Wald p {format_p(d.p_value)} (threshold {d.p_threshold:g});  "
        f"real astigmatism {d.real_astigmatism:.0f} Å at {d.real_astigmatism_angle:.0f}°;  "
        f"{d.n_used} used, {d.n_rejected} rejected"
    )
    fig.suptitle(title or "anisotropic magnification from CTF astigmatism", fontsize=12)
    fig.text(0.5, 0.015, text, ha="center", va="bottom", fontsize=9.5)
    fig.subplots_adjust(left=0.07, right=0.98, top=0.91, bottom=0.2, wspace=0.25)
    buf = io.BytesIO()
    fig.canvas.print_png(buf)
    write_bytes_atomic(path, buf.getvalue())
