"""Spectrum: averaged periodograms of micrographs, patches and particle stacks."""

from anisoctf.spectrum.periodogram import (
    Spectrum,
    stack_periodogram,
    taper_window,
    tile_periodogram,
    tile_starts,
)

__all__ = ["Spectrum", "stack_periodogram", "taper_window", "tile_periodogram", "tile_starts"]
