"""anisoctf: CTF estimation for cryo-EM that takes anisotropic magnification into account.

The package reads like the pipeline: :mod:`anisoctf.io` (files) → :mod:`anisoctf.spectrum`
(averaged periodograms) → :mod:`anisoctf.fit` (search and maximum-likelihood refinement) →
:mod:`anisoctf.magnification` → :mod:`anisoctf.report` → :mod:`anisoctf.cli`. The CTF model,
with the magnification matrix built in, lives in :mod:`anisoctf.optics`.
"""

from anisoctf.errors import AnisoctfError, FitError, InputError
from anisoctf.fit.estimate import estimate_ctf, fit_spectrum
from anisoctf.fit.result import CTFEstimate, FitDiagnostics, FitSettings
from anisoctf.optics.ctf import CTFParams, Optics, ctf_2d, electron_wavelength
from anisoctf.simulate.micrograph import MicrographSpec, simulate_micrograph
from anisoctf.version import __version__

__all__ = [
    "AnisoctfError",
    "CTFEstimate",
    "CTFParams",
    "FitDiagnostics",
    "FitError",
    "FitSettings",
    "InputError",
    "MicrographSpec",
    "Optics",
    "__version__",
    "ctf_2d",
    "electron_wavelength",
    "estimate_ctf",
    "fit_spectrum",
    "simulate_micrograph",
]
