"""``anisoctf aniso apply``: write a CTF table's defocus in the true frame, with its matrix.

::

    anisoctf aniso apply TABLE (--mag-matrix M00 M01 M10 M11 | --from-json det.json) --out NEW
                         [--per-particle | --shared-astigmatism] [--optics-group N ...]

``TABLE`` is a RELION STAR file (micrographs or particles, 3.0 or 3.1+ layout) or a cryoSPARC
``.cs`` file (recognised by its content). The matrix is RELION's ``_rlnMagMat``
(``k_true = M k_obs``), given as four numbers or as the ``mag_matrix`` of an
``anisoctf aniso detect`` JSON file. The work is done by
:mod:`anisoctf.magnification.tables` (conventions there); this module reads and writes files.

STAR output keeps the input's text: every line of every block is copied as it was, except the
rewritten values (``_rlnDefocusU/V/Angle`` and ``_rlnCtfAstigmatism`` of the rewritten rows,
6 decimals like RELION) and the ``_rlnMagMat00..11`` columns, which are added at the end of
``data_optics`` (or replaced for the selected groups) with full double precision. The tokens of
each rewritten row are checked against the values the table was read with before anything is
written. A RELION 3.0 file (no ``data_optics``) cannot store a matrix: its defocus is rewritten
and a warning says so. ``.cs`` output keeps the input's dtype and header bytes
(:mod:`anisoctf.io.cryosparc`); a dataset without ``ctf/anisomag`` gets the field.

The input is never modified and ``--out`` may not name it. The output is written atomically.
On success one summary line goes to stdout; bad input gives one ``error:`` line on stderr and
exit status 2.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, NoReturn

import numpy as np
import typer
from rich.console import Console

from anisoctf._lazy import pandas as pd
from anisoctf.cli.options import FromJsonOption, MagMatrixOption
from anisoctf.errors import AnisoctfError, InputError
from anisoctf.io.cryosparc import CSDAT_MAGIC, NUMPY_MAGIC, read_cs, write_cs
from anisoctf.io.star import read_star_blocks
from anisoctf.io.star_patch import (
    BlockEdit,
    block_index,
    fmt_angle,
    fmt_defocus,
    fmt_exact,
    star_layout,
    write_patched_star,
)
from anisoctf.magnification.tables import (
    CRYOSPARC_ANISOMAG_FIELD,
    RELION_ASTIGMATISM_COLUMN,
    RELION_DEFOCUS_COLUMNS,
    apply_to_cryosparc,
    apply_to_relion,
    cryosparc_row_mask,
    relion_row_groups,
    resolve_relion_mags,
)
from anisoctf.optics.magmat import RELION_MAGMAT_LABELS, MagMat

__all__ = ["apply_command", "load_detect_json", "run_apply"]


# ============================================================================ matrix input
def load_detect_json(path: str | os.PathLike[str]) -> MagMat:
    """The ``mag_matrix`` (2×2, RELION convention) of an ``anisoctf aniso detect`` JSON file.

    A flat list of four numbers (M00, M01, M10, M11) is accepted too.

    Raises
    ------
    InputError
        Unreadable file, invalid JSON, no ``mag_matrix`` key, or not a valid matrix.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise InputError("file not found; check the path", path=p) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read ({exc})", path=p) from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON ({exc})", path=p) from exc
    if not isinstance(data, dict) or "mag_matrix" not in data:
        raise InputError(
            "no 'mag_matrix' key; give the JSON written by 'anisoctf aniso detect'", path=p
        )
    raw = data["mag_matrix"]
    try:
        m = np.asarray(raw, dtype=float)
        if m.shape == (4,):
            m = m.reshape(2, 2)
        return MagMat(m)
    except (TypeError, ValueError) as exc:
        raise InputError(f"'mag_matrix' {raw!r} is not a valid 2x2 matrix ({exc})", path=p) from exc


# ============================================================================ STAR tables
def _read_star(path: Path) -> dict[str, pd.DataFrame]:
    """Every block of a STAR file as a DataFrame (simple blocks as one row)."""
    return read_star_blocks(path, names_as_strings=False)


def _find_ctf_block(path: Path, blocks: dict[str, pd.DataFrame]) -> str:
    """Name of the block with the defocus columns: particles, micrographs, unnamed, any other."""
    order = ["particles", "micrographs", ""] + [
        k for k in blocks if k not in ("particles", "micrographs", "", "optics")
    ]
    with_defocus = [k for k in order if k in blocks and RELION_DEFOCUS_COLUMNS[0] in blocks[k]]
    if len(with_defocus) > 1:
        raise InputError(
            f"{' and '.join(f'data_{k}' for k in with_defocus)} all carry _rlnDefocusU; give "
            "a file with one CTF table",
            path=path,
        )
    for key in order:
        df = blocks.get(key)
        if df is not None and RELION_DEFOCUS_COLUMNS[0] in df.columns:
            missing = [c for c in RELION_DEFOCUS_COLUMNS if c not in df.columns]
            if missing:
                raise InputError(
                    f"data_{key} lacks {', '.join('_' + c for c in missing)}; give a table with "
                    "CTF values",
                    path=path,
                )
            return key
    found = ", ".join(f"data_{k}" for k in blocks)
    raise InputError(
        f"no _rlnDefocusU column in any data block (found {found}); give a table with CTF values "
        "(micrographs_ctf.star or a particles STAR file)",
        path=path,
    )


@dataclass(frozen=True)
class ApplySummary:
    """What :func:`run_apply` did (for the summary line and for tests)."""

    kind: str  # "relion" or "cryosparc"
    n_rows: int
    n_rewritten: int
    groups: tuple[int, ...]
    matrix: MagMat
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def _apply_star(
    src: Path,
    dst: Path,
    mag: MagMat,
    shared: bool,
    optics_groups: Sequence[int] | None,
) -> ApplySummary:
    blocks = _read_star(src)
    key = _find_ctf_block(src, blocks)
    table = blocks[key]
    optics = blocks.get("optics")
    layout = star_layout(src)
    resolved = resolve_relion_mags(optics, table, mag, optics_groups=optics_groups)
    new_optics, new_table = apply_to_relion(
        optics, table, mag, shared_astigmatism=shared, optics_groups=optics_groups
    )
    groups = relion_row_groups(optics, table)
    mask = np.isin(groups, np.array(sorted(resolved), dtype=np.int64))

    edits: dict[int, BlockEdit] = {}
    t_index = block_index(src, layout, key, table)
    replace = {
        c: (mask, new_table[c].to_numpy(), fmt_angle if c == "rlnDefocusAngle" else fmt_defocus)
        for c in RELION_DEFOCUS_COLUMNS
    }
    if RELION_ASTIGMATISM_COLUMN in table.columns:
        replace[RELION_ASTIGMATISM_COLUMN] = (
            mask,
            new_table[RELION_ASTIGMATISM_COLUMN].to_numpy(),
            fmt_defocus,
        )
    edits[t_index] = BlockEdit(layout[t_index], table, replace, [])

    warnings: list[str] = []
    if optics is not None and new_optics is not None:
        o_index = block_index(src, layout, "optics", optics)
        o_groups = (
            pd.to_numeric(optics["rlnOpticsGroup"]).to_numpy(dtype=np.int64)
            if "rlnOpticsGroup" in optics.columns
            else np.arange(1, len(optics) + 1)
        )
        o_mask = np.isin(o_groups, np.array(sorted(resolved), dtype=np.int64))
        o_replace: dict[str, tuple[np.ndarray, np.ndarray, Callable[[float], str]]] = {}
        o_append: list[tuple[str, np.ndarray, Callable[[float], str]]] = []
        for label in RELION_MAGMAT_LABELS:
            values = new_optics[label].to_numpy(dtype=np.float64)
            if label in optics.columns:
                o_replace[label] = (o_mask, values, fmt_exact)
            else:
                o_append.append((label, values, fmt_exact))
        edits[o_index] = BlockEdit(layout[o_index], optics, o_replace, o_append)
    else:
        warnings.append(
            "RELION 3.0 layout (no data_optics): the defocus was rewritten into the true frame "
            "but the matrix could not be stored, so the table is right only for images "
            f"resampled into the true frame (true pixel size = pixel size / {mag.scale:.5f}); "
            "convert the file with relion_convert_star and apply to that to keep the matrix"
        )
    write_patched_star(src, dst, edits)
    return ApplySummary(
        kind="relion",
        n_rows=len(table),
        n_rewritten=int(mask.sum()),
        groups=tuple(sorted(resolved)),
        matrix=mag,
        warnings=tuple(warnings),
    )


def _apply_cs(
    src: Path,
    dst: Path,
    mag: MagMat,
    shared: bool,
    groups: Sequence[int] | None,
) -> ApplySummary:
    cs = read_cs(src)
    try:
        new = apply_to_cryosparc(cs.array, mag, shared_astigmatism=shared, exposure_groups=groups)
    except InputError as exc:
        raise InputError(str(exc), path=src) from exc
    mask = cryosparc_row_mask(cs.array, groups)
    notes: list[str] = []
    if CRYOSPARC_ANISOMAG_FIELD not in cs.fields:
        notes.append(f"added the {CRYOSPARC_ANISOMAG_FIELD} field")
    write_cs(dst, new, header=cs.header)
    return ApplySummary(
        kind="cryosparc",
        n_rows=len(cs),
        n_rewritten=int(mask.sum()),
        groups=tuple(sorted({int(g) for g in groups})) if groups else (),
        matrix=mag,
        notes=tuple(notes),
    )


def _is_cryosparc(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(NUMPY_MAGIC))
    except OSError:
        return path.suffix.lower() == ".cs"
    return head in (NUMPY_MAGIC, CSDAT_MAGIC)


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def run_apply(
    table: str | os.PathLike[str],
    out: str | os.PathLike[str],
    mag: MagMat,
    *,
    shared_astigmatism: bool = False,
    optics_groups: Sequence[int] | None = None,
) -> ApplySummary:
    """Rewrite ``table`` into ``out`` (see the module notes); the function behind the command.

    Raises
    ------
    InputError
        Anything wrong with the input, the options or the output path (one line).
    """
    src, dst = Path(table), Path(out)
    if not src.exists():
        raise InputError("file not found; check the path", path=src)
    if src.is_dir():
        raise InputError("is a directory; give a STAR or .cs file", path=src)
    if _same_file(src, dst):
        raise InputError("--out names the input file; give a new file name", path=dst)
    parent = dst.parent if str(dst.parent) else Path(".")
    if not parent.is_dir():
        raise InputError("the output directory does not exist; create it first", path=dst)
    if dst.is_dir():
        raise InputError("--out is a directory; give a file name", path=dst)
    groups = list(optics_groups) if optics_groups else None
    if _is_cryosparc(src):
        if dst.suffix.lower() == ".star":
            raise InputError("the input is a cryoSPARC .cs file; --out must not be a .star", dst)
        return _apply_cs(src, dst, mag, shared_astigmatism, groups)
    if dst.suffix.lower() == ".cs":
        raise InputError("the input is a STAR file; --out must not be a .cs file", path=dst)
    try:
        return _apply_star(src, dst, mag, shared_astigmatism, groups)
    except InputError as exc:
        if exc.path is None:
            raise InputError(str(exc), path=src) from exc
        raise


# ============================================================================ command
def _fail(message: str) -> NoReturn:
    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"error: {' '.join(str(message).split())}", markup=False
    )
    raise typer.Exit(2)


def _summary_line(out: Path, s: ApplySummary) -> str:
    m = s.matrix
    scope = f"optics group(s) {', '.join(map(str, s.groups))}" if s.groups else "all rows"
    if s.kind == "cryosparc":
        scope = f"exposure group(s) {', '.join(map(str, s.groups))}" if s.groups else "all rows"
    line = (
        f"{out}: {s.n_rewritten} of {s.n_rows} rows rewritten into the true frame ({scope}); "
        f"anisotropy {m.anisotropy_percent:.3f} % along {m.axis_deg:.1f} deg, "
        f"scale {m.scale:.5f}"
    )
    if s.notes:
        line += "; " + "; ".join(s.notes)
    return line


def apply_command(
    table: Annotated[
        Path,
        typer.Argument(
            metavar="TABLE",
            help="RELION STAR file (micrographs or particles, 3.0 or 3.1+) or cryoSPARC .cs "
            "file with observed-frame CTF values.",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="New file to write (never the input).", show_default=False
        ),
    ],
    mag_matrix: MagMatrixOption = None,
    from_json: FromJsonOption = None,
    shared_astigmatism: Annotated[
        bool,
        typer.Option(
            "--shared-astigmatism/--per-particle",
            help="After the transform, give all particles of a micrograph the micrograph's "
            "median astigmatism (each keeps its own mean defocus); default: per particle.",
        ),
    ] = False,
    optics_group: Annotated[
        list[int] | None,
        typer.Option(
            "--optics-group",
            help="Only rewrite this optics group (cryoSPARC: ctf/exp_group_id); repeat for "
            "several. Default: all.",
            show_default=False,
        ),
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No summary line or warnings.")
    ] = False,
) -> None:
    """Rewrite a CTF table's defocus into the true frame and store the magnification matrix.

    Exit status: 0 written, 2 bad options or input (one line on stderr; nothing written).
    """
    if (mag_matrix is None) == (from_json is None):
        _fail("give exactly one of --mag-matrix M00 M01 M10 M11 and --from-json FILE")
    try:
        if mag_matrix is not None:
            try:
                mag = MagMat(((mag_matrix[0], mag_matrix[1]), (mag_matrix[2], mag_matrix[3])))
            except ValueError as exc:
                raise InputError(f"--mag-matrix: {exc}") from exc
        else:
            assert from_json is not None
            mag = load_detect_json(from_json)
        summary = run_apply(
            table, out, mag, shared_astigmatism=shared_astigmatism, optics_groups=optics_group
        )
    except AnisoctfError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"{out}: cannot write ({exc.strerror or exc})")
    if not quiet:
        err = Console(stderr=True, highlight=False, soft_wrap=True)
        for w in summary.warnings:
            err.print(f"warning: {w}", markup=False)
        Console(highlight=False, soft_wrap=True).print(_summary_line(out, summary), markup=False)
