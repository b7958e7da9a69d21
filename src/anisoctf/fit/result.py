"""Typed settings and results of a CTF fit (shared by micrographs, patches and particle pools)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from anisoctf.optics.ctf import CTFParams, Optics

__all__ = ["CTFEstimate", "FitDiagnostics", "FitSettings"]


@dataclass(frozen=True)
class FitSettings:
    """What to search and how.

    Parameters
    ----------
    box
        Size (pixels) of the spectrum the coarse search runs on (the full-resolution spectrum is
        binned down to about this size), and of the regions scored for outliers.
    min_res, max_res
        Resolution band (Å) used by the fit.
    df_min, df_max
        Range of mean defocus (Å) searched.
    max_astig
        Largest astigmatism |U − V| (Å) the coarse search considers.
    phase_plate
        Also fit an additional phase shift (Volta phase plate).
    astig_restraint
        If given, a Gaussian restraint of this width (Å) on |U − V| (CTFFIND's "expected
        astigmatism"); None for no restraint.
    fit_pixel_size
        Fourier-crop the micrograph to this pixel size (Å) before fitting; None keeps the
        pixel size of the image.
    """

    box: int = 512
    min_res: float = 30.0
    max_res: float = 3.0
    df_min: float = 3000.0
    df_max: float = 50000.0
    max_astig: float = 3000.0
    phase_plate: bool = False
    astig_restraint: float | None = None
    fit_pixel_size: float | None = None

    def __post_init__(self) -> None:
        if self.box < 64 or self.box % 2:
            raise ValueError(f"box must be an even number of pixels ≥ 64, got {self.box}")
        if not self.min_res > self.max_res > 0:
            raise ValueError(
                f"need min-res > max-res > 0 (Å), got min-res {self.min_res}, "
                f"max-res {self.max_res}"
            )
        if not 0 < self.df_min < self.df_max:
            raise ValueError(
                f"need 0 < df-min < df-max (Å), got df-min {self.df_min}, df-max {self.df_max}"
            )
        if self.max_astig < 0:
            raise ValueError(f"max astigmatism must be ≥ 0 Å, got {self.max_astig}")


@dataclass(frozen=True)
class FitDiagnostics:
    """Arrays a person (or a plot) needs to judge a fit.

    All 2D arrays are on the fitted spectrum's half-plane grid (``box × (box // 2 + 1)``,
    FFT order, zero frequency at index [0, 0]).

    Attributes
    ----------
    pixel_size
        Pixel size (Å) at which the spectrum was computed: the 2D arrays span frequencies up
        to its Nyquist, ``1 / (2 * pixel_size)``, whatever their size.
    spectrum
        Background-subtracted, locally normalised observed spectrum.
    model
        Fitted CTF² (envelope free) on the same grid.
    k
        Radial frequency (Å⁻¹) of the 1D profiles (equiphase average, EPA: position along
        lines of equal fitted CTF phase, expressed as the equivalent isotropic frequency).
    profile, profile_fit
        Observed and fitted 1D profiles (same normalisation as ``spectrum``/``model``).
    quality
        Local agreement (correlation) between observed and fitted profile against ``k``.
    fit_band
        (k_min, k_max) Å⁻¹ of the fitted band.
    """

    pixel_size: float
    spectrum: NDArray[np.float32]
    model: NDArray[np.float32]
    k: NDArray[np.float64]
    profile: NDArray[np.float64]
    profile_fit: NDArray[np.float64]
    quality: NDArray[np.float64]
    fit_band: tuple[float, float]


@dataclass(frozen=True)
class CTFEstimate:
    """The result of a CTF fit.

    Attributes
    ----------
    params
        CTF parameters in the true frame (U ≥ V, angle in [0, 180)).
    optics
        Optics used for the fit (its ``mag_matrix`` defines the true frame).
    figure_of_merit
        Normalised correlation between observed and fitted spectrum in the fit band (0–1).
    fit_resolution
        Resolution (Å) to which the observed rings still agree significantly with the fit.
    n_tiles
        Effective number of periodograms pooled into the spectrum: 1 for a micrograph's
        full-resolution periodogram, the number of tiles or particles for pooled spectra.
    diagnostics
        Arrays for plots; None if not requested.
    warnings
        Human-readable remarks (e.g. "estimate at the edge of the defocus range").
    """

    params: CTFParams
    optics: Optics
    figure_of_merit: float
    fit_resolution: float
    n_tiles: float = 0.0
    diagnostics: FitDiagnostics | None = field(default=None, repr=False)
    warnings: tuple[str, ...] = ()
