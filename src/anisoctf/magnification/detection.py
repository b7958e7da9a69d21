"""The outcome of an anisotropic-magnification detection: the records people and files read.

:class:`AnisoDetection` is what :func:`anisoctf.magnification.detect.detect_anisomag` returns
(the method is described there); :meth:`AnisoDetection.to_dict` is the JSON document
(written by :func:`anisoctf.io.detection_json.write_detection_json`), one
:class:`ResidualRow` per micrograph its residual table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from anisoctf.optics.magmat import MagMat, to_relion

__all__ = ["AnisoDetection", "ResidualRow", "format_p", "residual_report"]


def format_p(p: float) -> str:
    """A p-value for people: two digits, ``< 1e-300`` for an underflow to 0."""
    return "< 1e-300" if p == 0.0 else f"= {p:.2g}"


def _finite_or_none(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


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
