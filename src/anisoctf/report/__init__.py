"""Reports: the per-micrograph diagnostic picture."""

from anisoctf.report.diagnostic import render_diagnostic

__all__ = ["render_diagnostic"]
