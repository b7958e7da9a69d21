"""Higher-order aberrations of an optics group as RELION 3.1+ defines and stores them.

RELION keeps three things per optics group (``data_optics``):

* ``_rlnBeamTiltX`` / ``_rlnBeamTiltY``: beam tilt (mrad);
* ``_rlnOddZernike``: coefficients of the *odd* Zernike polynomials, in the order
  ``Z1^-1, Z1^1, Z3^-3, Z3^-1, Z3^1, Z3^3, Z5^-5, …`` (``Zernike::oddIndexToMN`` in
  ``src/jaz/math/Zernike.cpp``); they give a phase factor ``exp(i·Σ c·Z)`` on the predicted
  (CTF-weighted) image (``ObservationModel::getPhaseCorrection``, ``obs_model.cpp``);
* ``_rlnEvenZernike``: coefficients of the *even* polynomials, in the order
  ``Z0^0, Z2^-2, Z2^0, Z2^2, Z4^-4, Z4^-2, Z4^0, Z4^2, Z4^4, Z6^-6, …``
  (``Zernike::evenIndexToMN``); their sum is added to RELION's phase ``gamma``
  (``ObservationModel::getGammaOffset``; ``CTF::getCTF`` in ``src/ctf.h``).

The polynomials are *unnormalised*: ``Z_n^m(ρ, φ) = R_n^|m|(ρ) cos(mφ)`` for ``m ≥ 0`` and
``R_n^|m|(ρ) sin(|m|φ)`` for ``m < 0``, with the usual radial polynomial
``R_n^m(ρ) = Σ_k (−1)^k (n−k)! / (k! ((n+m)/2−k)! ((n−m)/2−k)!) ρ^(n−2k)``
(``Zernike::R``, ``Zernike::prepCoeffs``), evaluated with ``ρ = |k|`` in Å⁻¹ (no pupil radius)
and ``φ = atan2(ky, kx)``, at the *true* frequency ``k = M k_obs`` (RELION applies
``_rlnMagMat`` before evaluating them).

Beam tilt is not a separate phase: RELION inserts it into the odd coefficients when it reads an
optics group (``TiltHelper::insertTilt``, ``src/jaz/single_particle/ctf/tilt_helper.cpp``),
``Z3x = −s·τx/3``, ``Z3y = −s·τy/3`` with ``s = 2π·10⁴·Cs[mm]·λ²[Å]`` (τ in mrad), added to
``Z3^1``/``Z3^-1`` and twice that to ``Z1^1``/``Z1^-1``; i.e. the odd phase
``−2π Cs λ² |k|² (k·τ)`` of a tilted beam. :func:`extract_tilt` is the inverse
(``TiltHelper::extractTilt``), which is how RELION writes a fitted odd vector back.

Sign in this package's phase ``chi``: RELION's ``gamma`` is ``−chi − asin w`` (``CTF::initialise``
builds its defocus form from ``−DeltafU/V``; its CTF is ``−sin gamma``), so an even offset ``e``
added to ``gamma`` is ``−e`` in ``chi`` (:func:`aberration_terms`). The odd factor multiplies the
complex prediction and does not depend on that sign. Pinned by ``tests/test_aberrations.py``
against RELION 5 CtfRefine's own fits and phase images (``../shared/data/relion_ctfrefine``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from anisoctf.optics.kernel import AberrationTerms, true_frequencies

__all__ = [
    "Aberrations",
    "ZernikeSum",
    "aberration_terms",
    "cs_change_to_even",
    "even_to_cs_change",
    "even_index_to_mn",
    "even_phase_rad",
    "extract_tilt",
    "insert_tilt",
    "n_even_coeffs",
    "n_odd_coeffs",
    "odd_index_to_mn",
    "odd_phase_rad",
    "phase_image",
    "radial_coeffs",
    "tilt_scale",
    "zernike",
]


# ------------------------------------------------------------------ the polynomials


def odd_index_to_mn(i: int) -> tuple[int, int]:
    """``(m, n)`` of entry ``i`` of ``_rlnOddZernike`` (``Zernike::oddIndexToMN``).

    0 → Z1^-1, 1 → Z1^1, 2 → Z3^-3, 3 → Z3^-1, 4 → Z3^1, 5 → Z3^3, 6 → Z5^-5, …
    """
    if i < 0:
        raise ValueError(f"Zernike index must be >= 0, got {i}")
    k = (math.isqrt(1 + 4 * i) - 1) // 2
    n = 2 * k + 1
    return 2 * (i - (k * k + k)) - n, n


def even_index_to_mn(i: int) -> tuple[int, int]:
    """``(m, n)`` of entry ``i`` of ``_rlnEvenZernike`` (``Zernike::evenIndexToMN``).

    0 → Z0^0, 1 → Z2^-2, 2 → Z2^0, 3 → Z2^2, 4 → Z4^-4, …, 8 → Z4^4, 9 → Z6^-6, …
    """
    if i < 0:
        raise ValueError(f"Zernike index must be >= 0, got {i}")
    k = math.isqrt(i)
    return 2 * (i - k * k - k), 2 * k


def n_odd_coeffs(n_max: int) -> int:
    """Number of odd coefficients up to order ``n_max`` (3 → 6, 5 → 12)."""
    l_ = (n_max - 1) // 2 + 1
    return l_ * l_ + l_


def n_even_coeffs(n_max: int) -> int:
    """Number of even coefficients up to order ``n_max`` (4 → 9, 6 → 16)."""
    l_ = n_max // 2
    return l_ * l_ + 2 * l_ + 1


@lru_cache(maxsize=128)
def radial_coeffs(m: int, n: int) -> tuple[float, ...]:
    """Coefficients of ``ρ^(n−2k)``, ``k = 0 … (n−m)/2``, of ``R_n^m`` (``m ≥ 0``, ``n−m`` even)."""
    if m < 0 or m > n or (n - m) % 2:
        raise ValueError(f"no radial Zernike polynomial R_{n}^{m}")
    f = math.factorial
    return tuple(
        (-1) ** k * f(n - k) / (f(k) * f((n + m) // 2 - k) * f((n - m) // 2 - k))
        for k in range((n - m) // 2 + 1)
    )


def zernike(m: int, n: int, kx: ArrayLike, ky: ArrayLike) -> NDArray[np.float64]:
    """Unnormalised ``Z_n^m`` at Cartesian ``(kx, ky)`` (``Zernike::Z_cart``).

    ``R_n^|m|(ρ) cos(mφ)`` for ``m ≥ 0``, ``R_n^|m|(ρ) sin(|m|φ)`` for ``m < 0``; ``ρ = |k|``
    (no normalisation to a pupil), ``φ = atan2(ky, kx)`` (0 at the origin).
    """
    kx = np.asarray(kx, dtype=float)
    ky = np.asarray(ky, dtype=float)
    rho = np.hypot(kx, ky)
    phi = np.arctan2(ky, kx)
    am = abs(m)
    radial = np.zeros(np.broadcast_shapes(kx.shape, ky.shape))
    for k, c in enumerate(radial_coeffs(am, n)):
        radial = radial + c * rho ** (n - 2 * k)
    return radial * (np.cos(am * phi) if m >= 0 else np.sin(am * phi))


def _zernike_sum(
    coeffs: Sequence[float], parity: Literal["odd", "even"], kx: ArrayLike, ky: ArrayLike
) -> NDArray[np.float64]:
    index = odd_index_to_mn if parity == "odd" else even_index_to_mn
    kx = np.asarray(kx, dtype=float)
    ky = np.asarray(ky, dtype=float)
    out = np.zeros(np.broadcast_shapes(kx.shape, ky.shape))
    for i, c in enumerate(coeffs):
        if c != 0.0:
            out = out + float(c) * zernike(*index(i), kx, ky)
    return out


def odd_phase_rad(
    odd_coeffs: Sequence[float], kx_true_inv_a: ArrayLike, ky_true_inv_a: ArrayLike
) -> NDArray[np.float64]:
    """``Σ c_i Z_i(k)`` over ``_rlnOddZernike`` (tilt already inserted): the phase of the factor
    ``exp(i·…)`` RELION puts on the prediction (``getPhaseCorrection``). ``k`` true-frame, Å⁻¹."""
    return _zernike_sum(odd_coeffs, "odd", kx_true_inv_a, ky_true_inv_a)


def even_phase_rad(
    even_coeffs: Sequence[float], kx_true_inv_a: ArrayLike, ky_true_inv_a: ArrayLike
) -> NDArray[np.float64]:
    """``Σ c_i Z_i(k)`` over ``_rlnEvenZernike``: RELION's offset *added to gamma*
    (``getGammaOffset``); in this package's ``chi`` it enters with the opposite sign."""
    return _zernike_sum(even_coeffs, "even", kx_true_inv_a, ky_true_inv_a)


def phase_image(
    coeffs: Sequence[float],
    parity: Literal["odd", "even"],
    size: int,
    pixel_size_a: float,
    mag_matrix: ArrayLike | None = None,
) -> NDArray[np.float64]:
    """``Σ c·Z(M k)`` on a centred ``size × size`` grid, the layout of RELION's phase images.

    Pixel ``[y, x]`` is the frequency ``((x − size/2), (y − size/2)) / (size · pixel)``, as in
    the full images CtfRefine writes (``beamtilt_delta-phase_*.mrc``, ``aberr_delta-phase_*.mrc``;
    ``FftwHelper::decenterDouble2D`` / ``decenterUnflip2D``). RELION copies the neighbouring
    row/column into the Nyquist ones ("cannot trust Nyquist"); here they are evaluated.
    """
    c = (np.arange(size) - size // 2) / (size * pixel_size_a)
    kx, ky = true_frequencies(*np.meshgrid(c, c), mag_matrix)
    return _zernike_sum(coeffs, parity, kx, ky)


# ------------------------------------------------------------------ beam tilt


def tilt_scale(cs_mm: float, wavelength_a: float) -> float:
    """``2π·10⁴·Cs·λ²`` (rad Å³ per mrad): RELION's ``scale`` in ``TiltHelper::insertTilt``.

    RELION writes ``Cs * 20000 * λ² * 3.141592654``; the exact π is used here (the difference is
    below 1e-9 relative).
    """
    return 2.0e4 * math.pi * cs_mm * wavelength_a**2


def _padded(odd_coeffs: Sequence[float]) -> list[float]:
    out = [float(c) for c in odd_coeffs]
    return out + [0.0] * (6 - len(out)) if len(out) < 6 else out


def insert_tilt(
    odd_coeffs: Sequence[float],
    tilt_x_mrad: float,
    tilt_y_mrad: float,
    cs_mm: float,
    wavelength_a: float,
) -> tuple[float, ...]:
    """The odd vector with the beam tilt inserted (``TiltHelper::insertTilt``).

    ``Z3x = −s τx / 3``, ``Z3y = −s τy / 3`` (:func:`tilt_scale`) are added to ``Z3^1`` (index 4)
    and ``Z3^-1`` (index 3), and ``2 Z3x``/``2 Z3y`` to ``Z1^1`` (1) and ``Z1^-1`` (0), so that
    the odd phase gains ``−s |k|² (k·τ)``. The vector is padded to 6 entries.
    """
    out = _padded(odd_coeffs)
    s = tilt_scale(cs_mm, wavelength_a)
    z3x, z3y = -s * tilt_x_mrad / 3.0, -s * tilt_y_mrad / 3.0
    out[1] += 2.0 * z3x
    out[0] += 2.0 * z3y
    out[4] += z3x
    out[3] += z3y
    return tuple(out)


def extract_tilt(
    odd_coeffs: Sequence[float], cs_mm: float, wavelength_a: float
) -> tuple[tuple[float, ...], float, float]:
    """``(odd without Z3^±1, tilt_x_mrad, tilt_y_mrad)`` (``TiltHelper::extractTilt``).

    The inverse of :func:`insert_tilt`: all of ``Z3^±1`` is read as beam tilt (what RELION writes
    to ``_rlnBeamTiltX/Y`` after a fit), and its ``Z1`` part removed.
    """
    out = _padded(odd_coeffs)
    s = tilt_scale(cs_mm, wavelength_a)
    if s == 0.0:
        raise ValueError("beam tilt cannot be extracted with Cs = 0 (it gives no odd phase)")
    z3x, z3y = out[4], out[3]
    out[4] = out[3] = 0.0
    out[1] -= 2.0 * z3x
    out[0] -= 2.0 * z3y
    return tuple(out), -3.0 * z3x / s, -3.0 * z3y / s


# ------------------------------------------------------------------ Cs ⇄ even Zernikes


def _cs_quartic_rad(delta_cs_mm: float, wavelength_a: float) -> float:
    """``(π/2) ΔCs λ³`` (rad Å⁴): the ``|k|⁴`` coefficient a Cs change adds to RELION's gamma."""
    return 0.5 * math.pi * delta_cs_mm * 1e7 * wavelength_a**3


def cs_change_to_even(delta_cs_mm: float, wavelength_a: float) -> tuple[float, ...]:
    """The even vector (n ≤ 4, 9 entries) whose phase equals a Cs change of ``delta_cs_mm``.

    RELION keeps the nominal Cs and puts a refined one into ``_rlnEvenZernike``; tools that refine
    Cs itself (e.g. cryoSPARC's ``ctf/cs_mm``) change ``(π/2) ΔCs λ³ |k|⁴`` in ``gamma``. With
    ``|k|⁴ = (Z4^0 + 3 Z2^0 + 2 Z0^0) / 6`` and ``q = (π/2) ΔCs λ³``: ``Z0^0 = q/3``,
    ``Z2^0 = q/2``, ``Z4^0 = q/6``; all other entries zero.
    """
    q = _cs_quartic_rad(delta_cs_mm, wavelength_a)
    out = [0.0] * 9
    out[0], out[2], out[6] = q / 3.0, q / 2.0, q / 6.0
    return tuple(out)


def even_to_cs_change(
    even_coeffs: Sequence[float], wavelength_a: float
) -> tuple[float, tuple[float, ...]]:
    """``(ΔCs in mm, remaining even vector)``: the ``|k|⁴`` part of the even phase as a Cs change.

    All of ``Z4^0`` (index 6) is read as Cs: ``ΔCs = 6 c(Z4^0) / ((π/2) λ³)``; the rest is
    ``even − cs_change_to_even(ΔCs)`` (its ``Z2^0``/``Z0^0`` hold what a Cs change does not
    explain), so ``even_phase(even) = even_phase(cs part) + even_phase(rest)`` exactly.
    """
    even = [float(c) for c in even_coeffs]
    if len(even) < 9:
        even += [0.0] * (9 - len(even))
    unit = _cs_quartic_rad(1.0, wavelength_a)
    delta = 6.0 * even[6] / unit
    cs_part = cs_change_to_even(delta, wavelength_a)
    padded = cs_part + (0.0,) * (len(even) - 9)
    return delta, tuple(e - c for e, c in zip(even, padded, strict=True))


# ------------------------------------------------------------------ the record


@dataclass(frozen=True)
class Aberrations:
    """One optics group's higher-order aberrations, as RELION stores them.

    Attributes
    ----------
    beam_tilt_mrad
        ``(_rlnBeamTiltX, _rlnBeamTiltY)`` in mrad.
    odd
        ``_rlnOddZernike`` as stored (without the tilt; :meth:`odd_with_tilt` inserts it).
    even
        ``_rlnEvenZernike``.
    """

    beam_tilt_mrad: tuple[float, float] = (0.0, 0.0)
    odd: tuple[float, ...] = ()
    even: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "beam_tilt_mrad", tuple(float(v) for v in self.beam_tilt_mrad))
        object.__setattr__(self, "odd", tuple(float(v) for v in self.odd))
        object.__setattr__(self, "even", tuple(float(v) for v in self.even))
        if len(self.beam_tilt_mrad) != 2:
            raise ValueError(f"beam tilt needs 2 values (x, y), got {self.beam_tilt_mrad}")
        values = self.beam_tilt_mrad + self.odd + self.even
        if not all(math.isfinite(v) for v in values):
            raise ValueError("aberration coefficients must be finite")

    @property
    def empty(self) -> bool:
        """True when nothing is set (all zero)."""
        return not any(self.beam_tilt_mrad) and not any(self.odd) and not any(self.even)

    def odd_with_tilt(self, cs_mm: float, wavelength_a: float) -> tuple[float, ...]:
        """The odd vector RELION evaluates: :attr:`odd` with the beam tilt inserted."""
        if not any(self.beam_tilt_mrad):
            return self.odd
        tx, ty = self.beam_tilt_mrad
        return insert_tilt(self.odd, tx, ty, cs_mm, wavelength_a)


@dataclass(frozen=True)
class ZernikeSum:
    """A kernel phase term ``sign · Σ c_i Z_i(kx, ky)`` (a kernel ``PhaseTerm``)."""

    coeffs: tuple[float, ...]
    parity: Literal["odd", "even"]
    sign: float = 1.0

    def __call__(
        self, kx_true_inv_a: NDArray[np.float64], ky_true_inv_a: NDArray[np.float64]
    ) -> NDArray[np.float64]:
        return self.sign * _zernike_sum(self.coeffs, self.parity, kx_true_inv_a, ky_true_inv_a)


def aberration_terms(
    aberrations: Aberrations, cs_mm: float, wavelength_a: float
) -> AberrationTerms:
    """The kernel's :class:`~anisoctf.optics.kernel.AberrationTerms` of one optics group.

    Even: ``−Σ c Z`` added to ``chi`` (RELION adds ``+Σ c Z`` to ``gamma = −chi − asin w``).
    Odd: ``+Σ c Z`` of the odd vector with the tilt inserted, the phase of ``exp(i·odd)`` on the
    complex prediction. Empty parts give no term.
    """
    odd = aberrations.odd_with_tilt(cs_mm, wavelength_a)
    even_terms = (ZernikeSum(aberrations.even, "even", -1.0),) if any(aberrations.even) else ()
    odd_terms = (ZernikeSum(odd, "odd", 1.0),) if any(odd) else ()
    return AberrationTerms(even=even_terms, odd=odd_terms)
