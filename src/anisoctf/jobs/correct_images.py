"""The file-level job behind ``anisoctf aniso correct``: images resampled into the true frame.

Inputs are either MRC files (micrographs ``.mrc``, particle stacks ``.mrcs``; glob patterns are
expanded) or one RELION STAR file:

* a **particles** STAR (``_rlnImageName`` = ``N@stack.mrcs``): every stack it names is corrected
  as a whole (each image about its own box centre), and the STAR is rewritten with the new stack
  names, ``_rlnCoordinateX/Y`` in the corrected micrograph frame (about the micrograph centre,
  so the micrograph size is needed: from the header of ``_rlnMicrographName`` when that file
  exists, else ``micrograph_size``), ``_rlnOriginXAngst/YAngst`` (or ``_rlnOriginX/Y``) and the
  defocus in the true frame;
* a **micrographs** STAR (``_rlnMicrographName``, no ``_rlnImageName``): every micrograph is
  corrected; defocus and coordinate columns, when present, are transformed likewise.

The science is in :mod:`anisoctf.magnification.resample`; conventions there and in
``docs/correction.md``. Every output file is written atomically into the output directory, which
mirrors the relative paths of the inputs (absolute paths keep only their file name). Nothing is
ever written over an input.

STAR bookkeeping, per optics group:

* the matrix is the given one; without one, the group's own ``_rlnMagMat``. A group that already
  carries a different non-identity ``_rlnMagMat`` is refused;
* defocus (``_rlnDefocusU/V/Angle``, ``_rlnCtfAstigmatism``) is transformed with
  :func:`~anisoctf.optics.frames.defocus_table_to_true` only when the group had no
  ``_rlnMagMat`` (RELION's defocus of a group with a matrix is already a true-frame value);
* pixel sizes (``_rlnImagePixelSize``, ``_rlnMicrographPixelSize``,
  ``_rlnMicrographOriginalPixelSize``) become ``p / sqrt(det M)`` (unchanged with
  ``keep_pixel_size``); in a RELION 3.0 table without them, ``_rlnMagnification`` is multiplied
  by ``sqrt(det M)`` instead;
* ``_rlnMagMat00..11`` are set to the identity (added when absent; a RELION 3.0 file has no
  optics table, where the identity is implied).

Columns that refer to other, uncorrected files (``_rlnCtfImage``, the micrograph names of a
particles STAR, movies) are left as they are. STAR values are written with 6 decimals.
"""

from __future__ import annotations

import glob
import math
import multiprocessing
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from anisoctf._lazy import pandas as pd
from anisoctf.errors import AnisoctfError, InputError
from anisoctf.io.atomic import atomic_path
from anisoctf.io.mrc import read_mrc_header, read_stack, write_mrc
from anisoctf.magnification.resample import (
    DEFAULT_METHOD,
    METHODS,
    correct_coordinates,
    correct_image,
    correct_shifts,
    corrected_pixel_size,
)
from anisoctf.optics.frames import defocus_table_to_true
from anisoctf.optics.magmat import RELION_MAGMAT_LABELS, MagMat, from_relion_row

__all__ = ["CorrectSummary", "FileTask", "correct_file", "run_correct"]

_MRC_SUFFIXES = (".mrc", ".mrcs", ".st", ".map", ".ali")
_STRING_COLUMNS = [
    "rlnImageName",
    "rlnMicrographName",
    "rlnMicrographMovieName",
    "rlnMicrographMetadata",
    "rlnCtfImage",
    "rlnCtfPowerSpectrum",
    "rlnOpticsGroupName",
    "rlnImageOriginalName",
    "rlnMtfFileName",
    "rlnReconstructImageName",
]
_PIXEL_COLUMNS = ("rlnImagePixelSize", "rlnMicrographPixelSize", "rlnMicrographOriginalPixelSize")
_DEFOCUS_COLUMNS = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")
_STAR_VERSION = "# version 30001"
# pixels per chunk when a stack is corrected (bounds the memory of one worker)
_CHUNK_PIXELS = 1 << 24
# same matrix, to this tolerance (float text in STAR files has 6 decimals)
_SAME_MATRIX_ATOL = 1e-5


# ============================================================================ one file
@dataclass(frozen=True)
class FileTask:
    """One MRC file to correct (picklable, for the worker processes)."""

    src: str
    dst: str
    matrix: tuple[tuple[float, float], tuple[float, float]]
    pixel_size_in: float
    pixel_size: float  # of the output, written to its header
    method: str = DEFAULT_METHOD
    keep_pixel_size: bool = False


def correct_file(task: FileTask) -> int:
    """Correct one MRC file (image or stack) into ``task.dst``; returns the number of images.

    Raises
    ------
    InputError
        Unreadable file, NaN/Inf pixels, or a matrix the method cannot handle.
    """
    src = Path(task.src)
    header = read_mrc_header(src)
    stack = read_stack(src)
    ny, nx = header.ny, header.nx
    try:
        if header.nz == 1:
            image = np.asarray(stack[0], dtype=np.float32)
            out = correct_image(
                image, task.matrix, method=task.method, keep_pixel_size=task.keep_pixel_size
            )
            write_mrc(task.dst, out, task.pixel_size)
            return 1
        import mrcfile

        chunk = max(1, _CHUNK_PIXELS // (ny * nx))
        with atomic_path(task.dst) as tmp:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                with mrcfile.new_mmap(
                    tmp, shape=(header.nz, ny, nx), mrc_mode=2, overwrite=True
                ) as mrc:
                    for i0 in range(0, header.nz, chunk):
                        i1 = min(header.nz, i0 + chunk)
                        part = np.asarray(stack[i0:i1], dtype=np.float32)
                        try:
                            mrc.data[i0:i1] = correct_image(
                                part,
                                task.matrix,
                                method=task.method,
                                keep_pixel_size=task.keep_pixel_size,
                            )
                        except ValueError as exc:
                            raise ValueError(f"images {i0 + 1}-{i1}: {exc}") from exc
                    mrc.set_image_stack()
                    mrc.voxel_size = float(task.pixel_size)
                    mrc.update_header_stats()
        return header.nz
    except ValueError as exc:
        raise InputError(str(exc), path=src) from exc
    finally:
        del stack


# ============================================================================ results
@dataclass(frozen=True)
class CorrectSummary:
    """What :func:`run_correct` wrote (for the summary line and for tests)."""

    kind: str  # "images", "particles" or "micrographs"
    files: tuple[tuple[str, str], ...]  # (input, output) per corrected file
    n_images: int
    star: str | None = None
    n_rows: int = 0
    transformed: tuple[str, ...] = ()  # STAR columns rewritten in the corrected frame
    warnings: tuple[str, ...] = ()
    pixel_sizes: tuple[tuple[float, float], ...] = ()  # (input, output) pixel sizes seen


@dataclass
class _Plan:
    tasks: list[FileTask] = field(default_factory=list)
    files: list[tuple[str, str]] = field(default_factory=list)
    write_star: Callable[[], None] | None = None
    star: str | None = None
    kind: str = "images"
    n_rows: int = 0
    transformed: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# ============================================================================ helpers
def _same_file(a: Path, b: Path) -> bool:
    if a.absolute() == b.absolute() or a.resolve() == b.resolve():
        return True
    try:
        return b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _out_path(name: str, out_dir: Path) -> Path:
    """Where the corrected copy of ``name`` goes: its relative path mirrored under ``out_dir``."""
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or not p.parts:
        return out_dir / p.name
    return out_dir.joinpath(*p.parts)


def _star_name(path: Path, project: Path) -> str:
    """A path as written in a STAR file: relative to the project directory when inside it."""
    try:
        return path.absolute().relative_to(project.absolute()).as_posix()
    except ValueError:
        return path.absolute().as_posix()


def _strip_type_tag(name: str) -> str:
    head, sep, tail = name.rpartition(":")
    return head if sep and tail in ("mrc", "mrcs") else name


def _matrix_tuple(m: MagMat) -> tuple[tuple[float, float], tuple[float, float]]:
    a = m.array
    return ((float(a[0, 0]), float(a[0, 1])), (float(a[1, 0]), float(a[1, 1])))


def _task(src: Path, dst: Path, m: MagMat, pixel: float, opts: dict[str, Any]) -> FileTask:
    keep = bool(opts["keep_pixel_size"])
    return FileTask(
        src=str(src),
        dst=str(dst),
        matrix=_matrix_tuple(m),
        pixel_size_in=float(pixel),
        pixel_size=corrected_pixel_size(pixel, m, keep_pixel_size=keep),
        method=str(opts["method"]),
        keep_pixel_size=keep,
    )


def _expand(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    out: list[Path] = []
    seen: set[str] = set()
    for item in inputs:
        s = str(item)
        if any(c in s for c in "*?["):
            hits = sorted(glob.glob(s))
            if not hits:
                raise InputError(f"no file matches the pattern {s!r}")
            paths = [Path(h) for h in hits]
        else:
            paths = [Path(s)]
        for p in paths:
            key = str(p.absolute())
            if key not in seen:
                seen.add(key)
                out.append(p)
    return out


def _check_exists(p: Path) -> None:
    if not p.exists():
        raise InputError("file not found; check the path", path=p)
    if p.is_dir():
        raise InputError("is a directory; give MRC or STAR files", path=p)


# ============================================================================ MRC inputs
def _plan_images(
    paths: list[Path], out_dir: Path, mag: MagMat, opts: dict[str, Any], apix: float | None
) -> _Plan:
    plan = _Plan(kind="images")
    dst_of: dict[str, Path] = {}
    for p in paths:
        _check_exists(p)
        if p.suffix.lower() not in _MRC_SUFFIXES:
            raise InputError(
                f"not an MRC file name (expected {', '.join(_MRC_SUFFIXES)} or one .star)", path=p
            )
        header = read_mrc_header(p)
        pixel = apix if apix is not None else header.pixel_size
        if pixel is None:
            raise InputError("the header has no pixel size; give --apix", path=p)
        dst = out_dir / p.name
        if _same_file(p, dst):
            raise InputError("--out would overwrite this input; choose another directory", path=p)
        if p.name in dst_of:
            raise InputError(
                f"two inputs are named {p.name} ({dst_of[p.name]} and {p}); correct them into "
                "separate output directories",
                path=p,
            )
        dst_of[p.name] = p
        plan.tasks.append(_task(p, dst, mag, pixel, opts))
        plan.files.append((str(p), str(dst)))
    return plan


# ============================================================================ STAR inputs
def _read_star(path: Path) -> dict[str, Any]:
    try:
        import starfile

        blocks = starfile.read(path, always_dict=True, parse_as_string=_STRING_COLUMNS)
    except Exception as exc:  # starfile/pandas raise many types on malformed text
        raise InputError(
            f"not a readable STAR file ({type(exc).__name__}: {exc}); check the file", path=path
        ) from exc
    if not blocks:
        raise InputError("no data blocks found: empty or not a STAR file", path=path)
    return dict(blocks)


def _numeric(path: Path, df: pd.DataFrame, col: str, block: str) -> np.ndarray:
    v = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(v))
    if bad.size:
        raise InputError(
            f"data_{block} row {int(bad[0]) + 1}: _{col} is missing or not a number", path=path
        )
    return v


def _row_groups(path: Path, blocks: dict[str, Any], key: str, df: pd.DataFrame) -> np.ndarray:
    optics = blocks.get("optics")
    if "rlnOpticsGroup" in df.columns:
        g = _numeric(path, df, "rlnOpticsGroup", key)
        return g.astype(np.int64)
    if isinstance(optics, pd.DataFrame) and len(optics) > 1:
        raise InputError(
            f"data_{key} lacks _rlnOpticsGroup but data_optics has {len(optics)} groups", path=path
        )
    if isinstance(optics, pd.DataFrame) and "rlnOpticsGroup" in optics.columns:
        return np.full(len(df), int(_numeric(path, optics, "rlnOpticsGroup", "optics")[0]))
    return np.ones(len(df), dtype=np.int64)


def _group_matrices(
    path: Path, optics: pd.DataFrame | None, groups: Sequence[int], mag: MagMat | None
) -> tuple[dict[int, MagMat], dict[int, bool]]:
    """``M`` per optics group and whether the group's defocus must be moved to the true frame."""
    star_mags: dict[int, MagMat] = {}
    if optics is not None:
        og = (
            _numeric(path, optics, "rlnOpticsGroup", "optics").astype(np.int64)
            if "rlnOpticsGroup" in optics.columns
            else np.arange(1, len(optics) + 1)
        )
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
    path: Path, blocks: dict[str, Any], key: str, df: pd.DataFrame, groups: np.ndarray, kind: str
) -> dict[int, float | None]:
    """Pixel size per optics group from the STAR file (None when it has none)."""
    order = (
        ("rlnImagePixelSize", "rlnMicrographPixelSize", "rlnMicrographOriginalPixelSize")
        if kind == "particles"
        else ("rlnMicrographPixelSize", "rlnImagePixelSize", "rlnMicrographOriginalPixelSize")
    )
    out: dict[int, float | None] = {int(g): None for g in np.unique(groups)}
    optics = blocks.get("optics")
    if isinstance(optics, pd.DataFrame):
        col = next((c for c in order if c in optics.columns), None)
        if col is not None:
            og = (
                _numeric(path, optics, "rlnOpticsGroup", "optics").astype(np.int64)
                if "rlnOpticsGroup" in optics.columns
                else np.arange(1, len(optics) + 1)
            )
            vals = _numeric(path, optics, col, "optics")
            for g, v in zip(og.tolist(), vals.tolist(), strict=True):
                if int(g) in out:
                    out[int(g)] = float(v)
        return out
    col = next((c for c in order if c in df.columns), None)
    if col is not None:
        vals = _numeric(path, df, col, key)
    elif "rlnDetectorPixelSize" in df.columns and "rlnMagnification" in df.columns:
        vals = (
            _numeric(path, df, "rlnDetectorPixelSize", key)
            * 1e4
            / _numeric(path, df, "rlnMagnification", key)
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


def _plan_star(
    star: Path,
    out_dir: Path,
    mag: MagMat | None,
    opts: dict[str, Any],
    apix: float | None,
    micrograph_size: tuple[int, int] | None,
    project: Path,
) -> _Plan:
    keep = bool(opts["keep_pixel_size"])
    blocks = _read_star(star)
    key = next(
        (
            k
            for k, b in blocks.items()
            if isinstance(b, pd.DataFrame) and "rlnImageName" in b.columns
        ),
        None,
    )
    kind = "particles"
    if key is None:
        kind = "micrographs"
        key = next(
            (
                k
                for k, b in blocks.items()
                if isinstance(b, pd.DataFrame) and "rlnMicrographName" in b.columns
            ),
            None,
        )
    if key is None:
        raise InputError(
            "no _rlnImageName or _rlnMicrographName column: give a particles or micrographs "
            "STAR file",
            path=star,
        )
    df: pd.DataFrame = blocks[key].copy()
    if len(df) == 0:
        raise InputError(f"data_{key} has no rows", path=star)
    optics = blocks.get("optics")
    optics = optics.copy() if isinstance(optics, pd.DataFrame) else None
    groups = _row_groups(star, blocks, key, df)
    mats, to_true = _group_matrices(star, optics, groups.tolist(), mag)
    pixels = _group_pixel(star, blocks, key, df, groups, kind)
    plan = _Plan(kind=kind, star=str(out_dir / star.name), n_rows=len(df))
    if _same_file(star, Path(plan.star)):
        raise InputError(
            "--out would overwrite the input STAR file; choose another directory", star
        )

    # ---------------------------------------------------------------- files
    name_col = "rlnImageName" if kind == "particles" else "rlnMicrographName"
    names = df[name_col].astype(str).tolist()
    if kind == "particles":
        idx_text, files = [], []
        for i, n in enumerate(names):
            head, sep, tail = n.partition("@")
            if not sep or not head.strip().isdigit():
                raise InputError(
                    f"data_{key} row {i + 1}: _rlnImageName {n!r} is not of the form N@stack.mrcs",
                    path=star,
                )
            idx_text.append(head)
            files.append(_strip_type_tag(tail))
    else:
        idx_text, files = [""] * len(names), [_strip_type_tag(n) for n in names]
    file_rows: dict[str, list[int]] = {}
    for i, f in enumerate(files):
        file_rows.setdefault(f, []).append(i)
    new_name: dict[str, str] = {}
    shapes: dict[str, tuple[int, int]] = {}
    dst_seen: dict[str, str] = {}
    for f, rows in file_rows.items():
        src = Path(f) if Path(f).is_absolute() else project / f
        _check_exists(src)
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
        if kind == "particles":
            top = max(int(idx_text[r]) for r in rows)
            if top > header.nz or min(int(idx_text[r]) for r in rows) < 1:
                raise InputError(
                    f"the STAR file asks for image {top} but the stack holds {header.nz}; "
                    "the STAR file and the stack do not match",
                    path=src,
                )
        pixel = _check_pixel(star, pixels[gs[0]], src, apix)
        dst = _out_path(f, out_dir)
        if _same_file(src, dst):
            raise InputError("--out would overwrite this input; choose another directory", src)
        if str(dst) in dst_seen:
            raise InputError(
                f"{dst_seen[str(dst)]} and {f} would both be written to {dst}; give their "
                "STAR file relative paths or use separate runs",
                path=star,
            )
        dst_seen[str(dst)] = f
        plan.tasks.append(_task(src, dst, first, pixel, opts))
        plan.files.append((str(src), str(dst)))
        new_name[f] = _star_name(dst, project)
    if kind == "particles":
        df[name_col] = [f"{i}@{new_name[f]}" for i, f in zip(idx_text, files, strict=True)]
    else:
        df[name_col] = [new_name[f] for f in files]

    # ---------------------------------------------------------------- geometry of the rows
    ug = np.array(sorted(mats), dtype=np.int64)
    row_m = np.stack([mats[int(g)].array for g in ug])[np.searchsorted(ug, groups)]  # (n, 2, 2)
    transformed: list[str] = [name_col]
    if "rlnCoordinateX" in df.columns and "rlnCoordinateY" in df.columns:
        x = _numeric(star, df, "rlnCoordinateX", key)
        y = _numeric(star, df, "rlnCoordinateY", key)
        mic_shape = _micrograph_shapes(star, df, key, kind, files, shapes, micrograph_size, project)
        nx_, ny_ = np.empty(len(df)), np.empty(len(df))
        for combo in sorted({(int(g), mic_shape[i]) for i, g in enumerate(groups)}):
            g, shp = combo
            sel = (groups == g) & np.array([s == shp for s in mic_shape])
            nx_[sel], ny_[sel] = correct_coordinates(
                x[sel], y[sel], mats[g], shp, keep_pixel_size=keep
            )
        df["rlnCoordinateX"], df["rlnCoordinateY"] = nx_, ny_
        transformed += ["rlnCoordinateX", "rlnCoordinateY"]
    for cx, cy, unit in (
        ("rlnOriginXAngst", "rlnOriginYAngst", "angstrom"),
        ("rlnOriginX", "rlnOriginY", "pixel"),
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
    if all(c in df.columns for c in _DEFOCUS_COLUMNS):
        sel = np.array([to_true[int(g)] for g in groups])
        if sel.any():
            u, v, ang = (_numeric(star, df, c, key) for c in _DEFOCUS_COLUMNS)
            nu, nv, na = defocus_table_to_true(u[sel], v[sel], ang[sel], row_m[sel])
            u, v, ang = u.copy(), v.copy(), ang.copy()
            u[sel], v[sel], ang[sel] = nu, nv, na
            df["rlnDefocusU"], df["rlnDefocusV"], df["rlnDefocusAngle"] = u, v, ang
            transformed += list(_DEFOCUS_COLUMNS)
            if "rlnCtfAstigmatism" in df.columns:
                df["rlnCtfAstigmatism"] = u - v
                transformed.append("rlnCtfAstigmatism")

    # ---------------------------------------------------------------- pixel sizes and matrices
    scale = {g: (1.0 if keep else m.scale) for g, m in mats.items()}
    if optics is not None:
        og = (
            _numeric(star, optics, "rlnOpticsGroup", "optics").astype(np.int64)
            if "rlnOpticsGroup" in optics.columns
            else np.arange(1, len(optics) + 1)
        )
        fac = np.array([scale.get(int(g), 1.0) for g in og])
        used = np.array([int(g) in mats for g in og])
        for col in _PIXEL_COLUMNS:
            if col in optics.columns:
                optics[col] = _numeric(star, optics, col, "optics") / fac
        for label, val in zip(RELION_MAGMAT_LABELS, (1.0, 0.0, 0.0, 1.0), strict=True):
            if label in optics.columns:
                old = _numeric(star, optics, label, "optics")
                optics[label] = np.where(used, val, old)
            else:  # absent means identity for every group
                optics[label] = val
        blocks["optics"] = optics
    else:
        fac = np.array([scale[int(g)] for g in groups])
        cols = [c for c in _PIXEL_COLUMNS if c in df.columns]
        for col in cols:
            df[col] = _numeric(star, df, col, key) / fac
        if not cols and "rlnMagnification" in df.columns and "rlnDetectorPixelSize" in df.columns:
            df["rlnMagnification"] = _numeric(star, df, "rlnMagnification", key) * fac
        plan.warnings.append(
            "RELION 3.0 layout (no data_optics): no _rlnMagMat could be written (identity is "
            "implied)"
        )
    blocks[key] = df
    plan.transformed = transformed
    out_star = Path(plan.star)

    def write() -> None:
        import starfile

        with atomic_path(out_star) as tmp:
            starfile.write(blocks, tmp, float_format="%.6f", sep=" ", overwrite=True)
            # RELION 3.1+ heads every block with its version line; drop starfile's banner
            lines = tmp.read_text(encoding="utf-8").splitlines()
            text = []
            for line in lines:
                if line.startswith("# Created by the starfile"):
                    continue
                if line.startswith("data_"):
                    text += [_STAR_VERSION, ""]
                text.append(line)
            tmp.write_text("\n".join(text).lstrip("\n") + "\n", encoding="utf-8")

    plan.write_star = write
    return plan


def _micrograph_shapes(
    star: Path,
    df: pd.DataFrame,
    key: str,
    kind: str,
    files: list[str],
    shapes: dict[str, tuple[int, int]],
    micrograph_size: tuple[int, int] | None,
    project: Path,
) -> list[tuple[int, int]]:
    """``(ny, nx)`` of the micrograph of every row, for the coordinate transform."""
    if kind == "micrographs":
        return [shapes[f] for f in files]
    if micrograph_size is not None:
        nx, ny = micrograph_size
        return [(int(ny), int(nx))] * len(df)
    if "rlnMicrographName" not in df.columns:
        raise InputError(
            "cannot transform _rlnCoordinateX/Y without the micrograph size: there is no "
            "_rlnMicrographName column; give --micrograph-size NX NY",
            path=star,
        )
    cache: dict[str, tuple[int, int]] = {}
    out = []
    for name in df["rlnMicrographName"].astype(str).tolist():
        name = _strip_type_tag(name)
        if name not in cache:
            p = Path(name) if Path(name).is_absolute() else project / name
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


# ============================================================================ the job
def _run_tasks(tasks: list[FileTask], jobs: int, on_file: Callable[[FileTask, int], None]) -> int:
    total = 0
    if jobs <= 1 or len(tasks) <= 1:
        for t in tasks:
            n = correct_file(t)
            total += n
            on_file(t, n)
        return total
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context(
        "fork" if sys.platform == "linux" and "fork" in methods else "spawn"
    )
    with ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=ctx) as pool:
        futures = {pool.submit(correct_file, t): t for t in tasks}
        try:
            for fut in as_completed(futures):
                t = futures[fut]
                try:
                    n = fut.result()
                except AnisoctfError:
                    raise
                except Exception as exc:  # noqa: BLE001 - e.g. a worker killed by the OS
                    raise InputError(f"internal error: {type(exc).__name__}: {exc}", t.src) from exc
                total += n
                on_file(t, n)
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    return total


def run_correct(
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    mag: MagMat | None,
    *,
    method: str = DEFAULT_METHOD,
    keep_pixel_size: bool = False,
    jobs: int = 1,
    apix: float | None = None,
    micrograph_size: tuple[int, int] | None = None,
    project_dir: str | os.PathLike[str] | None = None,
    on_file: Callable[[FileTask, int], None] | None = None,
) -> CorrectSummary:
    """Correct MRC files, or the files of one STAR file, into ``out_dir`` (see module notes).

    Parameters
    ----------
    inputs
        MRC files and/or glob patterns, or exactly one ``.star`` file.
    out_dir
        Output directory (created when missing).
    mag
        ``M`` (``k_true = M k_obs``); None takes each optics group's ``_rlnMagMat`` (STAR only).
    method, keep_pixel_size
        As :func:`~anisoctf.magnification.resample.correct_image`.
    jobs
        Files corrected in parallel (worker processes).
    apix
        Pixel size (Å) of the inputs, overriding the STAR file and the headers.
    micrograph_size
        ``(nx, ny)`` of the micrographs, for particle coordinates when the micrograph files
        cannot be read.
    project_dir
        Directory the STAR file's paths are relative to (default: the current directory).
    on_file
        Called with each task and its number of images when its file is written.

    Raises
    ------
    InputError
        Anything wrong with the inputs or the options (one line); nothing has been written when
        the problem is found before the images are read (missing files, mismatched STAR).
    """
    if method not in METHODS:
        raise InputError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    if jobs < 1:
        raise InputError(f"--jobs must be at least 1, got {jobs}")
    if apix is not None and not (math.isfinite(apix) and apix > 0):
        raise InputError(f"--apix must be a positive number of Å, got {apix}")
    if micrograph_size is not None and min(micrograph_size) < 1:
        raise InputError(f"--micrograph-size must be positive, got {micrograph_size}")
    paths = _expand(inputs)
    if not paths:
        raise InputError("no input files; give MRC files, glob patterns or one .star file")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError("--out exists and is not a directory", path=out)
    opts = {"method": method, "keep_pixel_size": bool(keep_pixel_size)}
    stars = [p for p in paths if p.suffix.lower() == ".star"]
    if stars:
        if len(paths) != 1:
            raise InputError("give one STAR file on its own (not with other inputs)")
        _check_exists(stars[0])
        project = Path(project_dir) if project_dir is not None else Path.cwd()
        plan = _plan_star(stars[0], out, mag, opts, apix, micrograph_size, project)
    else:
        if mag is None:
            raise InputError("give the matrix: --mag-matrix M00 M01 M10 M11 or --from-json FILE")
        plan = _plan_images(paths, out, mag, opts, apix)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for t in plan.tasks:
            Path(t.dst).parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(
            f"cannot create the output directory ({exc.strerror or exc})", out
        ) from exc
    n_images = _run_tasks(plan.tasks, jobs, on_file or (lambda t, n: None))
    if plan.write_star is not None:
        plan.write_star()
    return CorrectSummary(
        kind=plan.kind,
        files=tuple(plan.files),
        n_images=n_images,
        star=plan.star,
        n_rows=plan.n_rows,
        transformed=tuple(plan.transformed),
        warnings=tuple(plan.warnings),
        pixel_sizes=tuple(sorted({(t.pixel_size_in, t.pixel_size) for t in plan.tasks})),
    )
