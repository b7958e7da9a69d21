"""Gctf results: the per-micrograph log (``<stem>_gctf.log``) and the STAR table it writes.

Gctf (K. Zhang) prints its final answer into the log as a header line of column names followed
by a line of values that ends with ``Final Values``::

       Defocus_U   Defocus_V       Angle         CCC
        21395.27    20943.89       73.60    0.086544  Final Values

(with a phase-plate fit a ``Phase_shift`` column, in degrees, comes before ``CCC``), and the
resolution limit of its equiphase average as ``RES_LIMIT <Å>`` (e.g. ``Resolution limit
estimated by EPA: RES_LIMIT 3.567``). The columns are found by name, so their order and
spacing do not matter; when several ``Final Values`` lines are present (e.g. after local
refinement) the last one is taken.

Gctf's STAR table (``micrographs_all_gctf.star``, RELION 3.0 layout) carries the usual
``_rlnDefocusU/V/Angle`` columns and its resolution as ``_rlnFinalResolution``;
:func:`read_gctf_star` reads it into :class:`~anisoctf.io.star.MicrographCTFRow` records with
that resolution as ``max_resolution``. Conventions are RELION's (defocus in Å, underfocus
positive, angle in degrees), as Gctf uses them.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from anisoctf.errors import InputError
from anisoctf.io import labels as L
from anisoctf.io.star import MicrographCTFRow, read_micrographs_ctf_star
from anisoctf.io.star_tables import find_block, numbers, read_star_blocks
from anisoctf.optics.ctf import Optics

__all__ = ["GctfResult", "read_gctf_log", "read_gctf_star"]

_RES_LIMIT = re.compile(r"RES_LIMIT\s+([-+0-9.eE]+)")
_MAX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class GctfResult:
    """The final values of one Gctf log.

    Parameters
    ----------
    defocus_u, defocus_v
        Defocus (Å, underfocus positive).
    angle
        Astigmatism angle (degrees).
    cross_correlation
        Gctf's CCC.
    resolution
        ``RES_LIMIT`` in Å (NaN when the log has none).
    phase_shift
        Phase shift in degrees, or None without a phase-plate fit.
    """

    defocus_u: float
    defocus_v: float
    angle: float
    cross_correlation: float
    resolution: float = math.nan
    phase_shift: float | None = None


def _text(p: Path, what: str) -> str:
    if not p.is_file():
        kind = "is a directory" if p.is_dir() else "file not found"
        raise InputError(f"{kind}, not a {what}; check the path", path=p)
    try:
        if p.stat().st_size > _MAX_BYTES:
            raise InputError(f"too large for a {what}; check the path", path=p)
        return p.read_bytes().decode("utf-8", errors="replace")
    except OSError as exc:
        raise InputError(f"cannot read file ({exc.strerror or exc}); check permissions", p) from exc


def read_gctf_log(path: str | os.PathLike[str]) -> GctfResult:
    """Read the final values of a Gctf log (``<stem>_gctf.log``).

    Raises
    ------
    InputError
        Missing or unreadable file, no ``Final Values`` line, no header naming its columns,
        or values that are not finite numbers.
    """
    p = Path(path)
    lines = _text(p, "Gctf log").splitlines()
    found: tuple[list[str], list[str], int] | None = None
    header: list[str] | None = None
    for lineno, line in enumerate(lines, start=1):
        words = line.split()
        if "Defocus_U" in words and "Defocus_V" in words:
            header = words
        elif line.rstrip().endswith("Final Values") and header is not None:
            found = (header, words[:-2], lineno)
    if found is None:
        raise InputError(
            "no 'Final Values' line after a 'Defocus_U Defocus_V ...' header; Gctf did not "
            "finish or this is not a Gctf log — re-run Gctf",
            path=p,
        )
    names, values, lineno = found
    if len(values) != len(names):
        raise InputError(
            f"line {lineno} has {len(values)} values for {len(names)} columns "
            f"({' '.join(names)}); the log is corrupt — re-run Gctf",
            path=p,
        )
    try:
        numbers = {n.lower(): float(v) for n, v in zip(names, values, strict=True)}
    except ValueError:
        raise InputError(
            f"line {lineno} holds text where numbers belong; the log is corrupt — re-run Gctf",
            path=p,
        ) from None
    if not all(math.isfinite(v) for v in numbers.values()):
        raise InputError(f"line {lineno} holds NaN/Inf; the Gctf fit failed", path=p)
    need = ("defocus_u", "defocus_v", "angle")
    missing = [n for n in need if n not in numbers]
    if missing:
        raise InputError(f"the final values have no {', '.join(missing)} column", path=p)
    ccc = numbers.get("ccc", math.nan)
    phase = next((v for k, v in numbers.items() if k.startswith("phase")), None)
    res = math.nan
    for line in lines:
        m = _RES_LIMIT.search(line)
        if m:
            try:
                res = float(m.group(1))
            except ValueError:
                res = math.nan
    return GctfResult(
        defocus_u=numbers["defocus_u"],
        defocus_v=numbers["defocus_v"],
        angle=numbers["angle"],
        cross_correlation=ccc,
        resolution=res if math.isfinite(res) else math.nan,
        phase_shift=phase,
    )


def read_gctf_star(
    path: str | os.PathLike[str],
) -> tuple[list[MicrographCTFRow], dict[int, Optics]]:
    """Read Gctf's STAR table (``micrographs_all_gctf.star``) or any CTF STAR table.

    ``_rlnFinalResolution`` (Gctf's resolution) fills ``max_resolution`` when the table has no
    ``_rlnCtfMaxResolution``.

    Raises
    ------
    InputError
        As :func:`~anisoctf.io.star.read_micrographs_ctf_star`.
    """
    rows, optics = read_micrographs_ctf_star(path)
    if rows and all(math.isnan(r.max_resolution) for r in rows):
        blocks = read_star_blocks(path)
        for key in find_block(blocks, L.FINAL_RESOLUTION):
            df = blocks[key]
            if L.MICROGRAPH_NAME not in df.columns or len(df) != len(rows):
                continue
            res = numbers(df[L.FINAL_RESOLUTION])
            rows = [replace(r, max_resolution=float(x)) for r, x in zip(rows, res, strict=True)]
            break
    return rows, optics
