"""The contrast transfer function, with the magnification matrix built in.

The optics records (:class:`Optics`, :class:`CTFParams`) and the grid-level CTF
(:func:`ctf_2d`, :func:`ctf_1d`, :func:`chi`). The formulas themselves are written once, in
:mod:`anisoctf.optics.kernel`, which every part of anisoctf (simulation, micrograph and patch
fitting, particle refinement) calls (see ``docs/conventions.md``):

* defocus in Å, underfocus positive;
* the U axis angle is measured from +x (array columns) towards +y (array rows), in degrees;
* ``chi(k) = pi*lam*k^T D k - pi/2*Cs*lam^3*|k|^4 + phase_shift`` with ``k`` the *true* frequency;
* ``CTF = sqrt(1-w^2) sin(chi) + w cos(chi) = sin(chi + asin w)`` (RELION's sign, ``+w`` at
  ``k = 0``: RELION ``CTF::getCTF`` is ``-sin(gamma)`` with ``gamma = -(chi + asin w)``), times
  ``exp(-B |k|^2 / 4)`` (the sign is :data:`anisoctf.optics.kernel.CTF_SIGN`);
* the magnification matrix ``M`` maps observed-image frequency to true frequency,
  ``k_true = M k_obs`` (RELION's ``_rlnMagMat``); so ``D_obs = M^T D_true M``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import ArrayLike, NDArray

from anisoctf.optics.kernel import (
    FrequencyFeatures,
    chi_rad,
    ctf_constants,
    ctf_from_chi,
    frequency_features,
)
from anisoctf.optics.magmat import MagMat

__all__ = [
    "CTFParams",
    "FrequencyFeatures",
    "Optics",
    "chi",
    "ctf_1d",
    "ctf_2d",
    "defocus_matrix",
    "electron_wavelength",
    "frequency_features",
    "frequency_grid",
    "params_from_astig",
]

_H = 6.62607015e-34  # Planck constant, J s
_M0 = 9.1093837015e-31  # electron rest mass, kg
_E = 1.602176634e-19  # elementary charge, C
_C = 299792458.0  # speed of light, m/s


def electron_wavelength(voltage_kv: float) -> float:
    """Relativistic electron wavelength in Å.

    Parameters
    ----------
    voltage_kv
        Accelerating voltage in kV.

    Returns
    -------
    float
        Wavelength in Å (0.019687 Å at 300 kV, 0.025079 Å at 200 kV).
    """
    v = voltage_kv * 1e3
    p = np.sqrt(2.0 * _M0 * _E * v * (1.0 + _E * v / (2.0 * _M0 * _C**2)))
    return float(_H / p * 1e10)


@dataclass(frozen=True)
class Optics:
    """Microscope and detector constants of one optics group.

    Parameters
    ----------
    pixel_size
        Pixel size of the image in Å.
    voltage_kv
        Accelerating voltage in kV.
    cs_mm
        Spherical aberration in mm.
    amplitude_contrast
        Amplitude contrast fraction ``w`` (0.07–0.1 for ice).
    mag_matrix
        2×2 matrix ``M`` with ``k_true = M k_obs``; identity when there is no anisomag.
        Validated by :class:`~anisoctf.optics.magmat.MagMat` (finite, positive determinant: a
        mirror is refused); anything ``MagMat`` accepts, a ``MagMat`` included. Stored as
        nested tuples of floats; :attr:`M` is the array, :attr:`magmat` the ``MagMat``.
    """

    pixel_size: float
    voltage_kv: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.07
    mag_matrix: tuple[tuple[float, float], tuple[float, float]] = ((1.0, 0.0), (0.0, 1.0))

    def __post_init__(self) -> None:
        if not (np.isfinite(self.pixel_size) and self.pixel_size > 0):
            raise ValueError(f"pixel size must be a positive number of Å, got {self.pixel_size}")
        if not (np.isfinite(self.voltage_kv) and self.voltage_kv > 0):
            raise ValueError(f"voltage must be a positive number of kV, got {self.voltage_kv}")
        if not (0.0 <= self.amplitude_contrast < 1.0):
            raise ValueError(f"amplitude contrast must be in [0, 1), got {self.amplitude_contrast}")
        raw = self.mag_matrix
        mm = raw if isinstance(raw, MagMat) else MagMat(raw)  # the one validation of a matrix
        # store as nested tuples of floats so the dataclass stays hashable
        object.__setattr__(self, "mag_matrix", mm.matrix)

    @property
    def wavelength(self) -> float:
        """Electron wavelength in Å."""
        return electron_wavelength(self.voltage_kv)

    @property
    def cs_angstrom(self) -> float:
        """Spherical aberration in Å."""
        return self.cs_mm * 1e7

    @property
    def M(self) -> NDArray[np.float64]:  # noqa: N802 - the physics name
        """The magnification matrix as an array."""
        return np.asarray(self.mag_matrix, dtype=float)

    @property
    def magmat(self) -> MagMat:
        """The magnification matrix as a :class:`~anisoctf.optics.magmat.MagMat`."""
        return MagMat(self.mag_matrix)

    @property
    def has_anisomag(self) -> bool:
        """True when the magnification matrix differs from the identity."""
        return not np.allclose(self.M, np.eye(2), atol=1e-12)

    def with_pixel_size(self, pixel_size: float) -> Optics:
        """The same optics at another pixel size (e.g. after Fourier cropping)."""
        return replace(self, pixel_size=pixel_size)


@dataclass(frozen=True)
class CTFParams:
    """Per-image CTF parameters.

    Parameters
    ----------
    defocus_u, defocus_v
        Defocus along the major and minor axes in Å, underfocus positive.
    angle_deg
        Angle of the U axis from +x towards +y, degrees.
    phase_shift_deg
        Additional phase shift (phase plate), degrees.
    bfactor
        Envelope B-factor in Å² (``exp(-B |k|^2 / 4)`` on the amplitude).
    """

    defocus_u: float
    defocus_v: float
    angle_deg: float = 0.0
    phase_shift_deg: float = 0.0
    bfactor: float = 0.0

    @property
    def mean_defocus(self) -> float:
        """(U + V) / 2 in Å."""
        return 0.5 * (self.defocus_u + self.defocus_v)

    @property
    def astigmatism(self) -> float:
        """U − V in Å."""
        return self.defocus_u - self.defocus_v

    @property
    def astig_components(self) -> tuple[float, float]:
        """Cartesian astigmatism ``(h cos 2θ, h sin 2θ)`` with ``h = (U − V) / 2``, in Å."""
        h = 0.5 * (self.defocus_u - self.defocus_v)
        t = np.deg2rad(2.0 * self.angle_deg)
        return float(h * np.cos(t)), float(h * np.sin(t))

    def normalised(self) -> CTFParams:
        """Equivalent parameters with U ≥ V and the angle in [0, 180)."""
        return params_from_astig(
            self.mean_defocus, *self.astig_components, self.phase_shift_deg, self.bfactor
        )

    def matrix(self) -> NDArray[np.float64]:
        """The defocus quadratic form D (2×2, Å), so that ``k^T D k`` is the defocus term."""
        return defocus_matrix(self.defocus_u, self.defocus_v, self.angle_deg)


def params_from_astig(
    mean_defocus: float,
    a1: float,
    a2: float,
    phase_shift_deg: float = 0.0,
    bfactor: float = 0.0,
) -> CTFParams:
    """Build normalised parameters from mean defocus and Cartesian astigmatism.

    ``a1 = h cos 2θ``, ``a2 = h sin 2θ`` with ``h = (U − V)/2``; the result has U ≥ V and
    the angle in [0, 180). With no astigmatism the angle is 0.
    """
    h = float(np.hypot(a1, a2))
    angle = 0.5 * np.rad2deg(np.arctan2(a2, a1)) if h > 0 else 0.0
    angle = float(np.mod(angle, 180.0))
    if angle >= 180.0:  # guard the floating point edge of mod
        angle = 0.0
    phase = float(np.mod(phase_shift_deg, 360.0))
    return CTFParams(mean_defocus + h, mean_defocus - h, angle, phase, bfactor)


def defocus_matrix(defocus_u: float, defocus_v: float, angle_deg: float) -> NDArray[np.float64]:
    """Symmetric 2×2 defocus matrix ``D = R diag(U, V) R^T`` with R the rotation by the angle."""
    t = np.deg2rad(angle_deg)
    c, s = np.cos(t), np.sin(t)
    r = np.array([[c, -s], [s, c]])
    return r @ np.diag([defocus_u, defocus_v]) @ r.T


def frequency_grid(
    shape: tuple[int, int], pixel_size: float, rfft: bool = True
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Spatial frequencies (Å⁻¹) of an FFT grid, in FFT order (zero at index 0).

    Parameters
    ----------
    shape
        (ny, nx) of the real-space image.
    pixel_size
        Å per pixel.
    rfft
        If True the x axis has ``nx // 2 + 1`` entries as from ``numpy.fft.rfft2``.

    Returns
    -------
    kx, ky
        Broadcastable arrays of shape (1, nkx) and (ny, 1).
    """
    ny, nx = shape
    ky = np.fft.fftfreq(ny, d=pixel_size)[:, None]
    kx = (np.fft.rfftfreq(nx, d=pixel_size) if rfft else np.fft.fftfreq(nx, d=pixel_size))[None, :]
    return kx, ky


def chi(features: FrequencyFeatures, params: CTFParams, optics: Optics) -> NDArray[np.float64]:
    """Phase aberration ``chi`` (radians) at precomputed true-frame frequency features.

    :func:`anisoctf.optics.kernel.chi_rad` for one parameter set.
    """
    a1, a2 = params.astig_components
    return chi_rad(
        features,
        ctf_constants(optics),
        params.mean_defocus,
        a1,
        a2,
        np.deg2rad(params.phase_shift_deg),
    )


def ctf_2d(
    shape: tuple[int, int],
    params: CTFParams,
    optics: Optics,
    rfft: bool = True,
) -> NDArray[np.float64]:
    """The 2D CTF on an FFT grid (FFT order), magnification matrix and envelope included.

    Parameters
    ----------
    shape
        Real-space image shape (ny, nx).
    params, optics
        CTF parameters (true frame) and optics; ``optics.mag_matrix`` maps the grid's
        observed frequencies into the true frame.
    rfft
        Half-plane grid as from ``rfft2`` if True.
    """
    kx, ky = frequency_grid(shape, optics.pixel_size, rfft=rfft)
    feats = frequency_features(kx, ky, optics.M if optics.has_anisomag else None)
    out = ctf_from_chi(chi(feats, params, optics), ctf_constants(optics))
    if params.bfactor:
        out = out * np.exp(-0.25 * params.bfactor * feats.k2)
    return out


def ctf_1d(
    k: ArrayLike, defocus: float, optics: Optics, phase_shift_deg: float = 0.0, bfactor: float = 0.0
) -> NDArray[np.float64]:
    """Rotationally symmetric CTF at radial frequencies ``k`` (Å⁻¹) for a single defocus."""
    k = np.asarray(k, dtype=float)
    k2 = k * k
    feats = FrequencyFeatures(k2=k2, c2=np.zeros_like(k2), s2=np.zeros_like(k2), k4=k2 * k2)
    out = ctf_from_chi(
        chi(feats, CTFParams(defocus, defocus, 0.0, phase_shift_deg), optics),
        ctf_constants(optics),
    )
    if bfactor:
        out = out * np.exp(-0.25 * bfactor * k2)
    return out
