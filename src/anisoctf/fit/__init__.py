"""Fit: coarse search and maximum-likelihood refinement of the CTF against a spectrum."""

from anisoctf.fit.estimate import estimate_ctf, fit_spectrum
from anisoctf.fit.result import CTFEstimate, FitDiagnostics, FitSettings

__all__ = ["CTFEstimate", "FitDiagnostics", "FitSettings", "estimate_ctf", "fit_spectrum"]
