"""Simulated micrographs with a known CTF, and their exact expected power spectrum.

Image formation (weak phase object, linear in the specimen, Poisson counting):

1. a white Gaussian phase object ``phi`` with per-pixel variance ``sigma^2``;
2. its contrast ``c = F^-1[2 CTF(M k) E(|M k|) Phi(k)]``: the CTF and the envelope are evaluated
   at the *true* frequency ``M k`` of each observed frequency ``k`` (anisotropic magnification);
3. with specimen tilt the defocus varies linearly over the image; the contrast is computed at a
   ladder of defocus levels and blended pixel by pixel (linear interpolation between the two
   nearest levels, which are close enough that the interpolation error is below 1 %);
4. a smooth, CTF-free background ``b`` (ice, inelastic scattering) of power
   ``S_bg(k) = background * exp(-|k|^2 / (2 kb^2))``;
5. Poisson counts with mean ``dose_px (1 + c + b)``;
6. a detector MTF applied to the counts (signal and noise alike).

The expected periodogram (``E|FFT|^2 / n_pixels``) of such an image is, for ``k != 0``,
``P(k) = MTF(k)^2 [dose_px + dose_px^2 (4 sigma^2 E^2 CTF^2 + S_bg(k))]``, given by
:func:`expected_power`; the benchmarks use it for Cramér–Rao bounds.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from anisoctf._lazy import lazy
from anisoctf.optics.ctf import (
    CTFParams,
    Optics,
    chi,
    frequency_features,
    frequency_grid,
)
from anisoctf.optics.kernel import ctf_constants, ctf_from_chi

__all__ = ["MicrographSpec", "SimulatedMicrograph", "expected_power", "simulate_micrograph"]

sfft = lazy("scipy.fft")  # imported on first use: estimating never needs it


@dataclass(frozen=True)
class MicrographSpec:
    """Everything that defines a simulated micrograph.

    Parameters
    ----------
    shape
        (ny, nx) in pixels.
    optics
        Pixel size, voltage, Cs, amplitude contrast and magnification matrix.
    ctf
        True-frame CTF parameters; ``ctf.bfactor`` is the envelope B-factor (Å²).
    dose
        Electrons per Å² (total exposure).
    snr
        Thon-ring signal to shot-noise power ratio at low frequency: ``dose_px * 4 sigma^2``.
    background
        Power of the CTF-free background at zero frequency, relative to ``dose_px^2``... expressed
        as a multiple of the shot-noise power: ``S_bg(0) * dose_px = background``.
    background_width
        Gaussian width (Å⁻¹) of the background's power.
    mtf_falloff
        Detector MTF: ``sinc(f) / (1 + (f / mtf_falloff)^2)`` with ``f`` in cycles per pixel;
        ``0`` for a perfect detector.
    tilt_angle_deg, tilt_axis_deg
        Specimen tilt: the defocus changes by ``tan(tilt) * distance`` from the tilt axis (a line
        through the image centre at ``tilt_axis_deg`` from +x towards +y); points on the side of
        +90° from the axis are more underfocused for a positive tilt.
    tilt_max_res
        Resolution (Å) down to which the tilted image is exact; the ladder of defocus levels
        interpolated between is spaced for it (None: the Nyquist corner, exact everywhere,
        slow for large tilted images).
    thickness
        Specimen thickness (Å): the phase object is spread uniformly over this depth of
        defocus (``thickness_slices`` independent slices), which damps the Thon rings by
        ``sinc(λ k² t)`` in the power spectrum; 0 for a thin specimen.
    thickness_slices
        Number of slices for a thick specimen (0: enough that neighbouring slices differ by
        less than 0.5 rad of phase at ``tilt_max_res`` or Nyquist).
    seed
        Random seed.
    """

    shape: tuple[int, int] = (2048, 2048)
    optics: Optics = field(default_factory=lambda: Optics(pixel_size=1.0))
    ctf: CTFParams = field(default_factory=lambda: CTFParams(15000.0, 14000.0, 30.0, 0.0, 60.0))
    dose: float = 40.0
    snr: float = 0.8
    background: float = 2.0
    background_width: float = 0.02
    mtf_falloff: float = 0.6
    tilt_angle_deg: float = 0.0
    tilt_axis_deg: float = 0.0
    tilt_max_res: float | None = None
    thickness: float = 0.0
    thickness_slices: int = 0
    seed: int = 0

    @property
    def dose_per_pixel(self) -> float:
        """Mean electron count per pixel."""
        return self.dose * self.optics.pixel_size**2

    @property
    def phase_variance(self) -> float:
        """Per-pixel variance of the phase object."""
        return self.snr / (4.0 * self.dose_per_pixel)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready truth record."""
        d = asdict(self)
        d["optics"]["mag_matrix"] = [list(r) for r in self.optics.mag_matrix]
        d["shape"] = list(self.shape)
        d["ctf"]["mean_defocus"] = self.ctf.mean_defocus
        d["ctf"]["astigmatism"] = self.ctf.astigmatism
        return d

    def to_json(self) -> str:
        """The truth as a JSON string."""
        return json.dumps(self.to_dict(), indent=2)


@dataclass(frozen=True)
class SimulatedMicrograph:
    """A simulated image (float32, (ny, nx)) and the spec that made it."""

    image: NDArray[np.float32]
    spec: MicrographSpec


def _mtf(kx: NDArray, ky: NDArray, pixel_size: float, falloff: float) -> NDArray:
    if falloff <= 0:
        return np.ones(np.broadcast_shapes(kx.shape, ky.shape))
    f = np.sqrt(kx * kx + ky * ky) * pixel_size  # cycles per pixel
    return np.sinc(f) / (1.0 + (f / falloff) ** 2)


def expected_power(spec: MicrographSpec, kx: NDArray, ky: NDArray) -> NDArray[np.float64]:
    """Expected periodogram ``E|FFT(image)|^2 / n_pixels`` at observed frequencies (Å⁻¹).

    Valid for an untilted micrograph away from zero frequency.
    """
    p = spec.optics
    feats = frequency_features(kx, ky, p.M if p.has_anisomag else None)
    ctf = ctf_from_chi(chi(feats, spec.ctf, p), ctf_constants(p))
    env2 = np.exp(-0.5 * spec.ctf.bfactor * feats.k2)
    d = spec.dose_per_pixel
    k2_obs = kx * kx + ky * ky
    bg = spec.background / d * np.exp(-0.5 * k2_obs / spec.background_width**2)
    mtf = _mtf(kx, ky, p.pixel_size, spec.mtf_falloff)
    return mtf**2 * (d + d * d * (4.0 * spec.phase_variance * env2 * ctf**2 + bg))


def _defocus_levels(spec: MicrographSpec) -> tuple[NDArray, NDArray]:
    """Per-pixel defocus offset map (Å) and the ladder of offsets to compute."""
    ny, nx = spec.shape
    apix = spec.optics.pixel_size
    t = np.deg2rad(spec.tilt_axis_deg)
    y = (np.arange(ny) - ny / 2.0)[:, None] * apix
    x = (np.arange(nx) - nx / 2.0)[None, :] * apix
    # signed distance from the tilt axis, positive on the +90° side
    dist = -x * np.sin(t) + y * np.cos(t)
    offset = np.tan(np.deg2rad(spec.tilt_angle_deg)) * dist
    lo, hi = float(offset.min()), float(offset.max())
    # step so the phase error of linear interpolation stays small at Nyquist
    lam = spec.optics.wavelength
    kmax2 = 0.5 / apix**2  # |k|^2 at the corner of the Nyquist square
    if spec.tilt_max_res:
        kmax2 = min(kmax2, 1.0 / spec.tilt_max_res**2)
    step = 0.5 / (np.pi * lam * kmax2)
    n = max(2, int(np.ceil((hi - lo) / step)) + 1)
    return offset, np.linspace(lo, hi, n)


def _thickness_slices(spec: MicrographSpec) -> NDArray[np.float64]:
    """Defocus offsets (Å) of the slices of a thick specimen (one slice at 0 when thin)."""
    t = float(spec.thickness)
    if t <= 0:
        return np.zeros(1)
    n = int(spec.thickness_slices)
    if n <= 0:
        kmax2 = 0.5 / spec.optics.pixel_size**2
        if spec.tilt_max_res:
            kmax2 = min(kmax2, 1.0 / spec.tilt_max_res**2)
        n = int(np.ceil(t * np.pi * spec.optics.wavelength * kmax2 / 0.5)) + 1
    return (np.arange(n) + 0.5) * t / n - 0.5 * t


def simulate_micrograph(spec: MicrographSpec) -> SimulatedMicrograph:
    """Simulate one micrograph (see the module docstring for the physics).

    Parameters
    ----------
    spec
        The micrograph's parameters and random seed.

    Returns
    -------
    SimulatedMicrograph
        float32 image of ``spec.shape`` and the spec.
    """
    rng = np.random.default_rng(spec.seed)
    ny, nx = spec.shape
    p = spec.optics
    kx, ky = frequency_grid(spec.shape, p.pixel_size, rfft=True)
    feats = frequency_features(kx, ky, p.M if p.has_anisomag else None)
    env = np.exp(-0.25 * spec.ctf.bfactor * feats.k2)
    consts = ctf_constants(p)

    slices = _thickness_slices(spec)
    phi_ks = []
    for _ in slices:  # independent phase objects at each depth, sharing the variance
        phi = rng.standard_normal(spec.shape, dtype=np.float64) * np.sqrt(
            spec.phase_variance / len(slices)
        )
        phi_ks.append(sfft.rfft2(phi, workers=-1) * (2.0 * env))

    def contrast_at(offset: float) -> NDArray:
        total = None
        for depth, phi_k in zip(slices, phi_ks, strict=True):
            params = CTFParams(
                spec.ctf.defocus_u + offset + depth,
                spec.ctf.defocus_v + offset + depth,
                spec.ctf.angle_deg,
                spec.ctf.phase_shift_deg,
            )
            ctf = ctf_from_chi(chi(feats, params, p), consts)
            total = phi_k * ctf if total is None else total + phi_k * ctf
        return sfft.irfft2(total, s=spec.shape, workers=-1)

    if spec.tilt_angle_deg == 0.0:
        contrast = contrast_at(0.0)
    else:
        offset, levels = _defocus_levels(spec)
        pos = np.clip((offset - levels[0]) / (levels[1] - levels[0]), 0, len(levels) - 1 - 1e-9)
        idx = pos.astype(int)
        frac = pos - idx
        contrast = np.zeros(spec.shape)
        for i, lev in enumerate(levels):
            below = idx == i  # this level is the lower neighbour
            above = idx == i - 1  # this level is the upper neighbour
            if not (below.any() or above.any()):
                continue
            c = contrast_at(float(lev))
            contrast[below] += c[below] * (1.0 - frac[below])
            contrast[above] += c[above] * frac[above]

    d = spec.dose_per_pixel
    if spec.background > 0:
        k2_obs = kx * kx + ky * ky
        bg_amp = np.sqrt(spec.background / d * np.exp(-0.5 * k2_obs / spec.background_width**2))
        bg = sfft.irfft2(
            sfft.rfft2(rng.standard_normal(spec.shape), workers=-1) * bg_amp,
            s=spec.shape,
            workers=-1,
        )
    else:
        bg = 0.0
    lam_counts = np.clip(d * (1.0 + contrast + bg), 0.0, None)
    counts = rng.poisson(lam_counts).astype(np.float64)
    if spec.mtf_falloff > 0:
        counts = sfft.irfft2(
            sfft.rfft2(counts, workers=-1) * _mtf(kx, ky, p.pixel_size, spec.mtf_falloff),
            s=spec.shape,
            workers=-1,
        )
    return SimulatedMicrograph(image=counts.astype(np.float32), spec=spec)
