"""``anisoctf assign``: per-particle defocus from each micrograph's defocus surface.

Every particle of a RELION particles STAR file gets the defocus of its micrograph's surface at
its ``rlnCoordinateX/Y`` (micrograph pixels, x = column, y = row) plus the micrograph's shared
astigmatism: ``U = D(x, y) + (U−V)/2``, ``V = D(x, y) − (U−V)/2``, angle = the micrograph's.
Micrographs are matched by ``rlnMicrographName`` (exactly, else by file name when that is
unique). A micrograph estimated without ``--patches`` has no surface: its particles get its
global defocus. Particles whose micrograph has no estimate keep their values (or get 0 when the
file had no defocus columns) and are reported. Only the defocus columns change; the rest of
the file is copied byte for byte, and the output is written atomically.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from anisoctf.errors import InputError
from anisoctf.io import labels as L
from anisoctf.io.star import MicrographCTFRow, read_micrographs_ctf_star
from anisoctf.io.star_patch import (
    BlockEdit,
    block_index,
    fmt_angle,
    fmt_defocus,
    star_layout,
    write_patched_star,
)
from anisoctf.io.star_tables import find_block, find_table, read_star_blocks, strict_numbers
from anisoctf.io.surface import SurfaceRecord, read_surface_json

__all__ = ["AssignSummary", "run_assign"]

_NEEDED = (L.MICROGRAPH_NAME, L.COORDINATE_X, L.COORDINATE_Y)
STAR_NAME = "micrographs_ctf.star"


@dataclass(frozen=True)
class AssignSummary:
    """What :func:`run_assign` did."""

    n_particles: int
    n_from_surface: int
    n_from_global: int
    missing_micrographs: tuple[str, ...] = ()
    n_missing: int = 0
    notes: tuple[str, ...] = field(default_factory=tuple)


def _find_particles(path: Path, blocks: dict) -> str:
    if not find_block(blocks, L.COORDINATE_X, ("particles", "")):
        raise InputError(
            "no _rlnCoordinateX column in any data block; give a particles STAR file with "
            "_rlnMicrographName and _rlnCoordinateX/Y",
            path=path,
        )
    hint = "assign needs each particle's micrograph name and coordinates"
    key, _ = find_table(
        path, blocks, _NEEDED, hint, prefer=("particles", ""), key_column=L.COORDINATE_X
    )
    return key


def _surface_path(raw: str, ctf_dir: Path) -> Path | None:
    if not raw:
        return None
    p = Path(raw)
    for cand in (p, ctf_dir / p, ctf_dir / p.name):
        if cand.is_file():
            return cand
    return None


def _load_ctf(ctf_dir: Path) -> tuple[dict[str, MicrographCTFRow], dict[str, SurfaceRecord]]:
    star = ctf_dir / STAR_NAME if ctf_dir.is_dir() else ctf_dir
    if not star.exists():
        raise InputError(
            f"no {STAR_NAME} here; give the output folder of `anisoctf estimate`", path=ctf_dir
        )
    rows, _ = read_micrographs_ctf_star(star)
    base = star.parent
    by_name = {r.name: r for r in rows}
    surfaces: dict[str, SurfaceRecord] = {}
    for r in rows:
        sp = _surface_path(r.surface, base)
        if r.surface and sp is None:
            raise InputError(
                f"the surface file {r.surface!r} of {r.name} is missing; re-run the estimate "
                "with --patches",
                path=star,
            )
        if sp is not None:
            surfaces[r.name] = read_surface_json(sp)
    return by_name, surfaces


def _match(names: list[str], known: dict[str, MicrographCTFRow]) -> dict[str, str]:
    """Particle micrograph name → CTF row name (exact, else unique file-name match)."""
    by_base: dict[str, list[str]] = {}
    for k in known:
        by_base.setdefault(Path(k).name, []).append(k)
    out: dict[str, str] = {}
    for n in set(names):
        if n in known:
            out[n] = n
        else:
            hits = by_base.get(Path(n).name, [])
            if len(hits) == 1:
                out[n] = hits[0]
    return out


def run_assign(
    particles: str | os.PathLike[str],
    ctf_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
) -> AssignSummary:
    """Write ``out``: ``particles`` with each particle's defocus from its micrograph's surface.

    Parameters
    ----------
    particles
        RELION particles STAR file (3.0 or 3.1+).
    ctf_dir
        Output folder of ``anisoctf estimate`` (with ``micrographs_ctf.star`` and the
        ``*_surface.json`` files), or that STAR file itself.
    out
        The new STAR file (must differ from ``particles``).

    Raises
    ------
    InputError
        Unreadable inputs, missing columns, or an output path equal to the input.
    """
    src, dst = Path(particles), Path(out)
    if dst.exists() and src.exists() and os.path.samefile(src, dst):
        raise InputError("the output would overwrite the input; choose another --out", path=dst)
    known, surfaces = _load_ctf(Path(ctf_dir))
    blocks = read_star_blocks(src)
    key = _find_particles(src, blocks)
    table = blocks[key]
    n = len(table)
    names = [str(v) for v in table[L.MICROGRAPH_NAME].tolist()]
    try:
        x = strict_numbers(table[L.COORDINATE_X])
        y = strict_numbers(table[L.COORDINATE_Y])
    except (ValueError, TypeError):
        raise InputError(
            f"data_{key}: _rlnCoordinateX/Y are not all numbers; check the file", path=src
        ) from None
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise InputError(f"data_{key}: some coordinates are NaN or Inf", path=src)
    match = _match(names, known)
    u = np.zeros(n)
    v = np.zeros(n)
    ang = np.zeros(n)
    have = np.zeros(n, dtype=bool)
    n_surface = 0
    names_arr = np.array(names, dtype=object)
    for pname, cname in match.items():
        sel = names_arr == pname
        row = known[cname]
        if cname in surfaces:
            rec = surfaces[cname]
            d = rec.surface(x[sel], y[sel])
            h = 0.5 * rec.astigmatism
            u[sel], v[sel], ang[sel] = d + h, d - h, rec.angle_deg
            n_surface += int(sel.sum())
        else:
            u[sel], v[sel], ang[sel] = row.defocus_u, row.defocus_v, row.defocus_angle
        have |= sel
    missing = sorted({n_ for n_, h in zip(names, have, strict=True) if not h})
    n_missing = int((~have).sum())

    layout = star_layout(src)
    t_index = block_index(src, layout, key, table)
    replace = {}
    append = []
    for col, vals in zip(L.DEFOCUS, (u, v, ang), strict=True):
        fmt = fmt_angle if col == L.DEFOCUS_ANGLE else fmt_defocus
        if col in table.columns:
            replace[col] = (have, vals, fmt)
        else:
            append.append((col, np.where(have, vals, 0.0), fmt))
    if L.ASTIGMATISM in table.columns:
        replace[L.ASTIGMATISM] = (have, u - v, fmt_defocus)
    notes: list[str] = []
    if append and n_missing:
        notes.append(
            f"the input had no {', '.join('_' + c for c, _, _ in append)}: the {n_missing} "
            "particle(s) without an estimate got 0 there"
        )
    write_patched_star(src, dst, {t_index: BlockEdit(layout[t_index], table, replace, append)})
    return AssignSummary(
        n_particles=n,
        n_from_surface=n_surface,
        n_from_global=int(have.sum()) - n_surface,
        missing_micrographs=tuple(missing),
        n_missing=n_missing,
        notes=tuple(notes),
    )
