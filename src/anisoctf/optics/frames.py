"""Defocus and astigmatism between the observed (recorded) frame and the true frame.

With ``k_true = M k_obs`` the defocus term of the phase is the same number in both frames,
``k_obs^T D_obs k_obs = k_true^T D_true k_true``, hence

    D_obs  = M^T D_true M,
    D_true = M^-T D_obs M^-1.

A defocus matrix is written through the mean defocus ``z = (U + V)/2`` and the Cartesian
astigmatism ``a1 = h cos 2θ``, ``a2 = h sin 2θ`` (``h = (U - V)/2``) as
``D = [[z + a1, a2], [a2, z - a1]]``. Transforming ``D`` and reading these three numbers back is
an exact eigen-decomposition of a symmetric 2×2 matrix: ``U, V = z ± |(a1, a2)|`` and the U axis
at ``atan2(a2, a1) / 2``. All functions here return ``U >= V`` and angles in [0, 180).

Why anisotropic magnification looks like astigmatism: a micrograph with true defocus ``Δf`` and
no astigmatism has ``D_obs = Δf M^T M`` — astigmatic, with ``U - V = Δf (s1² - s2²)`` along the
most stretched axis of ``M`` (see :func:`apparent_astigmatism`).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from anisoctf.optics.ctf import CTFParams, params_from_astig
from anisoctf.optics.magmat import MagMat, as_matrix

__all__ = [
    "apparent_astigmatism",
    "defocus_table_to_observed",
    "defocus_table_to_true",
    "defocus_to_observed",
    "defocus_to_true",
    "isotropic_scale",
    "transform_defocus_matrix",
    "true_pixel_size",
]

# relative astigmatism below which the axis is undefined and reported as 0 (rounding noise)
_ASTIG_RTOL = 1e-12

_Arrays3 = tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]


def _matrix_stack(m: MagMat | ArrayLike) -> NDArray[np.float64]:
    """``(..., 2, 2)`` float array; a single matrix is validated as a :class:`MagMat`."""
    if isinstance(m, MagMat):
        return m.array
    a = np.asarray(m, dtype=float)
    if a.shape == (2, 2):
        return as_matrix(a)
    if a.ndim < 2 or a.shape[-2:] != (2, 2):
        raise ValueError(f"expected a 2x2 matrix or a stack of them, got shape {a.shape}")
    if not np.all(np.isfinite(a)) or not np.all(np.linalg.det(a) > 0.0):
        raise ValueError("every magnification matrix must be finite with a positive determinant")
    return a


def _congruence(
    dxx: NDArray[np.float64],
    dxy: NDArray[np.float64],
    dyy: NDArray[np.float64],
    n: NDArray[np.float64],
) -> _Arrays3:
    """Entries of ``N^T D N`` for symmetric ``D`` given by its entries (all broadcast)."""
    n00, n01, n10, n11 = n[..., 0, 0], n[..., 0, 1], n[..., 1, 0], n[..., 1, 1]
    exx = n00 * n00 * dxx + 2.0 * n00 * n10 * dxy + n10 * n10 * dyy
    eyy = n01 * n01 * dxx + 2.0 * n01 * n11 * dxy + n11 * n11 * dyy
    exy = n00 * n01 * dxx + (n00 * n11 + n10 * n01) * dxy + n10 * n11 * dyy
    return exx, exy, eyy


def _table_transform(
    u: ArrayLike, v: ArrayLike, angle_deg: ArrayLike, n: NDArray[np.float64]
) -> _Arrays3:
    """``(U, V, angle)`` of ``N^T D N`` for rows ``(U, V, angle)``; vectorised over rows."""
    u = np.asarray(u, dtype=float)
    v = np.asarray(v, dtype=float)
    t = np.deg2rad(2.0 * np.asarray(angle_deg, dtype=float))
    z = 0.5 * (u + v)
    h = 0.5 * (u - v)
    a1 = h * np.cos(t)
    a2 = h * np.sin(t)
    exx, exy, eyy = _congruence(z + a1, a2, z - a1, n)
    z2 = 0.5 * (exx + eyy)
    b1 = 0.5 * (exx - eyy)
    b2 = exy
    h2 = np.hypot(b1, b2)
    tiny = h2 <= _ASTIG_RTOL * np.maximum(np.abs(z2), 1.0)
    h2 = np.where(tiny, 0.0, h2)
    ang = np.where(tiny, 0.0, np.mod(0.5 * np.rad2deg(np.arctan2(b2, b1)), 180.0))
    ang = np.where(ang >= 180.0, 0.0, ang)  # floating point edge of mod
    return z2 + h2, z2 - h2, ang


def transform_defocus_matrix(d: ArrayLike, m: MagMat | ArrayLike, to: str) -> NDArray[np.float64]:
    """``D_true = M^-T D M^-1`` (``to="true"``) or ``D_obs = M^T D M`` (``to="observed"``)."""
    a = as_matrix(m)
    d = np.asarray(d, dtype=float)
    if to == "true":
        n = np.linalg.inv(a)
    elif to == "observed":
        n = a
    else:
        raise ValueError(f"'to' must be 'true' or 'observed', got {to!r}")
    return n.T @ d @ n


def _transform_params(params: CTFParams, n: NDArray[np.float64]) -> CTFParams:
    u, v, ang = _table_transform(params.defocus_u, params.defocus_v, params.angle_deg, n)
    z = 0.5 * (float(u) + float(v))
    h = 0.5 * (float(u) - float(v))
    t = np.deg2rad(2.0 * float(ang))
    return params_from_astig(
        z, h * np.cos(t), h * np.sin(t), params.phase_shift_deg, params.bfactor
    )


def defocus_to_true(params: CTFParams, m: MagMat | ArrayLike) -> CTFParams:
    """Observed-frame CTF parameters → true frame: ``D_true = M^-T D_obs M^-1`` (exact).

    Parameters
    ----------
    params
        Defocus U, V (Å) and U-axis angle as fitted on the recorded image (observed frame).
    m
        Magnification matrix, ``k_true = M k_obs``.

    Returns
    -------
    CTFParams
        Normalised (U >= V, angle in [0, 180); angle 0 when the result has no astigmatism).
        Phase shift and B-factor are passed through unchanged. The U axis is a direction in
        the true frame.
    """
    return _transform_params(params, np.linalg.inv(as_matrix(m)))


def defocus_to_observed(params: CTFParams, m: MagMat | ArrayLike) -> CTFParams:
    """True-frame CTF parameters → observed frame: ``D_obs = M^T D_true M`` (exact).

    The inverse of :func:`defocus_to_true`; same normalisation and pass-through.
    """
    return _transform_params(params, as_matrix(m))


def defocus_table_to_true(
    defocus_u: ArrayLike, defocus_v: ArrayLike, angle_deg: ArrayLike, m: MagMat | ArrayLike
) -> _Arrays3:
    """Vectorised :func:`defocus_to_true` over table columns (no loop over rows).

    Parameters
    ----------
    defocus_u, defocus_v, angle_deg
        Broadcastable arrays (e.g. ``_rlnDefocusU``, ``_rlnDefocusV``, ``_rlnDefocusAngle``).
    m
        One 2×2 matrix, or a stack of shape ``(N, 2, 2)`` with one matrix per row (e.g. each
        particle's optics-group matrix).

    Returns
    -------
    (u, v, angle)
        Float arrays with ``u >= v`` and the angle in [0, 180).
    """
    n = np.linalg.inv(_matrix_stack(m))
    return _table_transform(defocus_u, defocus_v, angle_deg, n)


def defocus_table_to_observed(
    defocus_u: ArrayLike, defocus_v: ArrayLike, angle_deg: ArrayLike, m: MagMat | ArrayLike
) -> _Arrays3:
    """Vectorised :func:`defocus_to_observed`; arguments as :func:`defocus_table_to_true`."""
    return _table_transform(defocus_u, defocus_v, angle_deg, _matrix_stack(m))


def isotropic_scale(m: MagMat | ArrayLike) -> float:
    """The isotropic part ``s = sqrt(det M)`` of a magnification matrix.

    ``M = s · M1`` with ``det M1 = 1``. For a pure scale ``M = s I`` (``k_true = s k_obs``):

    * defocus: ``D_true = M^-T D_obs M^-1 = D_obs / s²`` — every defocus divides by ``s²``
      (:func:`defocus_to_true` does exactly that);
    * pixel size: the FFT sample with observed frequency ``n / (N p)`` has true frequency
      ``n s / (N p) = n / (N (p / s))``, so the image's true pixel size is ``p / s``
      (:func:`true_pixel_size`).

    The two are not interchangeable for the whole CTF: the spherical-aberration term goes with
    ``|k|^4`` and scales by ``s^4``, so an isotropic error is a pixel-size error, not a defocus
    error. anisoctf keeps the scale inside ``M`` (as RELION does) unless it is moved into the
    pixel size explicitly.
    """
    a = as_matrix(m)
    return float(np.sqrt(np.linalg.det(a)))


def true_pixel_size(pixel_size: float, m: MagMat | ArrayLike) -> float:
    """True pixel size ``p / s`` of an image labelled ``p`` Å/px, ``s = sqrt(det M)``.

    Moving the isotropic part into the pixel size leaves ``M / s`` (:meth:`MagMat.normalised`)
    to describe the remaining, area-preserving distortion.
    """
    if not (np.isfinite(pixel_size) and pixel_size > 0.0):
        raise ValueError(f"pixel size must be a positive number of Å, got {pixel_size}")
    return float(pixel_size) / isotropic_scale(m)


def apparent_astigmatism(mean_defocus: float, m: MagMat | ArrayLike) -> CTFParams:
    """Observed CTF parameters of a micrograph with true defocus ``Δf`` and no astigmatism.

    Exact: ``D_obs = M^T (Δf I) M = Δf M^T M``, whose eigenvalues are ``Δf s1²`` and ``Δf s2²``
    (``s1 >= s2`` the singular values of ``M``), with eigenvectors the right singular vectors
    of ``M``. Hence, for ``Δf > 0`` (underfocus),

    * ``U = Δf s1²`` along :attr:`MagMat.axis_deg` (the observed direction ``M`` stretches most),
      ``V = Δf s2²`` across it;
    * ``U - V = Δf (s1² - s2²) = 2 Δf (A/100) s̄²`` exactly, with ``A`` the anisotropy in per
      cent and ``s̄ = (s1 + s2)/2``; for ``s̄ ≈ 1`` this is the familiar ``U - V ≈ 2 Δf A/100``
      (600 Å for 2 µm and 1.5 %);
    * the mean observed defocus is ``Δf (s1² + s2²)/2 ≈ Δf s²`` (``s = sqrt(det M)``).

    For ``Δf < 0`` (overfocus) the larger of the two, ``U``, lies across the axis instead.

    Returns
    -------
    CTFParams
        Normalised observed-frame parameters (angle in [0, 180)).
    """
    if not np.isfinite(mean_defocus):
        raise ValueError(f"defocus must be finite, got {mean_defocus}")
    return defocus_to_observed(CTFParams(float(mean_defocus), float(mean_defocus), 0.0), m)
