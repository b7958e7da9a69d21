"""Reports: the per-micrograph diagnostic picture (:mod:`anisoctf.report.diagnostic`) and the
HTML page of a whole batch (:mod:`anisoctf.report.html`, imported on use: it is heavier)."""

from anisoctf.report.diagnostic import render_diagnostic

__all__ = ["render_diagnostic"]
