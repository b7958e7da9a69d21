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

The robust line and the tests are in :mod:`anisoctf.magnification.robust_line`; the JSON file
(:func:`anisoctf.io.detection_json.write_detection_json`, from :meth:`AnisoDetection.to_dict`)
and the plot (:func:`anisoctf.report.detection_plot.plot_detection`) are written elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from anisoctf.errors import InputError
from anisoctf.magnification.detection import AnisoDetection, ResidualRow, format_p, residual_report
from anisoctf.magnification.robust_line import (
    TUKEY_C,
    RobustLine,
    robust_line,
    sandwich_cov,
    theil_sen,
    tukey_constant,
    wald_p_value,
    wald_statistic,
)
from anisoctf.optics.frames import defocus_table_to_true
from anisoctf.optics.magmat import MagMat

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
    "residual_report",
    "tukey_constant",
]

#: bootstrap resamples by default
DEFAULT_BOOTSTRAP = 400
#: the Wald test's significance level
P_THRESHOLD = 1e-3
#: fewest micrographs a detection accepts (and fewest that must survive outlier rejection)
MIN_MICROGRAPHS = 6
#: smallest robust standard deviation of the mean defocus (Å) that separates slope and intercept
MIN_DEFOCUS_SPREAD = 500.0
# slopes at or above this are not anisomag (|g| = 0.5 is 50 % anisotropy)
_MAX_SLOPE = 0.5


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


def _fit_line(
    m: NDArray[np.float64],
    y: NDArray[np.float64],
    rng: np.random.Generator,
    min_micrographs: int,
    min_defocus_spread: float,
) -> tuple[RobustLine, float, float]:
    """The robust line through the table, checked: returns it, the robust SD of the mean
    defocus and the Tukey constant used (raises InputError where the table cannot give one)."""
    n = m.size
    spread = 1.4826 * float(np.median(np.abs(m - np.median(m))))
    if not spread >= min_defocus_spread:
        raise InputError(
            f"the mean defocus of the {n} micrographs spreads only {spread:.0f} Å (robust SD; "
            f"need ≥ {min_defocus_spread:.0f} Å), too little to separate astigmatism that grows "
            "with defocus from constant astigmatism; add micrographs over a wider defocus "
            "range (e.g. 0.5–3 µm)"
        )
    start = theil_sen(m, y, rng)
    tukey_c = tukey_constant(n)
    line = None if start is None else robust_line(m, y, start, tukey_c=tukey_c)
    if line is None:
        raise InputError(
            "no robust line through astigmatism against defocus (too many outliers or "
            "too few distinct defocus values); check the CTF fits"
        )
    n_used = int(np.count_nonzero(line.weights > 0))
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
    return line, spread, tukey_c


def _real_astigmatism(
    u: NDArray[np.float64],
    v: NDArray[np.float64],
    a: NDArray[np.float64],
    line: RobustLine,
    mag: MagMat,
) -> tuple[float, float]:
    """Half ``(U − V)/2`` (Å) and angle (degrees) of the real astigmatism: every used
    micrograph in the true frame, Tukey-weighted mean."""
    used = line.weights > 0
    ut, vt, at = defocus_table_to_true(u[used], v[used], a[used], mag)
    _, t1, t2 = astigmatism_components(ut, vt, at)
    wu = line.weights[used]
    real = np.array([np.sum(wu * t1), np.sum(wu * t2)]) / float(np.sum(wu))
    real_h = float(np.hypot(*real))
    real_angle = float(_axis_from_slope(real[0], real[1])) if real_h > 0.0 else 0.0
    return real_h, real_angle


def _bootstrap(
    m: NDArray[np.float64],
    y: NDArray[np.float64],
    line: RobustLine,
    tukey_c: float,
    n_bootstrap: int,
    rng: np.random.Generator,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Bootstrap over micrographs: the slopes and intercepts ``(k, 2)`` of the resamples that
    gave a fit, each refitted robustly from the full-data line at its scale."""
    n = m.size
    boot_g: list[NDArray[np.float64]] = []
    boot_c: list[NDArray[np.float64]] = []
    start_full = (line.intercept, line.slope)
    for _ in range(n_bootstrap):
        idx = rng.integers(0, n, n)
        mb = m[idx]
        if np.ptp(mb) <= 0.0:
            continue
        lb = robust_line(mb, y[idx], start_full, sigma=line.sigma, tukey_c=tukey_c)
        if lb is None or not float(np.hypot(*lb.slope)) < 1.0:
            continue
        boot_g.append(lb.slope)
        boot_c.append(lb.intercept)
    return np.array(boot_g).reshape(-1, 2), np.array(boot_c).reshape(-1, 2)


@dataclass(frozen=True)
class _Test:
    """Intervals and the Wald test of ``g = 0``."""

    anisotropy_ci: tuple[float, float]
    axis_ci: tuple[float, float]
    cov: NDArray[np.float64]
    wald: float
    boot_ok: bool


def _intervals_and_test(
    m: NDArray[np.float64],
    line: RobustLine,
    bg: NDArray[np.float64],
    axis: float,
    n_bootstrap: int,
    confidence: float,
) -> _Test:
    """Percentile intervals (when enough resamples gave a fit) and the Wald statistic, the
    smaller of the bootstrap and the sandwich one (the sandwich alone without a bootstrap)."""
    g = line.slope
    n_valid = int(bg.shape[0])
    q = 50.0 * (1.0 - confidence)
    nan2 = (float("nan"), float("nan"))
    cov_hc = sandwich_cov(m, line)
    w_hc = wald_statistic(g, cov_hc)
    boot_ok = n_valid >= max(20, n_bootstrap // 2)
    if not boot_ok:
        return _Test(nan2, nan2, cov_hc, w_hc, False)
    ab = anisotropy_from_slope(bg[:, 0], bg[:, 1])
    a_lo, a_hi = (float(x) for x in np.nanpercentile(ab, [q, 100.0 - q]))
    da = _angle_diff(_axis_from_slope(bg[:, 0], bg[:, 1]), axis)
    d_lo, d_hi = np.percentile(da, [q, 100.0 - q])
    x_ci = (axis + float(d_lo), axis + float(d_hi))
    cov_boot = np.cov(bg.T)
    w_boot = wald_statistic(g, cov_boot)
    return _Test((a_lo, a_hi), x_ci, cov_boot, float(np.nanmin([w_boot, w_hc])), True)


def _residual_rows(
    names: Sequence[str],
    m: NDArray[np.float64],
    y: NDArray[np.float64],
    line: RobustLine,
) -> tuple[ResidualRow, ...]:
    """One :class:`ResidualRow` per micrograph, in input order."""
    g = line.slope
    used = line.weights > 0
    pred = line.intercept[None, :] + m[:, None] * g[None, :]
    resid = np.hypot(*(y - pred).T)
    return tuple(
        ResidualRow(
            name=names[i],
            mean_defocus=float(m[i]),
            observed=(float(y[i, 0]), float(y[i, 1])),
            predicted=(float(pred[i, 0]), float(pred[i, 1])),
            anisomag=(float(g[0] * m[i]), float(g[1] * m[i])),
            residual=float(resid[i]),
            weight=float(line.weights[i]),
            rejected=not bool(used[i]),
        )
        for i in range(m.size)
    )


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
    rng = np.random.default_rng(seed)
    line, spread, tukey_c = _fit_line(m, y, rng, min_micrographs, min_defocus_spread)
    used = line.weights > 0
    n_used = int(np.count_nonzero(used))
    g = line.slope
    mag = magmat_from_slope(float(g[0]), float(g[1]))
    real_h, real_angle = _real_astigmatism(u, v, a, line, mag)
    bg, bc = _bootstrap(m, y, line, tukey_c, n_bootstrap, rng)
    n_valid = int(bg.shape[0])
    aniso = float(mag.anisotropy_percent)
    axis = float(mag.axis_deg)
    test = _intervals_and_test(m, line, bg, axis, n_bootstrap, confidence)
    a_ci, x_ci, cov, wald = test.anisotropy_ci, test.axis_ci, test.cov, test.wald
    p_value = wald_p_value(wald, n_used)
    if n_bootstrap > 0 and not test.boot_ok:
        notes = (*notes, f"only {n_valid} of {n_bootstrap} bootstrap resamples gave a fit")
    significant = bool(
        math.isfinite(p_value)
        and p_value < p_threshold
        and (n_bootstrap == 0 or (test.boot_ok and a_ci[0] > 0.0))
    )
    rows = _residual_rows(names, m, y, line)
    return AnisoDetection(
        mag_matrix=mag,
        anisotropy_percent=aniso,
        axis_deg=axis,
        anisotropy_ci=a_ci,
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
