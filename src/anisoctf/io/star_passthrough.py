"""The columns of an input micrographs STAR that ``micrographs_ctf.star`` carries through.

RELION's CTF job (``ctffind_runner``) copies every column of its input
``corrected_micrographs.star`` (``_rlnMicrographMetadata``, ``_rlnAccumMotionTotal/Early/
Late``, ``_rlnMicrographNameNoDW``, ``_rlnCtfPowerSpectrum``; ``_rlnMtfFileName`` and any other
optics column) into its output and adds the CTF columns; Bayesian polishing and other downstream
jobs read them there. :func:`read_passthrough` collects those columns with their values as
text; :func:`anisoctf.io.star.write_micrographs_ctf_star` writes them back.

CTF results already in the input (``_rlnDefocusU``, ``_rlnCtf*`` other than
``_rlnCtfPowerSpectrum``, ``_rlnPhaseShift``, anisoctf's tilt/thickness/surface labels) are not
carried through: the new fit replaces them. Nor are a RELION 3.0 table's per-row optics
(voltage, Cs, amplitude contrast, pixel sizes, magnification): they are written, with any
command-line override, into the ``data_optics`` table.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from anisoctf.io import labels as L
from anisoctf.io.star_tables import find_table, fmt_float, int_column, read_star_file

__all__ = ["StarPassthrough", "read_passthrough"]

#: micrograph columns the CTF writer owns (the new fit replaces them)
_OWN_MICROGRAPH = frozenset(
    {
        L.MICROGRAPH_NAME,
        L.OPTICS_GROUP,
        L.DEFOCUS_U,
        L.DEFOCUS_V,
        L.DEFOCUS_ANGLE,
        L.PHASE_SHIFT,
        L.TILT_ANGLE,
        L.TILT_AXIS_ANGLE,
        L.DEFOCUS_SURFACE,
        # RELION 3.0 per-row optics: they go into the data_optics written
        L.OPTICS_GROUP_NAME,
        L.VOLTAGE,
        L.SPHERICAL_ABERRATION,
        L.AMPLITUDE_CONTRAST,
        L.MICROGRAPH_PIXEL_SIZE,
        L.MICROGRAPH_ORIGINAL_PIXEL_SIZE,
        L.IMAGE_PIXEL_SIZE,
        L.DETECTOR_PIXEL_SIZE,
        L.MAGNIFICATION,
        *L.MAGMAT,
    }
)
#: optics columns the CTF writer owns (``_rlnMicrographOriginalPixelSize`` is carried through)
_OWN_OPTICS = frozenset(
    {
        L.OPTICS_GROUP_NAME,
        L.OPTICS_GROUP,
        L.VOLTAGE,
        L.SPHERICAL_ABERRATION,
        L.AMPLITUDE_CONTRAST,
        L.MICROGRAPH_PIXEL_SIZE,
        *L.MAGMAT,
    }
)


@dataclass(frozen=True)
class StarPassthrough:
    """Input columns to write back, with their values as STAR text.

    Attributes
    ----------
    micrograph_columns
        ``data_micrographs`` labels (no leading underscore), in input order.
    micrograph_values
        The cells of those columns by ``_rlnMicrographName``.
    optics_columns
        ``data_optics`` labels, in input order.
    optics_values
        The cells of those columns by optics group number.
    """

    micrograph_columns: tuple[str, ...] = ()
    micrograph_values: dict[str, tuple[str, ...]] = field(default_factory=dict)
    optics_columns: tuple[str, ...] = ()
    optics_values: dict[int, tuple[str, ...]] = field(default_factory=dict)


def _own_micrograph(label: str) -> bool:
    ctf_result = label.startswith("rlnCtf") and label != L.CTF_POWER_SPECTRUM
    return label in _OWN_MICROGRAPH or ctf_result or label.startswith("rlnDefocus")


def _cell(value: object) -> str:
    """A parsed STAR value as text that reads back as the same value."""
    if isinstance(value, str):
        return value if value and not any(c.isspace() for c in value) else f'"{value}"'
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int) or (hasattr(value, "dtype") and "int" in str(value.dtype)):
        return str(int(value))  # type: ignore[call-overload]
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(value)
    return "nan" if math.isnan(v) else fmt_float(v)


def read_passthrough(path: str | os.PathLike[str]) -> StarPassthrough:
    """The columns of a micrographs STAR file that its CTF table keeps (see the module notes).

    Parameters
    ----------
    path
        RELION 3.0 or 3.1+ micrographs STAR file (``_rlnMicrographName`` column).

    Raises
    ------
    InputError
        Unreadable file or no ``_rlnMicrographName`` column.
    """
    p, blocks = read_star_file(path)
    key, df = find_table(p, blocks, [L.MICROGRAPH_NAME], "give a micrographs STAR file")
    m_cols = tuple(str(c) for c in df.columns if not _own_micrograph(str(c)))
    m_vals: dict[str, tuple[str, ...]] = {}
    if m_cols:
        for name, *cells in df[[L.MICROGRAPH_NAME, *m_cols]].itertuples(index=False):
            m_vals.setdefault(str(name), tuple(_cell(c) for c in cells))
    o_cols: tuple[str, ...] = ()
    o_vals: dict[int, tuple[str, ...]] = {}
    optics = blocks.get("optics")
    if optics is not None and L.OPTICS_GROUP in optics.columns and key != "optics":
        o_cols = tuple(str(c) for c in optics.columns if str(c) not in _OWN_OPTICS)
        groups = int_column(p, optics, L.OPTICS_GROUP, "optics").tolist()
        for g, (_, row) in zip(groups, optics.iterrows(), strict=True):
            o_vals[int(g)] = tuple(_cell(row[c]) for c in o_cols)
    return StarPassthrough(m_cols, m_vals, o_cols, o_vals)
