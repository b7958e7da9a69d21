"""Optics: the CTF model (with the magnification matrix) and electron wavelength.

The CTF formulas are written once, in :mod:`anisoctf.optics.kernel`.
"""

from anisoctf.optics.ctf import (
    CTFParams,
    FrequencyFeatures,
    Optics,
    chi,
    ctf_1d,
    ctf_2d,
    defocus_matrix,
    electron_wavelength,
    frequency_features,
    frequency_grid,
    params_from_astig,
)
from anisoctf.optics.kernel import (
    CTF_SIGN,
    NO_ABERRATIONS,
    AberrationTerms,
    CTFConstants,
    ctf_constants,
)

__all__ = [
    "CTF_SIGN",
    "NO_ABERRATIONS",
    "AberrationTerms",
    "CTFConstants",
    "CTFParams",
    "FrequencyFeatures",
    "Optics",
    "chi",
    "ctf_1d",
    "ctf_constants",
    "ctf_2d",
    "defocus_matrix",
    "electron_wavelength",
    "frequency_features",
    "frequency_grid",
    "params_from_astig",
]
