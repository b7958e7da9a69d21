"""The one place the CTF is written: phase ``chi``, ``CTF`` and ``CTF²``.

Every evaluation of the contrast transfer function in anisoctf (micrograph and patch fitting,
the coarse search, local profiles, particle refinement, the simulator, the diagnostics) goes
through the functions of this module; the conventions are pinned by
``tests/test_optics_kernel.py`` (see ``docs/conventions.md``).

Conventions (the sign changed to RELION's in issue 13; the rest as in the first release):

* frequencies in Å⁻¹, defocus in Å (underfocus positive), Cs in Å, phase in radians;
* the magnification matrix ``M`` maps the observed-image frequency to the true frequency,
  ``k_true = M k_obs`` (RELION's ``_rlnMagMat``); :func:`true_frequencies` is the only place it
  is applied, and every other function here takes true-frame frequencies;
* ``chi(k) = pi λ kᵀDk − (pi/2) Cs λ³ |k|⁴ + phase_shift + even aberrations``, with
  ``kᵀDk = z |k|² + a1 (kx² − ky²) + a2 (2 kx ky)`` for mean defocus ``z`` and Cartesian
  astigmatism ``(a1, a2)`` (:func:`defocus_form_inv_a`);
* ``CTF = CTF_SIGN · sin(chi + asin w)`` with ``CTF_SIGN = +1``, i.e.
  ``CTF = sqrt(1 − w²) sin(chi) + w cos(chi)`` for amplitude contrast ``w``, ``+w`` at
  ``k = 0``: RELION's sign (``src/ctf.h``, ``CTF::getCTF`` returns ``−sin(γ)`` with
  ``γ = −pi λ Δf k² + (pi/2) Cs λ³ k⁴ − asin w − phase shift = −(chi + asin w)``);
  ``CTF² = (1 − cos 2(chi + asin w)) / 2`` does not depend on the sign.

The sign is the single constant :data:`CTF_SIGN`. Until issue 13 it was −1 (the opposite of
RELION's), which power-spectrum fits cannot see but particles can: ``refine`` called every
RELION stack contrast-inverted and ``simulate-particles`` wrote the opposite contrast to
RELION's. Only :func:`ctf_from_chi` and :func:`ctf_from_chi_fast` read it; CTF² does not
depend on it.

The constants that do not change between evaluations (``pi λ``, ``(pi/2) Cs λ³``, ``asin w``,
``sqrt(1 − w²)``) are computed once per optics group in :class:`CTFConstants`, in the spirit of
RELION's ``CTF::initialise`` (``K1``–``K5`` in ``src/ctf.h``).

Batching: the parameter arguments (defocus, astigmatism, phase shift) may be scalars or arrays
with leading batch axes (candidates, particles); the frequency arrays are the trailing axes, so
a batch of shape ``B`` on a grid of shape ``G`` gives an array of shape ``B + G``.

Aberrations: :class:`AberrationTerms` is the slot for the additional even phase terms (added to
``chi``; e.g. RELION's even Zernike coefficients, ``_rlnEvenZernike``) and odd phase terms (a
phase factor ``exp(i·odd)`` on the complex image, e.g. beam tilt and ``_rlnOddZernike``). No
aberration is filled in yet; the default :data:`NO_ABERRATIONS` adds nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Final

import numpy as np
from numpy.typing import ArrayLike, NDArray

if TYPE_CHECKING:  # pragma: no cover - typing only
    from anisoctf.optics.ctf import Optics

__all__ = [
    "CTF_SIGN",
    "NO_ABERRATIONS",
    "AberrationTerms",
    "CTFConstants",
    "FrequencyFeatures",
    "chi_from_form_rad",
    "chi_rad",
    "cs_phase_rad",
    "ctf2_from_chi",
    "ctf2_from_chi_fast",
    "ctf_constants",
    "ctf_from_chi",
    "ctf_from_chi_fast",
    "defocus_form_inv_a",
    "defocus_phase_rad",
    "frequency_features",
    "odd_phase_rad",
    "true_frequencies",
]

#: Overall sign of the CTF: ``CTF = CTF_SIGN · sin(chi + asin w)``. +1 is RELION's sign
#: (``CTF::getCTF``: underfocus gives a *positive* CTF at low frequency, ``+w`` at ``k = 0``);
#: it was −1 before issue 13. Pinned by ``tests/test_optics_kernel.py::test_sign_convention``
#: and, on RELION-made particles, ``tests/test_refine_particles.py``.
CTF_SIGN: Final[float] = 1.0

#: One aberration phase term: true-frame ``(kx, ky)`` in Å⁻¹ → phase in radians.
PhaseTerm = Callable[[NDArray[np.float64], NDArray[np.float64]], NDArray[np.float64]]


@dataclass(frozen=True)
class AberrationTerms:
    """Additional phase terms beyond defocus, astigmatism, Cs and the phase shift.

    Parameters
    ----------
    even
        Terms symmetric under ``k → −k``; their sum is added to ``chi`` by :func:`chi_rad`.
    odd
        Terms antisymmetric under ``k → −k`` (beam tilt, coma, trefoil); they do not enter the
        (real) CTF but a phase factor ``exp(i Σ odd)`` on the complex image, given by
        :func:`odd_phase_rad`.

    Each term is a callable of the true-frame frequencies ``(kx_inv_a, ky_inv_a)`` returning
    radians, broadcastable to the grid. The next issue (RELION-style Zernike coefficients, beam
    tilt) fills this slot; the default holds none.
    """

    even: tuple[PhaseTerm, ...] = ()
    odd: tuple[PhaseTerm, ...] = ()

    @property
    def empty(self) -> bool:
        """True when no term is set."""
        return not self.even and not self.odd


#: No additional aberration (the default of every function here).
NO_ABERRATIONS: Final[AberrationTerms] = AberrationTerms()


@dataclass(frozen=True)
class CTFConstants:
    """Constants of one optics group, computed once (RELION ``CTF::initialise``, ``src/ctf.h``).

    Attributes
    ----------
    wavelength_a
        Electron wavelength λ (Å).
    cs_a
        Spherical aberration (Å).
    amplitude_contrast
        ``w``.
    defocus_coef_rad
        ``pi λ`` (rad per Å of ``kᵀDk`` in Å·Å⁻²); RELION's ``K1``.
    cs_coef_rad
        ``(pi/2) Cs λ³`` (rad per Å⁻⁴); RELION's ``K2``.
    amplitude_phase_rad
        ``asin w``, computed as ``arctan2(w, sqrt(1 − w²))``; RELION's ``K3``.
    sqrt_1_minus_w2
        ``sqrt(1 − w²)``.
    """

    wavelength_a: float
    cs_a: float
    amplitude_contrast: float
    defocus_coef_rad: float = field(init=False)
    cs_coef_rad: float = field(init=False)
    amplitude_phase_rad: float = field(init=False)
    sqrt_1_minus_w2: float = field(init=False)

    def __post_init__(self) -> None:
        lam, w = self.wavelength_a, self.amplitude_contrast
        object.__setattr__(self, "defocus_coef_rad", np.pi * lam)
        object.__setattr__(self, "cs_coef_rad", 0.5 * np.pi * self.cs_a * lam**3)
        root = float(np.sqrt(1 - w * w))
        object.__setattr__(self, "sqrt_1_minus_w2", root)
        object.__setattr__(self, "amplitude_phase_rad", float(np.arctan2(w, root)))

    @classmethod
    def from_optics(cls, optics: Optics) -> CTFConstants:
        """The constants of an :class:`~anisoctf.optics.ctf.Optics`."""
        return cls(optics.wavelength, optics.cs_angstrom, optics.amplitude_contrast)


@lru_cache(maxsize=64)
def ctf_constants(optics: Optics) -> CTFConstants:
    """:class:`CTFConstants` of ``optics`` (cached: ``Optics`` is frozen and hashable)."""
    return CTFConstants.from_optics(optics)


# ------------------------------------------------------------------ frequencies


def true_frequencies(
    kx_obs_inv_a: ArrayLike, ky_obs_inv_a: ArrayLike, mag_matrix: ArrayLike | None
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """``k_true = M k_obs``: the one place the magnification matrix is applied.

    Parameters
    ----------
    kx_obs_inv_a, ky_obs_inv_a
        Observed-frame frequencies (Å⁻¹), broadcastable shapes.
    mag_matrix
        ``M`` (2×2, RELION's ``_rlnMagMat``); None for the identity.
    """
    kx = np.asarray(kx_obs_inv_a, dtype=float)
    ky = np.asarray(ky_obs_inv_a, dtype=float)
    kx, ky = np.broadcast_arrays(kx, ky)
    if mag_matrix is not None:
        m = np.asarray(mag_matrix, dtype=float)
        kx, ky = m[0, 0] * kx + m[0, 1] * ky, m[1, 0] * kx + m[1, 1] * ky
    return kx, ky


@dataclass(frozen=True)
class FrequencyFeatures:
    """Quadratic and quartic forms of true-frame frequencies used by every CTF evaluation.

    With ``k = M k_obs``: ``k2 = |k|^2``, ``c2 = kx^2 - ky^2``, ``s2 = 2 kx ky``, ``k4 = |k|^4``
    (Å⁻², Å⁻², Å⁻², Å⁻⁴), so that ``k^T D k = z*k2 + a1*c2 + a2*s2`` for mean defocus ``z`` and
    Cartesian astigmatism ``(a1, a2)``. Precompute once per grid and reuse across parameter
    evaluations.
    """

    k2: NDArray[np.float64]
    c2: NDArray[np.float64]
    s2: NDArray[np.float64]
    k4: NDArray[np.float64] = field(repr=False)


def frequency_features(
    kx: ArrayLike, ky: ArrayLike, mag_matrix: ArrayLike | None = None
) -> FrequencyFeatures:
    """True-frame frequency features for observed frequencies ``(kx, ky)`` (Å⁻¹).

    ``mag_matrix`` is ``M`` with ``k_true = M k_obs`` (identity if None), applied by
    :func:`true_frequencies`.
    """
    kx, ky = true_frequencies(kx, ky, mag_matrix)
    k2 = kx * kx + ky * ky
    return FrequencyFeatures(k2=k2, c2=kx * kx - ky * ky, s2=2.0 * kx * ky, k4=k2 * k2)


# ------------------------------------------------------------------ phase


def _batch(value: ArrayLike, grid_ndim: int) -> NDArray[np.float64] | float:
    """A parameter with leading batch axes, given trailing unit axes for the grid."""
    a = np.asarray(value, dtype=float)
    if a.ndim == 0:
        return float(a)
    return a.reshape(a.shape + (1,) * grid_ndim)


def defocus_form_inv_a(
    features: FrequencyFeatures,
    mean_defocus_a: ArrayLike,
    astig_a1_a: ArrayLike | None = None,
    astig_a2_a: ArrayLike | None = None,
) -> NDArray[np.float64]:
    """``kᵀDk = z k2 + a1 c2 + a2 s2`` (Å·Å⁻² = Å⁻¹), batched over the parameters.

    ``astig_a1_a``/``astig_a2_a`` None: no astigmatism (the ``c2``/``s2`` terms are skipped).
    """
    nd = features.k2.ndim
    quad = _batch(mean_defocus_a, nd) * features.k2
    if astig_a1_a is not None:
        quad = quad + _batch(astig_a1_a, nd) * features.c2
    if astig_a2_a is not None:
        quad = quad + _batch(astig_a2_a, nd) * features.s2
    return quad


def defocus_phase_rad(defocus_form_inv_a: ArrayLike, wavelength_a: float) -> NDArray[np.float64]:
    """Defocus phase ``pi λ kᵀDk`` (rad) of a defocus form ``kᵀDk`` (Å⁻¹)."""
    return np.pi * wavelength_a * np.asarray(defocus_form_inv_a)


def cs_phase_rad(k4_inv_a4: ArrayLike, cs_a: float, wavelength_a: float) -> NDArray[np.float64]:
    """Spherical-aberration phase ``(pi/2) Cs λ³ |k|⁴`` (rad; it is *subtracted* in ``chi``)."""
    return 0.5 * np.pi * cs_a * wavelength_a**3 * np.asarray(k4_inv_a4)


def chi_from_form_rad(
    defocus_form_inv_a: ArrayLike,
    k4_inv_a4: ArrayLike,
    constants: CTFConstants,
    phase_shift_rad: ArrayLike = 0.0,
) -> NDArray[np.float64]:
    """``chi = pi λ kᵀDk − (pi/2) Cs λ³ |k|⁴ + phase_shift`` from a precomputed ``kᵀDk``.

    ``phase_shift_rad`` may carry leading batch axes; it is broadcast over the grid axes of
    ``k4_inv_a4``. Callers with their own precomputed defocus form (the local profiles) use this
    entry; the others use :func:`chi_rad`.
    """
    x = constants.defocus_coef_rad * np.asarray(defocus_form_inv_a) - constants.cs_coef_rad * (
        np.asarray(k4_inv_a4)
    )
    ph = np.asarray(phase_shift_rad, dtype=float)
    if ph.ndim == 0:
        if ph != 0.0:
            x = x + float(ph)
        return x
    return x + ph.reshape(ph.shape + (1,) * np.ndim(k4_inv_a4))


def chi_rad(
    features: FrequencyFeatures,
    constants: CTFConstants,
    mean_defocus_a: ArrayLike,
    astig_a1_a: ArrayLike | None = None,
    astig_a2_a: ArrayLike | None = None,
    phase_shift_rad: ArrayLike = 0.0,
    aberrations: AberrationTerms = NO_ABERRATIONS,
    k_true_inv_a: tuple[NDArray[np.float64], NDArray[np.float64]] | None = None,
) -> NDArray[np.float64]:
    """The phase aberration ``chi`` (rad), batched over the parameters.

    Parameters
    ----------
    features
        True-frame frequency features of the grid (:func:`frequency_features`).
    constants
        The optics group's :class:`CTFConstants`.
    mean_defocus_a, astig_a1_a, astig_a2_a, phase_shift_rad
        Mean defocus and Cartesian astigmatism (Å) and phase shift (rad): scalars or arrays of
        one batch shape ``B``; the result has shape ``B + features.k2.shape``.
    aberrations
        Additional even terms, added to ``chi`` (they need ``k_true_inv_a``).
    k_true_inv_a
        True-frame ``(kx, ky)`` of the grid (Å⁻¹, :func:`true_frequencies`); only read by
        aberration terms.
    """
    quad = defocus_form_inv_a(features, mean_defocus_a, astig_a1_a, astig_a2_a)
    x = chi_from_form_rad(quad, features.k4, constants, phase_shift_rad)
    if aberrations.even:
        if k_true_inv_a is None:
            raise ValueError("aberration terms need the true-frame frequencies k_true_inv_a")
        for term in aberrations.even:
            x = x + term(*k_true_inv_a)
    return x


def odd_phase_rad(
    aberrations: AberrationTerms,
    k_true_inv_a: tuple[NDArray[np.float64], NDArray[np.float64]],
) -> NDArray[np.float64] | None:
    """Sum of the odd phase terms (rad) at true-frame ``(kx, ky)``; None when there are none.

    The image model multiplies the complex CTF-weighted projection by ``exp(i·odd)``.
    """
    if not aberrations.odd:
        return None
    out = np.zeros(np.broadcast_shapes(*(np.shape(k) for k in k_true_inv_a)))
    for term in aberrations.odd:
        out = out + term(*k_true_inv_a)
    return out


# ------------------------------------------------------------------ chi -> CTF, CTF²


def ctf_from_chi(chi: NDArray[np.float64], constants: CTFConstants) -> NDArray[np.float64]:
    """``CTF = CTF_SIGN (sqrt(1 − w²) sin chi + w cos chi) = CTF_SIGN sin(chi + asin w)``.

    Float64; written with the two trigonometric terms, so it is exact also where ``chi`` is
    large (no addition of ``asin w`` to a large phase).
    """
    return CTF_SIGN * (
        constants.sqrt_1_minus_w2 * np.sin(chi) + constants.amplitude_contrast * np.cos(chi)
    )


def ctf_from_chi_fast(chi: NDArray, constants: CTFConstants) -> NDArray:
    """``CTF = CTF_SIGN sin(chi + asin w)`` with one sine, in ``chi``'s own dtype.

    Overwrites ``chi``. ``asin w`` is rounded to float32 (the particle model's fast path); the
    difference from :func:`ctf_from_chi` is below 1e-7 (pinned in the tests).
    """
    chi += np.float32(constants.amplitude_phase_rad)
    out = np.sin(chi)
    out *= CTF_SIGN
    return out


def ctf2_from_chi(
    chi: NDArray[np.float64],
    constants: CTFConstants,
    modulation: ArrayLike | None = None,
    overwrite: bool = False,
) -> NDArray[np.float64]:
    """``CTF² = (1 − m cos 2(chi + asin w)) / 2`` in float64.

    ``modulation`` ``m`` (default 1) damps the oscillating part (a spread of defocus within a
    region, :func:`anisoctf.local.profiles.modulation`). ``overwrite`` reuses ``chi``'s memory.
    """
    y = chi if overwrite else np.array(chi, dtype=float)
    y += constants.amplitude_phase_rad
    y *= 2.0
    c2 = np.cos(y)
    c2 *= -0.5
    if modulation is not None:
        c2 *= modulation
    c2 += 0.5
    return c2


def _reduced_double_phase(chi: NDArray[np.float64], constants: CTFConstants) -> NDArray:
    """``y = 2 (chi + asin w)`` reduced exactly to ``[−pi, pi]`` (overwrites ``chi``)."""
    y = chi
    y += constants.amplitude_phase_rad
    y *= 2.0
    y -= (2 * np.pi) * np.round(y * (0.5 / np.pi))
    return y


def ctf2_from_chi_fast(
    chi: NDArray[np.float64], constants: CTFConstants, derivative: bool = False
) -> NDArray | tuple[NDArray, NDArray]:
    """Fast CTF² (overwrites ``chi``).

    ``derivative`` False: CTF² from a float32 cosine after an exact reduction of the double
    phase to ``[−pi, pi]`` (the coarse search's score table), returned as float64; within 1e-6
    of :func:`ctf2_from_chi`.

    ``derivative`` True: ``(CTF², d(CTF²)/d(chi))`` with CTF² from a float64 cosine (it enters a
    likelihood) and the derivative ``sin 2(chi + asin w)`` from a float32 sine after the exact
    reduction (it only feeds an information matrix); the derivative is within 1e-6 of float64.
    """
    if not derivative:
        y = _reduced_double_phase(chi, constants)
        c2 = np.cos(y.astype(np.float32))
        c2 *= np.float32(-0.5)
        c2 += np.float32(0.5)
        return c2.astype(np.float64)
    y = chi
    y += constants.amplitude_phase_rad
    y *= 2.0
    c2 = np.cos(y)
    c2 *= -0.5
    c2 += 0.5
    y -= (2 * np.pi) * np.round(y * (0.5 / np.pi))
    return c2, np.sin(y.astype(np.float32))
