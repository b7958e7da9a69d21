"""RELION particle STAR files: typed per-particle arrays, optics groups and lazy image reads.

A particle is named ``N@stack.mrcs`` in ``_rlnImageName`` with ``N`` 1-based (RELION). Stack
paths are relative to the directory RELION runs in; :func:`read_particles` looks for them
relative to the current directory first and then relative to the STAR file's own directory,
and names the file when it finds neither. Stacks are memory-mapped
(:func:`anisoctf.io.mrc.read_stack`) and only the requested images are read.

Optics come from ``data_optics`` (RELION 3.1+, pixel size ``_rlnImagePixelSize`` first) or from
per-row columns (RELION 3.0). Poses: ``_rlnAngleRot/Tilt/Psi`` (degrees) and
``_rlnOriginXAngst/YAngst`` (RELION 3.1+; RELION 3.0's ``_rlnOriginX/Y`` in pixels are
converted); they are optional here, and :meth:`ParticleSet.require_poses` says which are
missing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from anisoctf._lazy import pandas as pd
from anisoctf.errors import InputError
from anisoctf.io import labels as L
from anisoctf.io.mrc import read_mrc_header, read_stack
from anisoctf.io.star_optics import optics_from_table, per_row_optics
from anisoctf.io.star_tables import find_block, is_table, read_star_blocks
from anisoctf.optics.ctf import Optics

__all__ = ["ParticleSet", "parse_image_name", "read_particles"]

_DEFOCUS = (L.DEFOCUS_U, L.DEFOCUS_V, L.DEFOCUS_ANGLE)
_ANGLES = (L.ANGLE_ROT, L.ANGLE_TILT, L.ANGLE_PSI)


def parse_image_name(name: str) -> tuple[int, str]:
    """``"12@Particles/a.mrcs"`` → ``(11, "Particles/a.mrcs")`` (0-based index, path).

    A name without ``@`` is a single-image file (index 0).

    Raises
    ------
    ValueError
        When the part before ``@`` is not a positive integer.
    """
    head, sep, tail = str(name).partition("@")
    if not sep:
        return 0, head
    try:
        n = int(head)
    except ValueError:
        raise ValueError(f"image name {name!r}: {head!r} is not an image number") from None
    if n < 1:
        raise ValueError(f"image name {name!r}: image numbers start at 1")
    return n - 1, tail


@dataclass
class ParticleSet:
    """Particles of one STAR file as arrays (one entry per row, in file order).

    Attributes
    ----------
    path
        The STAR file.
    table
        The particle block as read (``pandas.DataFrame``; never modified).
    block
        Name of that block (``"particles"`` for RELION 3.1+, ``""`` for 3.0).
    optics
        ``{group: Optics}``; ``Optics.mag_matrix`` is the group's ``_rlnMagMat``.
    group
        Optics group of each particle.
    stack, index
        Resolved stack path and 0-based image index of each particle.
    defocus_u, defocus_v, defocus_angle
        Per-particle CTF (Å, Å, degrees).
    phase_shift
        Degrees (0 when absent).
    bfactor
        ``_rlnCtfBfactor`` (0 when absent).
    angles
        ``(P, 3)`` rot, tilt, psi in degrees, or None when the file has no poses.
    origins
        ``(P, 2)`` origin x, y in Å (zeros when absent).
    micrograph
        ``_rlnMicrographName`` (or "" when absent).
    subset
        ``_rlnRandomSubset`` (0 when absent).
    missing_pose_columns
        Pose columns the file lacks.
    premultiplied_in
        Name of the block (``"optics"``, or the particle block of a 3.0 file) where
        ``_rlnCtfDataAreCtfPremultiplied`` is set, i.e. the images carry CTF² rather than CTF;
        None when it is not set.
    """

    path: Path
    table: pd.DataFrame
    block: str
    optics: dict[int, Optics]
    group: NDArray[np.int64]
    stack: list[Path]
    index: NDArray[np.int64]
    defocus_u: NDArray[np.float64]
    defocus_v: NDArray[np.float64]
    defocus_angle: NDArray[np.float64]
    phase_shift: NDArray[np.float64]
    bfactor: NDArray[np.float64]
    angles: NDArray[np.float64] | None
    origins: NDArray[np.float64]
    micrograph: list[str]
    subset: NDArray[np.int64]
    missing_pose_columns: tuple[str, ...] = ()
    premultiplied_in: str | None = None
    _maps: dict[Path, np.memmap] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.group)

    def box(self, group: int | None = None) -> int:
        """Image edge length (pixels) of the first particle (of ``group``)."""
        rows = np.arange(len(self)) if group is None else np.flatnonzero(self.group == group)
        if rows.size == 0:
            raise InputError(f"no particles in optics group {group}", path=self.path)
        h = read_mrc_header(self.stack[int(rows[0])])
        if h.nx != h.ny:
            raise InputError(
                f"particle images must be square, got {h.nx}×{h.ny}", path=self.stack[int(rows[0])]
            )
        return int(h.nx)

    def require_poses(self) -> None:
        """Raise a one-line InputError when the file has no 3D poses."""
        if self.angles is None:
            missing = ", ".join("_" + c for c in self.missing_pose_columns)
            raise InputError(
                f"no 3D poses ({missing} missing); run a 3D refinement first (RELION "
                "Refine3D/cryoSPARC) and give its particles STAR",
                path=self.path,
            )

    def images(self, rows: Sequence[int] | NDArray[np.integer]) -> NDArray[np.float32]:
        """float32 images ``(len(rows), n, n)`` of the given particle rows (lazy reads)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size == 0:
            return np.zeros((0, 0, 0), dtype=np.float32)
        first = self._map(self.stack[int(rows[0])])
        out = np.empty((rows.size, first.shape[1], first.shape[2]), dtype=np.float32)
        for i, r in enumerate(rows.tolist()):
            st = self._map(self.stack[r])
            j = int(self.index[r])
            if j >= st.shape[0]:
                raise InputError(
                    f"particle {r + 1} asks for image {j + 1} but the stack holds {st.shape[0]}; "
                    "the STAR file and the stack do not match",
                    path=self.stack[r],
                )
            if st.shape[1:] != out.shape[1:]:
                raise InputError(
                    f"image size {st.shape[1:]} differs from {out.shape[1:]} of other particles "
                    "in the same batch; split the optics groups",
                    path=self.stack[r],
                )
            out[i] = st[j]
        if not np.all(np.isfinite(out)):
            raise InputError(
                "NaN or Inf pixels in the particle images; re-extract them",
                path=self.stack[int(rows[0])],
            )
        return out

    def _map(self, p: Path) -> np.memmap:
        m = self._maps.get(p)
        if m is None:
            m = read_stack(p)
            self._maps[p] = m
        return m


def _resolve(name: str, star_dir: Path, cache: dict[str, Path], star: Path) -> Path:
    hit = cache.get(name)
    if hit is not None:
        return hit
    cand = [Path(name)] if Path(name).is_absolute() else [Path.cwd() / name, star_dir / name]
    for c in cand:
        if c.is_file():
            cache[name] = c
            return c
    raise InputError(
        f"particle stack {name!r} not found (looked in {cand[0].parent}"
        + (f" and {cand[1].parent}" if len(cand) > 1 else "")
        + "); run from the RELION project directory",
        path=star,
    )


def _floats(df: pd.DataFrame, col: str, default: float, p: Path) -> NDArray[np.float64]:
    if col not in df.columns:
        return np.full(len(df), default)
    v = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(v)):
        row = int(np.flatnonzero(~np.isfinite(v))[0]) + 1
        raise InputError(f"_{col} of row {row} is not a number; fix the file", path=p)
    return v


def _premultiplied_block(blocks: dict[str, Any], particle_block: str) -> str | None:
    """The first of the optics and particle blocks whose ``_rlnCtfDataAreCtfPremultiplied``
    is set on any row (RELION ``--premultiply_ctf``), or None."""
    for name in ("optics", particle_block):
        table = blocks.get(name)
        if is_table(table) and L.CTF_PREMULTIPLIED in table.columns:
            flags = np.asarray(table[L.CTF_PREMULTIPLIED].astype(str).str.strip().tolist())
            if np.any((flags != "0") & (flags != "0.0")):
                return name
    return None


def read_particles(path: str | os.PathLike[str], *, check_stacks: bool = True) -> ParticleSet:
    """Read a RELION particle STAR file (3.0 or 3.1+).

    Parameters
    ----------
    path
        The STAR file.
    check_stacks
        Resolve every stack path now (one-line error for a missing file).

    Raises
    ------
    InputError
        No ``_rlnImageName``, no defocus columns, missing optics, missing stacks.
    """
    p = Path(path)
    blocks = read_star_blocks(p)
    hits = find_block(blocks, L.IMAGE_NAME, ("particles", ""))
    key = hits[0] if hits else None
    if key is None:
        raise InputError(
            "no _rlnImageName column: not a particle STAR file; give the particles STAR of an "
            "extraction or refinement job",
            path=p,
        )
    df = blocks[key]
    missing = [c for c in _DEFOCUS if c not in df.columns]
    if missing:
        raise InputError(
            f"data_{key} lacks {', '.join('_' + c for c in missing)}; run CTF estimation first",
            path=p,
        )
    if "optics" in blocks:
        optics = optics_from_table(p, blocks["optics"], "particles")
        if L.OPTICS_GROUP in df.columns:
            group = pd.to_numeric(df[L.OPTICS_GROUP]).to_numpy(dtype=np.int64)
        elif len(optics) == 1:
            group = np.full(len(df), next(iter(optics)), dtype=np.int64)
        else:
            raise InputError(f"data_{key} lacks _rlnOpticsGroup; add the column", path=p)
        unknown = sorted(set(group.tolist()) - set(optics))
        if unknown:
            raise InputError(f"optics group(s) {unknown} missing from data_optics", path=p)
    else:
        group, optics = per_row_optics(p, df, key)
        if not optics:
            raise InputError(
                "no optics (pixel size, voltage, Cs, amplitude contrast) in the file; "
                "convert it with relion_convert_star",
                path=p,
            )
    names = [str(x) for x in df[L.IMAGE_NAME].tolist()]
    index = np.empty(len(names), dtype=np.int64)
    stack: list[Path] = []
    cache: dict[str, Path] = {}
    for i, name in enumerate(names):
        try:
            j, sp = parse_image_name(name)
        except ValueError as exc:
            raise InputError(f"row {i + 1}: {exc}", path=p) from None
        index[i] = j
        stack.append(_resolve(sp, p.parent, cache, p) if check_stacks else Path(sp))
    have = [c for c in _ANGLES if c in df.columns]
    angles = None
    if len(have) == 3:
        angles = np.stack([_floats(df, c, 0.0, p) for c in _ANGLES], axis=1)
    missing_pose = tuple(c for c in _ANGLES if c not in df.columns)
    if L.ORIGIN_X_ANGST in df.columns or L.ORIGIN_Y_ANGST in df.columns:
        origins = np.stack(
            [_floats(df, L.ORIGIN_X_ANGST, 0.0, p), _floats(df, L.ORIGIN_Y_ANGST, 0.0, p)], 1
        )
    elif L.ORIGIN_X in df.columns or L.ORIGIN_Y in df.columns:  # RELION 3.0, pixels
        px = np.array([optics[int(g)].pixel_size for g in group])
        origins = np.stack(
            [_floats(df, L.ORIGIN_X, 0.0, p) * px, _floats(df, L.ORIGIN_Y, 0.0, p) * px], 1
        )
    else:
        origins = np.zeros((len(df), 2))
    mic = (
        [str(x) for x in df[L.MICROGRAPH_NAME].tolist()]
        if L.MICROGRAPH_NAME in df.columns
        else [""] * len(df)
    )
    return ParticleSet(
        path=p,
        table=df,
        block=key,
        optics=optics,
        group=group,
        stack=stack,
        index=index,
        defocus_u=_floats(df, L.DEFOCUS_U, 0.0, p),
        defocus_v=_floats(df, L.DEFOCUS_V, 0.0, p),
        defocus_angle=_floats(df, L.DEFOCUS_ANGLE, 0.0, p),
        phase_shift=_floats(df, L.PHASE_SHIFT, 0.0, p),
        bfactor=_floats(df, L.CTF_BFACTOR, 0.0, p),
        angles=angles,
        origins=origins,
        micrograph=mic,
        subset=_floats(df, L.RANDOM_SUBSET, 0.0, p).astype(np.int64),
        missing_pose_columns=missing_pose,
        premultiplied_in=_premultiplied_block(blocks, key),
    )
