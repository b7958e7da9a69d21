"""Optics: the CTF model (with the magnification matrix) and electron wavelength."""

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
