"""Particle-based against micrograph-based magnification: the two matrices side by side.

``anisoctf aniso detect`` (micrographs: astigmatism against defocus) reports a symmetric matrix
with unit determinant; ``anisoctf refine`` (particles against a reference) a full 2×2 matrix with
an isotropic scale and a small rotation. Only the anisotropic part is comparable, so both are
reduced to their symmetric, unit-determinant part ``S / sqrt(det S)`` of the polar form
``M = R S`` before the difference is taken; anisotropy and axis are invariant to that.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from anisoctf.errors import InputError
from anisoctf.optics.magmat import MagMat

__all__ = ["compare_matrices", "load_matrix_json"]


def load_matrix_json(path: str | os.PathLike[str]) -> tuple[MagMat, dict[str, Any]]:
    """``mag_matrix`` and the whole record of a detect or refine JSON file."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError("file not found; check the path", path=p) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"not a readable JSON file ({exc})", path=p) from None
    if not isinstance(data, dict) or "mag_matrix" not in data:
        raise InputError(
            "no 'mag_matrix': give the JSON of 'anisoctf aniso detect --json' or the "
            "anisomag_group<N>.json of 'anisoctf refine'",
            path=p,
        )
    try:
        return MagMat(np.asarray(data["mag_matrix"], dtype=float).reshape(2, 2)), data
    except (TypeError, ValueError) as exc:
        raise InputError(f"'mag_matrix' is not a valid 2x2 matrix ({exc})", path=p) from None


def _sym_unit(m: MagMat) -> np.ndarray:
    s = m.symmetric_part
    return s / np.sqrt(np.linalg.det(s))


def compare_matrices(
    micrograph: MagMat,
    particle: MagMat,
    micrograph_record: dict[str, Any] | None = None,
    particle_record: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Both matrices, anisotropy and axis, and their differences (particle − micrograph).

    Returns
    -------
    dict
        ``micrograph`` and ``particle`` entries (matrix, symmetric unit part, anisotropy, axis,
        and the micrograph intervals / particle per-element SD when the records have them) and
        ``difference``: ``anisotropy_percent``, ``axis_deg`` (wrapped to ±90°) and
        ``max_abs_element`` of the symmetric unit parts. Also ``within_micrograph_ci``: whether
        the particle anisotropy and axis fall inside the micrograph 95 % intervals (None when
        the detect record has none).
    """
    mr = micrograph_record or {}
    pr = particle_record or {}
    a_m, a_p = micrograph.anisotropy_percent, particle.anisotropy_percent
    d_axis = (particle.axis_deg - micrograph.axis_deg + 90.0) % 180.0 - 90.0
    within = None
    ci_a, ci_x = mr.get("anisotropy_ci"), mr.get("axis_ci")
    if ci_a and ci_x and None not in ci_a and None not in ci_x:
        lo, hi = ci_x
        rel = (particle.axis_deg - lo) % 180.0
        within = bool(ci_a[0] <= a_p <= ci_a[1] and rel <= (hi - lo) % 180.0)
    return {
        "micrograph": {
            "mag_matrix": [list(r) for r in micrograph.matrix],
            "symmetric_unit": _sym_unit(micrograph).tolist(),
            "anisotropy_percent": a_m,
            "axis_deg": micrograph.axis_deg,
            "anisotropy_ci": mr.get("anisotropy_ci"),
            "axis_ci": mr.get("axis_ci"),
            "significant": mr.get("significant"),
        },
        "particle": {
            "mag_matrix": [list(r) for r in particle.matrix],
            "symmetric_unit": _sym_unit(particle).tolist(),
            "anisotropy_percent": a_p,
            "axis_deg": particle.axis_deg,
            "scale": particle.scale,
            "rotation_deg": particle.rotation_deg,
            "matrix_element_sd": pr.get("matrix_element_sd"),
            "n_particles": pr.get("n_particles"),
        },
        "difference": {
            "anisotropy_percent": a_p - a_m,
            "axis_deg": d_axis,
            "max_abs_element": float(np.abs(_sym_unit(particle) - _sym_unit(micrograph)).max()),
        },
        "within_micrograph_ci": within,
    }
