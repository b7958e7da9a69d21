"""STAR inputs of ``aniso correct``: a particles or micrographs STAR file and its images.

Works out, from one RELION STAR file, the files to correct and the rewritten tables (new image
names, coordinates, origins, defocus, pixel sizes and ``_rlnMagMat``), as the module notes of
:mod:`anisoctf.jobs.correct_images` describe. Nothing is written here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from anisoctf.errors import InputError
from anisoctf.io import labels as L
from anisoctf.io.mrc import read_mrc_header
from anisoctf.io.star_optics import from_relion_row
from anisoctf.io.star_tables import find_block, is_table, numeric_column, read_star_raw
from anisoctf.jobs.correct_plan import (
    CorrectPlan,
    FileTask,
    ResampleOptions,
    check_exists,
    make_task,
    out_path,
    same_file,
    star_name,
    strip_mrc_tag,
)
from anisoctf.magnification.resample import correct_coordinates, correct_shifts
from anisoctf.optics.frames import defocus_table_to_true
from anisoctf.optics.magmat import MagMat

__all__ = ["plan_star"]

_PIXEL_COLUMNS = (L.IMAGE_PIXEL_SIZE, L.MICROGRAPH_PIXEL_SIZE, L.MICROGRAPH_ORIGINAL_PIXEL_SIZE)
# same matrix, to this tolerance (float text in STAR files has 6 decimals)
_SAME_MATRIX_ATOL = 1e-5


def _numeric(path: Path, df: Any, col: str, block: str) -> np.ndarray:
    return numeric_column(path, df, col, block)


def _row_groups(path: Path, blocks: dict[str, Any], key: str, df: Any) -> np.ndarray:
    optics = blocks.get("optics")
    if L.OPTICS_GROUP in df.columns:
        g = _numeric(path, df, L.OPTICS_GROUP, key)
        return g.astype(np.int64)
    if is_table(optics) and len(optics) > 1:
        raise InputError(
            f"data_{key} lacks _rlnOpticsGroup but data_optics has {len(optics)} groups", path=path
        )
    if is_table(optics) and L.OPTICS_GROUP in optics.columns:
        return np.full(len(df), int(_numeric(path, optics, L.OPTICS_GROUP, "optics")[0]))
    return np.ones(len(df), dtype=np.int64)


def _optics_row_groups(path: Path, optics: Any) -> np.ndarray:
    """Group of every ``data_optics`` row (1, 2, … when the table has no group column)."""
    if L.OPTICS_GROUP in optics.columns:
        return _numeric(path, optics, L.OPTICS_GROUP, "optics").astype(np.int64)
    return np.arange(1, len(optics) + 1)


def _group_matrices(
    path: Path, optics: Any | None, groups: Sequence[int], mag: MagMat | None
) -> tuple[dict[int, MagMat], dict[int, bool]]:
    """``M`` per optics group and whether the group's defocus must be moved to the true frame."""
    star_mags: dict[int, MagMat] = {}
    if optics is not None:
        og = _optics_row_groups(path, optics)
        for g, (_, row) in zip(og.tolist(), optics.iterrows(), strict=True):
            try:
                star_mags[int(g)] = from_relion_row(row)
            except ValueError as exc:
                raise InputError(f"optics group {g}: {exc}", path=path) from exc
        unknown = sorted(set(groups) - set(star_mags))
        if unknown:
            raise InputError(
                f"rows refer to optics group(s) {unknown} missing from data_optics", path=path
            )
    mats: dict[int, MagMat] = {}
    to_true: dict[int, bool] = {}
    for g in sorted(set(groups)):
        own = star_mags.get(g, MagMat.identity())
        if mag is None:
            mats[g] = own
            to_true[g] = False
        else:
            if not own.is_identity and not np.allclose(
                own.array, mag.array, rtol=0.0, atol=_SAME_MATRIX_ATOL
            ):
                raise InputError(
                    f"optics group {g} already carries a different _rlnMagMat "
                    f"({own.array.ravel().round(6).tolist()}); its defocus is in that matrix's "
                    "true frame. Leave out --mag-matrix/--from-json to use it, or start from "
                    "a table without it",
                    path=path,
                )
            mats[g] = mag
            to_true[g] = own.is_identity
    if mag is None and all(m.is_identity for m in mats.values()):
        raise InputError(
            "no magnification matrix: the STAR file has no _rlnMagMat; give --mag-matrix "
            "M00 M01 M10 M11 or --from-json",
            path=path,
        )
    return mats, to_true


def _group_pixel(
    path: Path, blocks: dict[str, Any], key: str, df: Any, groups: np.ndarray, kind: str
) -> dict[int, float | None]:
    """Pixel size per optics group from the STAR file (None when it has none)."""
    order = (
        (L.IMAGE_PIXEL_SIZE, L.MICROGRAPH_PIXEL_SIZE, L.MICROGRAPH_ORIGINAL_PIXEL_SIZE)
        if kind == "particles"
        else (L.MICROGRAPH_PIXEL_SIZE, L.IMAGE_PIXEL_SIZE, L.MICROGRAPH_ORIGINAL_PIXEL_SIZE)
    )
    out: dict[int, float | None] = {int(g): None for g in np.unique(groups)}
    optics = blocks.get("optics")
    if is_table(optics):
        col = next((c for c in order if c in optics.columns), None)
        if col is not None:
            og = _optics_row_groups(path, optics)
            vals = _numeric(path, optics, col, "optics")
            for g, v in zip(og.tolist(), vals.tolist(), strict=True):
                if int(g) in out:
                    out[int(g)] = float(v)
        return out
    col = next((c for c in order if c in df.columns), None)
    if col is not None:
        vals = _numeric(path, df, col, key)
    elif L.DETECTOR_PIXEL_SIZE in df.columns and L.MAGNIFICATION in df.columns:
        vals = (
            _numeric(path, df, L.DETECTOR_PIXEL_SIZE, key)
            * 1e4
            / _numeric(path, df, L.MAGNIFICATION, key)
        )
    else:
        return out
    for g in out:
        v = vals[groups == g]
        out[g] = float(v[0])
    return out


def _check_pixel(path: Path, value: float | None, src: Path, apix: float | None) -> float:
    if apix is not None:
        return apix
    if value is not None and value > 0:
        return value
    header = read_mrc_header(src)
    if header.pixel_size is None:
        raise InputError(
            "no pixel size in the STAR file or in the image header; give --apix", path=path
        )
    return header.pixel_size


@dataclass(frozen=True)
class _StarInput:
    """A STAR file to correct, as read: its table, optics and per-group matrices."""

    star: Path
    project: Path
    blocks: dict[str, Any]
    key: str
    kind: str  # "particles" or "micrographs"
    df: Any  # the table with the image names (a copy, rewritten in place)
    optics: Any | None  # data_optics (a copy) or None for RELION 3.0
    groups: np.ndarray
    mats: dict[int, MagMat]
    to_true: dict[int, bool]

    @property
    def name_col(self) -> str:
        return L.IMAGE_NAME if self.kind == "particles" else L.MICROGRAPH_NAME


def _read_star_input(star: Path, mag: MagMat | None, project: Path) -> _StarInput:
    """Read a particles or micrographs STAR file and the matrix of each optics group."""
    blocks = read_star_raw(star)
    kind = "particles"
    hits = find_block(blocks, L.IMAGE_NAME)
    if not hits:
        kind = "micrographs"
        hits = find_block(blocks, L.MICROGRAPH_NAME)
    key = hits[0] if hits else None
    if key is None:
        raise InputError(
            "no _rlnImageName or _rlnMicrographName column: give a particles or micrographs "
            "STAR file",
            path=star,
        )
    df = blocks[key].copy()  # type: ignore[attr-defined]
    if len(df) == 0:
        raise InputError(f"data_{key} has no rows", path=star)
    optics = blocks.get("optics")
    optics = optics.copy() if is_table(optics) else None  # type: ignore[attr-defined]
    groups = _row_groups(star, blocks, key, df)
    mats, to_true = _group_matrices(star, optics, groups.tolist(), mag)
    return _StarInput(star, project, blocks, key, kind, df, optics, groups, mats, to_true)


def _split_names(inp: _StarInput) -> tuple[list[str], list[str]]:
    """Image index text (particles: ``N`` of ``N@stack``; else "") and file of every row."""
    names = inp.df[inp.name_col].astype(str).tolist()
    if inp.kind != "particles":
        return [""] * len(names), [strip_mrc_tag(n) for n in names]
    idx_text, files = [], []
    for i, n in enumerate(names):
        head, sep, tail = n.partition("@")
        if not sep or not head.strip().isdigit():
            raise InputError(
                f"data_{inp.key} row {i + 1}: _rlnImageName {n!r} is not of the form N@stack.mrcs",
                path=inp.star,
            )
        idx_text.append(head)
        files.append(strip_mrc_tag(tail))
    return idx_text, files


def _plan_files(
    inp: _StarInput,
    out_dir: Path,
    opts: ResampleOptions,
    apix: float | None,
    files_idx: tuple[list[str], list[str]],
    pixels: dict[int, float | None],
) -> tuple[list[FileTask], dict[str, tuple[int, int]]]:
    """One task per file named in the table; the new names are written into ``inp.df``.

    Returns the tasks and the ``(ny, nx)`` of every file.
    """
    star, groups, mats = inp.star, inp.groups, inp.mats
    idx_text, files = files_idx
    file_rows: dict[str, list[int]] = {}
    for i, f in enumerate(files):
        file_rows.setdefault(f, []).append(i)
    tasks: list[FileTask] = []
    new_name: dict[str, str] = {}
    shapes: dict[str, tuple[int, int]] = {}
    dst_seen: dict[str, str] = {}
    for f, rows in file_rows.items():
        src = Path(f) if Path(f).is_absolute() else inp.project / f
        check_exists(src)
        header = read_mrc_header(src)
        shapes[f] = (header.ny, header.nx)
        gs = sorted({int(groups[r]) for r in rows})
        ms = {g: mats[g] for g in gs}
        first = ms[gs[0]]
        if any(not np.allclose(m.array, first.array, rtol=0.0, atol=1e-12) for m in ms.values()):
            raise InputError(
                f"{f} holds images of optics groups {gs} with different matrices; one file can "
                "only be corrected with one matrix",
                path=star,
            )
        if inp.kind == "particles":
            top = max(int(idx_text[r]) for r in rows)
            if top > header.nz or min(int(idx_text[r]) for r in rows) < 1:
                raise InputError(
                    f"the STAR file asks for image {top} but the stack holds {header.nz}; "
                    "the STAR file and the stack do not match",
                    path=src,
                )
        pixel = _check_pixel(star, pixels[gs[0]], src, apix)
        dst = out_path(f, out_dir)
        if same_file(src, dst):
            raise InputError("--out would overwrite this input; choose another directory", src)
        if str(dst) in dst_seen:
            raise InputError(
                f"{dst_seen[str(dst)]} and {f} would both be written to {dst}; give their "
                "STAR file relative paths or use separate runs",
                path=star,
            )
        dst_seen[str(dst)] = f
        tasks.append(make_task(src, dst, first, pixel, opts))
        new_name[f] = star_name(dst, inp.project)
    if inp.kind == "particles":
        inp.df[inp.name_col] = [
            f"{i}@{new_name[f]}" for i, f in zip(idx_text, files, strict=True)
        ]
    else:
        inp.df[inp.name_col] = [new_name[f] for f in files]
    return tasks, shapes


def _transform_coordinates(
    inp: _StarInput,
    keep: bool,
    files: list[str],
    shapes: dict[str, tuple[int, int]],
    micrograph_size: tuple[int, int] | None,
) -> list[str]:
    """``_rlnCoordinateX/Y`` into the corrected micrograph frame (about its centre)."""
    df, groups = inp.df, inp.groups
    x = _numeric(inp.star, df, L.COORDINATE_X, inp.key)
    y = _numeric(inp.star, df, L.COORDINATE_Y, inp.key)
    mic_shape = _micrograph_shapes(inp, files, shapes, micrograph_size)
    nx_, ny_ = np.empty(len(df)), np.empty(len(df))
    for combo in sorted({(int(g), mic_shape[i]) for i, g in enumerate(groups)}):
        g, shp = combo
        sel = (groups == g) & np.array([s == shp for s in mic_shape])
        nx_[sel], ny_[sel] = correct_coordinates(
            x[sel], y[sel], inp.mats[g], shp, keep_pixel_size=keep
        )
    df[L.COORDINATE_X], df[L.COORDINATE_Y] = nx_, ny_
    return [L.COORDINATE_X, L.COORDINATE_Y]


def _transform_rows(
    inp: _StarInput,
    keep: bool,
    files: list[str],
    shapes: dict[str, tuple[int, int]],
    micrograph_size: tuple[int, int] | None,
) -> list[str]:
    """Coordinates, origins and defocus of every row in the corrected frame; the columns."""
    df, groups, mats, star, key = inp.df, inp.groups, inp.mats, inp.star, inp.key
    transformed: list[str] = [inp.name_col]
    if L.COORDINATE_X in df.columns and L.COORDINATE_Y in df.columns:
        transformed += _transform_coordinates(inp, keep, files, shapes, micrograph_size)
    for cx, cy, unit in (
        (L.ORIGIN_X_ANGST, L.ORIGIN_Y_ANGST, "angstrom"),
        (L.ORIGIN_X, L.ORIGIN_Y, "pixel"),
    ):
        if cx in df.columns and cy in df.columns:
            vx = _numeric(star, df, cx, key)
            vy = _numeric(star, df, cy, key)
            ox, oy = np.empty(len(df)), np.empty(len(df))
            for g in np.unique(groups):
                sel = groups == g
                ox[sel], oy[sel] = correct_shifts(
                    vx[sel], vy[sel], mats[int(g)], unit=unit, keep_pixel_size=keep
                )
            df[cx], df[cy] = ox, oy
            transformed += [cx, cy]
    if all(c in df.columns for c in L.DEFOCUS):
        sel = np.array([inp.to_true[int(g)] for g in groups])
        if sel.any():
            ug = np.array(sorted(mats), dtype=np.int64)
            row_m = np.stack([mats[int(g)].array for g in ug])[np.searchsorted(ug, groups)]
            u, v, ang = (_numeric(star, df, c, key) for c in L.DEFOCUS)
            nu, nv, na = defocus_table_to_true(u[sel], v[sel], ang[sel], row_m[sel])
            u, v, ang = u.copy(), v.copy(), ang.copy()
            u[sel], v[sel], ang[sel] = nu, nv, na
            df[L.DEFOCUS_U], df[L.DEFOCUS_V], df[L.DEFOCUS_ANGLE] = u, v, ang
            transformed += list(L.DEFOCUS)
            if L.ASTIGMATISM in df.columns:
                df[L.ASTIGMATISM] = u - v
                transformed.append(L.ASTIGMATISM)
    return transformed


def _update_optics(inp: _StarInput, keep: bool) -> list[str]:
    """Pixel sizes over ``sqrt(det M)`` and ``_rlnMagMat`` = identity; the warnings."""
    star, df, mats = inp.star, inp.df, inp.mats
    scale = {g: (1.0 if keep else m.scale) for g, m in mats.items()}
    optics = inp.optics
    if optics is not None:
        og = _optics_row_groups(star, optics)
        fac = np.array([scale.get(int(g), 1.0) for g in og])
        used = np.array([int(g) in mats for g in og])
        for col in _PIXEL_COLUMNS:
            if col in optics.columns:
                optics[col] = _numeric(star, optics, col, "optics") / fac
        for label, val in zip(L.MAGMAT, (1.0, 0.0, 0.0, 1.0), strict=True):
            if label in optics.columns:
                old = _numeric(star, optics, label, "optics")
                optics[label] = np.where(used, val, old)
            else:  # absent means identity for every group
                optics[label] = val
        inp.blocks["optics"] = optics
        return []
    fac = np.array([scale[int(g)] for g in inp.groups])
    cols = [c for c in _PIXEL_COLUMNS if c in df.columns]
    for col in cols:
        df[col] = _numeric(star, df, col, inp.key) / fac
    if not cols and L.MAGNIFICATION in df.columns and L.DETECTOR_PIXEL_SIZE in df.columns:
        df[L.MAGNIFICATION] = _numeric(star, df, L.MAGNIFICATION, inp.key) * fac
    return [
        "RELION 3.0 layout (no data_optics): no _rlnMagMat could be written (identity is "
        "implied)"
    ]


def plan_star(
    star: Path,
    out_dir: Path,
    mag: MagMat | None,
    opts: ResampleOptions,
    apix: float | None,
    micrograph_size: tuple[int, int] | None,
    project: Path,
) -> CorrectPlan:
    keep = bool(opts.keep_pixel_size)
    inp = _read_star_input(star, mag, project)
    pixels = _group_pixel(star, inp.blocks, inp.key, inp.df, inp.groups, inp.kind)
    out_star = str(out_dir / star.name)
    if same_file(star, Path(out_star)):
        raise InputError(
            "--out would overwrite the input STAR file; choose another directory", star
        )
    files_idx = _split_names(inp)
    tasks, shapes = _plan_files(inp, out_dir, opts, apix, files_idx, pixels)
    transformed = _transform_rows(inp, keep, files_idx[1], shapes, micrograph_size)
    warnings_ = _update_optics(inp, keep)
    inp.blocks[inp.key] = inp.df
    return CorrectPlan(
        kind=inp.kind,
        tasks=tuple(tasks),
        star=out_star,
        star_blocks=inp.blocks,
        n_rows=len(inp.df),
        transformed=tuple(transformed),
        warnings=tuple(warnings_),
    )


def _micrograph_shapes(
    inp: _StarInput,
    files: list[str],
    shapes: dict[str, tuple[int, int]],
    micrograph_size: tuple[int, int] | None,
) -> list[tuple[int, int]]:
    """``(ny, nx)`` of the micrograph of every row, for the coordinate transform."""
    df, star = inp.df, inp.star
    if inp.kind == "micrographs":
        return [shapes[f] for f in files]
    if micrograph_size is not None:
        nx, ny = micrograph_size
        return [(int(ny), int(nx))] * len(df)
    if L.MICROGRAPH_NAME not in df.columns:
        raise InputError(
            "cannot transform _rlnCoordinateX/Y without the micrograph size: there is no "
            "_rlnMicrographName column; give --micrograph-size NX NY",
            path=star,
        )
    cache: dict[str, tuple[int, int]] = {}
    out = []
    for name in df[L.MICROGRAPH_NAME].astype(str).tolist():
        name = strip_mrc_tag(name)
        if name not in cache:
            p = Path(name) if Path(name).is_absolute() else inp.project / name
            if not p.exists():
                raise InputError(
                    f"cannot transform _rlnCoordinateX/Y: micrograph {name} not found (its size "
                    "is needed); give --micrograph-size NX NY or --project-dir",
                    path=star,
                )
            h = read_mrc_header(p)
            cache[name] = (h.ny, h.nx)
        out.append(cache[name])
    return out

