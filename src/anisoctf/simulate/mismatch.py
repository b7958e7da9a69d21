"""An independent "mismatch" micrograph simulator: effects the estimator's model does not assume.

The estimator models the averaged periodogram as ``B(|k|) + A(|k|) CTF²`` with smooth ``B`` and
``A``; our own simulator (:mod:`anisoctf.simulate.micrograph`) satisfies that almost exactly
(white specimen, Gaussian background, one MTF for signal and noise). This one departs from it
the way real data do (issue 13 item 11):

1. **a protein-like specimen spectrum**: the phase object is not white but has power
   ``S(k) = (1 + low exp(-k² / (2 k_low²))) (1 + bump exp(-(k - k_b)² / (2 w_b²)))`` with the
   bump at ``k_b = 1 / 10 Å⁻¹`` (the secondary-structure peak of protein in ice, e.g. the
   ~10 Å maximum of solvent-flattened protein power spectra; Rosenthal & Henderson 2003,
   J Mol Biol 333:721, Fig. 1);
2. **a smooth unmodulated background** (inelastic scattering, ice) with a Lorentzian-like,
   heavy-tailed radial power ``bg(k) = background / (1 + (k / k_c)²)^1.5``, which reaches well
   into the fitted band (our own simulator's is a narrow Gaussian);
3. **Poisson shot noise** at a realistic dose (counts ``~ Poisson(d (1 + c + b))``);
4. **a counting detector**: the signal is transferred by the measured MTF of a Gatan K2 Summit
   at 200 kV (RELION tutorial ``mtf_k2_200kV.star``, 200 points on 0–0.5 cycles/px; Scheres
   lab, RELION 3 tutorial data), embedded here as the analytic model
   ``MTF(f) = a exp(-f / f1) + (1 - a) exp(-(f / f2)²)`` with ``a = 0.2727``, ``f1 = 0.3796``,
   ``f2 = 0.3203`` (least-squares fit to that curve, largest deviation 0.014), while the shot
   noise is transferred by a different noise transfer function (counting noise is whiter than
   the signal: ``NTF(f)² = n0 + (1 - n0) sinc²(f)``, ``n0 = 0.6``), so signal and noise do not
   share one detector filter;
5. voltages 200 and 300 kV (through :class:`~anisoctf.optics.ctf.Optics`).

:func:`mismatch_power` gives the exact expected periodogram, so Cramér–Rao bounds
(:func:`anisoctf.simulate.bounds.crlb` with ``power=mismatch_power``) are those of this model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from anisoctf._lazy import lazy
from anisoctf.optics.ctf import CTFParams, Optics, chi, frequency_features, frequency_grid
from anisoctf.optics.kernel import ctf_constants, ctf_from_chi

__all__ = [
    "K2_MTF_PARAMS",
    "MismatchSpec",
    "k2_mtf",
    "mismatch_power",
    "noise_transfer",
    "protein_spectrum",
    "simulate_mismatch",
]

sfft = lazy("scipy.fft")

#: (a, f1, f2) of ``a exp(-f/f1) + (1-a) exp(-(f/f2)^2)`` fitted to RELION's mtf_k2_200kV.star
K2_MTF_PARAMS = (0.27274969, 0.37963456, 0.32028125)


def k2_mtf(f: NDArray) -> NDArray[np.float64]:
    """K2 Summit MTF (200 kV) at ``f`` cycles per pixel (analytic fit, see the module doc)."""
    a, f1, f2 = K2_MTF_PARAMS
    f = np.abs(np.asarray(f, dtype=np.float64))
    return a * np.exp(-f / f1) + (1.0 - a) * np.exp(-((f / f2) ** 2))


def noise_transfer(f: NDArray, white: float = 0.6) -> NDArray[np.float64]:
    """Noise transfer ``sqrt(white + (1 - white) sinc²(f))`` at ``f`` cycles per pixel."""
    f = np.asarray(f, dtype=np.float64)
    return np.sqrt(white + (1.0 - white) * np.sinc(f) ** 2)


@dataclass(frozen=True)
class MismatchSpec:
    """Everything that defines one mismatch micrograph.

    Parameters
    ----------
    shape, optics, ctf
        As :class:`~anisoctf.simulate.micrograph.MicrographSpec` (``ctf.bfactor``: envelope).
    dose
        Electrons per Å².
    snr
        Thon-ring signal to shot-noise power at low frequency, for a flat specimen spectrum.
    background, background_kc
        Background power at zero frequency (in units of the shot noise) and its corner (Å⁻¹).
    bump, bump_res, bump_width
        Height, position (Å) and width (Å⁻¹) of the specimen spectrum's bump.
    low, low_width
        Extra low-frequency specimen power and its Gaussian width (Å⁻¹).
    noise_white
        ``n0`` of :func:`noise_transfer`.
    seed
        Random seed.
    """

    shape: tuple[int, int] = (2048, 2048)
    optics: Optics = field(default_factory=lambda: Optics(pixel_size=1.0))
    ctf: CTFParams = field(default_factory=lambda: CTFParams(15000.0, 14000.0, 30.0, 0.0, 60.0))
    dose: float = 40.0
    snr: float = 0.8
    background: float = 1.5
    background_kc: float = 0.04
    bump: float = 1.0
    bump_res: float = 10.0
    bump_width: float = 0.02
    low: float = 1.0
    low_width: float = 0.03
    noise_white: float = 0.6
    seed: int = 0

    @property
    def dose_per_pixel(self) -> float:
        """Mean electron count per pixel."""
        return self.dose * self.optics.pixel_size**2

    @property
    def phase_variance(self) -> float:
        """Per-pixel variance of a white phase object of the same low-frequency SNR."""
        return self.snr / (4.0 * self.dose_per_pixel)


def protein_spectrum(spec: MismatchSpec, k: NDArray) -> NDArray[np.float64]:
    """Relative specimen power ``S(k)`` at true radial frequency ``k`` (Å⁻¹)."""
    k = np.asarray(k, dtype=np.float64)
    kb = 1.0 / spec.bump_res
    low = 1.0 + spec.low * np.exp(-0.5 * (k / spec.low_width) ** 2)
    return low * (1.0 + spec.bump * np.exp(-0.5 * ((k - kb) / spec.bump_width) ** 2))


def _background(spec: MismatchSpec, k: NDArray) -> NDArray[np.float64]:
    """Background power relative to ``dose_px²`` (so ``d² bg = background · d`` at k = 0)."""
    return spec.background / spec.dose_per_pixel / (1.0 + (k / spec.background_kc) ** 2) ** 1.5


def _terms(spec: MismatchSpec, kx: NDArray, ky: NDArray):
    p = spec.optics
    feats = frequency_features(kx, ky, p.M if p.has_anisomag else None)
    ctf = ctf_from_chi(chi(feats, spec.ctf, p), ctf_constants(p))
    k_true = np.sqrt(feats.k2)
    amp2 = np.exp(-0.5 * spec.ctf.bfactor * feats.k2) * protein_spectrum(spec, k_true)
    k_obs = np.hypot(kx, ky)
    f = k_obs * p.pixel_size
    return ctf, amp2, _background(spec, k_obs), k2_mtf(f), noise_transfer(f, spec.noise_white)


def mismatch_power(spec: MismatchSpec, kx: NDArray, ky: NDArray) -> NDArray[np.float64]:
    """Expected periodogram ``E|FFT(image)|² / n_pixels`` at observed frequencies (Å⁻¹), k ≠ 0:
    ``NTF² d + MTF² d² (4 σ² S E² CTF² + bg)``."""
    ctf, amp2, bg, mtf, ntf = _terms(spec, kx, ky)
    d = spec.dose_per_pixel
    return ntf**2 * d + mtf**2 * d * d * (4.0 * spec.phase_variance * amp2 * ctf**2 + bg)


def simulate_mismatch(spec: MismatchSpec) -> NDArray[np.float32]:
    """Simulate one mismatch micrograph (float32, ``spec.shape``); see the module docstring."""
    rng = np.random.default_rng(spec.seed)
    kx, ky = frequency_grid(spec.shape, spec.optics.pixel_size, rfft=True)
    ctf, amp2, bg, mtf, ntf = _terms(spec, kx, ky)
    d = spec.dose_per_pixel

    def filtered(white_scale: float, amp: NDArray) -> NDArray:
        w = rng.standard_normal(spec.shape) * white_scale
        return sfft.irfft2(sfft.rfft2(w, workers=-1) * amp, s=spec.shape, workers=-1)

    contrast = filtered(np.sqrt(spec.phase_variance), 2.0 * np.sqrt(amp2) * ctf)
    back = filtered(1.0, np.sqrt(bg))
    mean = np.clip(d * (1.0 + contrast + back), 0.0, None)
    noise = rng.poisson(mean) - mean
    image = sfft.irfft2(
        sfft.rfft2(mean, workers=-1) * mtf + sfft.rfft2(noise, workers=-1) * ntf,
        s=spec.shape,
        workers=-1,
    )
    return image.astype(np.float32)
