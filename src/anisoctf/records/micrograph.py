"""The CTF result of one micrograph, as every table format stores it.

:class:`MicrographCTFRow` is what the estimate job produces and what the readers of RELION
(:mod:`anisoctf.io.star`), Gctf (:mod:`anisoctf.io.gctf`) and cryoSPARC
(:mod:`anisoctf.io.cryosparc_ctf`) tables return. The converters to each layout live in
:mod:`anisoctf.io` beside the formats: :func:`anisoctf.io.star.relion_micrograph_row`
(a ``micrographs_ctf.star`` row), :func:`anisoctf.io.cryosparc_ctf.ctf_results_array`
(cryoSPARC exposure rows) and :func:`anisoctf.io.ctffind.ctffind_line` (a CTFFIND line).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MicrographCTFRow"]


@dataclass(frozen=True)
class MicrographCTFRow:
    """CTF result for one micrograph, as in RELION's ``micrographs_ctf.star``.

    Parameters
    ----------
    name
        ``_rlnMicrographName``.
    optics_group
        ``_rlnOpticsGroup``.
    ctf_image
        ``_rlnCtfImage`` (diagnostic power spectrum, e.g. ``x_PS.ctf:mrc``); "" when absent.
    defocus_u, defocus_v
        Defocus along the major and minor axes in Å, underfocus positive.
    defocus_angle
        Angle of the U axis in degrees.
    figure_of_merit
        ``_rlnCtfFigureOfMerit`` (NaN when the file has none).
    max_resolution
        ``_rlnCtfMaxResolution`` in Å (NaN when the file has none).
    phase_shift
        ``_rlnPhaseShift`` in degrees, or None when not estimated.
    tilt_angle, tilt_axis
        Specimen tilt and tilt axis angle in degrees (``_anisoctfTiltAngle``,
        ``_anisoctfTiltAxisAngle``; conventions in :mod:`anisoctf.local.tilt`), or None.
    thickness
        Sample thickness in Å (``_rlnCtfIceThickness``, RELION 5's label), or None.
    surface
        Path of the micrograph's defocus-surface JSON (``_anisoctfDefocusSurface``), or "".
    """

    name: str
    optics_group: int
    ctf_image: str
    defocus_u: float
    defocus_v: float
    defocus_angle: float
    figure_of_merit: float
    max_resolution: float
    phase_shift: float | None = None
    tilt_angle: float | None = None
    tilt_axis: float | None = None
    thickness: float | None = None
    surface: str = ""

    @property
    def astigmatism(self) -> float:
        """``_rlnCtfAstigmatism`` = U − V in Å."""
        return self.defocus_u - self.defocus_v

