"""The local-defocus step of ``anisoctf estimate --patches/--tilt/--thickness``.

Runs after a micrograph's global fit succeeded: fits the local defocus and writes
``<stem>_surface.json`` and ``<stem>_defocus.png``. A failure here never fails the micrograph:
the global estimate stands and the reason becomes a warning. When the plane's tilt blurs the
whole-image rings, the global CTF is refitted on the tilt-corrected spectrum
(:func:`anisoctf.local.corrected.refit_tilt_corrected`, as CTFFIND 5 does): ``refit`` is then
the micrograph's reported estimate (the defocus, astigmatism and fit resolution of its centre).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from numpy.typing import NDArray

from anisoctf.errors import AnisoctfError
from anisoctf.fit.result import CTFEstimate, FitSettings
from anisoctf.io.surface import write_surface_json
from anisoctf.local.corrected import refit_tilt_corrected, with_global
from anisoctf.local.estimate import LocalEstimate, LocalSettings, estimate_local
from anisoctf.optics.ctf import Optics
from anisoctf.report.defocus_map import render_defocus_map

__all__ = ["LocalOutcome", "run_local_step"]


@dataclass(frozen=True)
class LocalOutcome:
    """What the local step produced (``estimate`` is None when it failed; ``refit`` is the
    global CTF fitted on the tilt-corrected spectrum, None when not needed or not found)."""

    estimate: LocalEstimate | None
    surface_path: str
    outputs: tuple[str, ...]
    warnings: tuple[str, ...]
    refit: CTFEstimate | None = None


def run_local_step(
    image: NDArray,
    optics: Optics,
    glob: CTFEstimate,
    settings: FitSettings,
    local: LocalSettings,
    out_dir: Path,
    stem: str,
    name: str,
    fft_workers: int = 1,
) -> LocalOutcome:
    """Fit the local defocus of one micrograph and write its surface file and picture."""
    try:
        loc = estimate_local(image, optics, glob, settings, local, workers=fft_workers, name=name)
    except AnisoctfError as exc:
        return LocalOutcome(None, "", (), (f"local defocus skipped: {exc}",))
    refit = refit_tilt_corrected(image, optics, glob, loc, settings, fft_workers, name)
    if refit is not None:  # the surface shares the refitted astigmatism
        loc = with_global(loc, refit)
    surf = out_dir / f"{stem}_surface.json"
    png = out_dir / f"{stem}_defocus.png"
    write_surface_json(surf, loc, name, optics.pixel_size)
    render_defocus_map(loc, png, title=name, pixel_size=optics.pixel_size)
    return LocalOutcome(loc, surf.as_posix(), (str(surf), str(png)), tuple(loc.warnings), refit)
