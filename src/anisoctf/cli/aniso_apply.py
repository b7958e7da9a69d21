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
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, NoReturn

import numpy as np
import typer
from rich.console import Console

from anisoctf._lazy import pandas as pd
from anisoctf.cli.options import FromJsonOption, MagMatrixOption
from anisoctf.errors import AnisoctfError, InputError
from anisoctf.io.atomic import atomic_write
from anisoctf.io.cryosparc import CSDAT_MAGIC, NUMPY_MAGIC, read_cs, write_cs
from anisoctf.io.star import read_star_blocks
from anisoctf.magnification.matrix import RELION_MAGMAT_LABELS, MagMat
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


# ============================================================================ STAR text layout
_TOKEN = re.compile(r'"[^"]*"|\'[^\']*\'|\S+')


@dataclass
class _Block:
    """What the line scanner saw of one ``data_`` block."""

    name: str
    loop: bool = False
    columns: list[str] = field(default_factory=list)
    numbered: bool = False  # column lines look like "_rlnFoo #3"
    n_rows: int = 0


def _scan(lines: Iterable[str]) -> Iterator[tuple[str, int, str, int]]:
    """Classify every line: ``(line, block index, kind, index)``.

    Kinds: ``"data"`` (a ``data_`` line), ``"loop"``, ``"coldef"`` (index = column),
    ``"row"`` (index = row), ``"keyval"`` (a ``_name value`` line of a simple block; index =
    column) and ``"other"`` (blank lines, comments, anything before the first block). The rules
    follow the ``starfile`` reader: a block is a loop if ``loop_`` comes before any ``_name``
    line; its column lines are the ``_`` lines right after ``loop_``; every other non-blank,
    non-comment line up to the next ``data_`` is a row.
    """
    block = -1
    state = "none"
    col = row = 0
    for line in lines:
        s = line.strip()
        if s.startswith("data_"):
            block += 1
            state, col, row = "start", 0, 0
            yield line, block, "data", 0
        elif block < 0 or not s or s.startswith("#"):
            yield line, block, "other", 0
        elif state == "start" and s.startswith("loop_"):
            state = "header"
            yield line, block, "loop", 0
        elif state in ("start", "simple") and s.startswith("_"):
            state = "simple"
            yield line, block, "keyval", col
            col += 1
        elif state == "header" and s.startswith("_"):
            yield line, block, "coldef", col
            col += 1
        elif state in ("header", "rows"):
            state = "rows"
            yield line, block, "row", row
            row += 1
        else:
            yield line, block, "other", 0


def _open_text(path: Path) -> Iterator[str]:
    """Lines of a text file with their original endings."""
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            yield from fh
    except UnicodeDecodeError as exc:
        raise InputError("not a text STAR file (not UTF-8)", path=path) from exc
    except OSError as exc:
        raise InputError(f"cannot read ({exc.strerror or exc})", path=path) from exc


def _layout(path: Path) -> list[_Block]:
    blocks: list[_Block] = []
    for line, b, kind, _ in _scan(_open_text(path)):
        if kind == "data":
            blocks.append(_Block(name=line.strip()[5:]))
        elif kind == "loop":
            blocks[b].loop = True
        elif kind in ("coldef", "keyval"):
            tokens = line.split()
            blocks[b].columns.append(tokens[0][1:])
            if kind == "coldef" and len(tokens) > 1 and tokens[1].startswith("#"):
                blocks[b].numbered = True
        elif kind == "row":
            blocks[b].n_rows += 1
    return blocks


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


# ============================================================================ STAR patching
def _fmt_defocus(x: float) -> str:
    return f"{x:.6f}"


def _fmt_angle(x: float) -> str:
    s = f"{x:.6f}"
    return "0.000000" if s == "180.000000" else s


def _fmt_exact(x: float) -> str:
    return repr(float(x))


def _unquote(token: str) -> str:
    if len(token) >= 2 and token[0] == token[-1] and token[0] in "\"'":
        return token[1:-1]
    return token


@dataclass
class _BlockEdit:
    """Changes to one block: new values for some cells, and new columns."""

    block: _Block
    table: pd.DataFrame  # the values as read (for the consistency check)
    # column name -> (row mask, new values (aligned with the table), formatter)
    replace: dict[str, tuple[np.ndarray, np.ndarray, Callable[[float], str]]]
    # new column names, their values (aligned with the table) and formatter
    append: list[tuple[str, np.ndarray, Callable[[float], str]]]
    # token index of each replaced column, and the reverse
    positions: dict[str, int] = field(init=False)
    names: dict[int, str] = field(init=False)
    # the replaced columns as read, as float64 (NaN for text), for the consistency check
    old: dict[str, np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        index = {c: i for i, c in enumerate(self.block.columns)}
        self.positions = {n: index[n] for n in self.replace}
        self.names = {i: n for n, i in self.positions.items()}
        self.old = {
            n: pd.to_numeric(self.table[n], errors="coerce").to_numpy(dtype=np.float64)
            for n in self.replace
        }


def _split_eol(line: str) -> tuple[str, str]:
    body = line.rstrip("\r\n")
    return body, line[len(body) :]


def _check_old(edit: _BlockEdit, column: str, row: int, token: str, path: Path) -> None:
    """The token about to be replaced must be the value the table was read with."""
    b = float(edit.old[column][row])
    try:
        a = float(_unquote(token))
    except ValueError:
        a = math.nan
    if not (math.isfinite(a) and math.isfinite(b) and abs(a - b) <= 1e-9 * max(abs(b), 1.0)):
        raise InputError(
            f"data_{edit.block.name} row {row + 1}: the text {token!r} of _{column} does not "
            f"match the parsed value {edit.table[column].iloc[row]!r}; the file has a layout "
            "anisoctf cannot rewrite safely",
            path=path,
        )


def _patch(
    line: str,
    cells: dict[int, str],
    extra: Sequence[str],
    expect: int | None,
    where: str,
    path: Path,
    check: Callable[[int, str], None] | None = None,
) -> str:
    """``line`` with tokens ``cells[i]`` replaced (right-aligned in the old width) and ``extra``
    tokens appended; a trailing ``#`` comment and the line ending are kept."""
    body, eol = _split_eol(line)
    hash_at = body.find("#")
    content, comment = (body, "") if hash_at < 0 else (body[:hash_at], body[hash_at:])
    spans = [m.span() for m in _TOKEN.finditer(content)]
    if expect is not None and len(spans) != expect:
        raise InputError(
            f"{where} has {len(spans)} values for {expect} columns; the file is truncated or "
            "malformed",
            path=path,
        )
    pieces: list[str] = []
    pos = 0
    for i, (s, e) in enumerate(spans):
        if i in cells:
            if check is not None:
                check(i, content[s:e])
            new = cells[i]
            pieces.append(content[pos:s])
            pieces.append(new.rjust(e - s) if len(new) < e - s else new)
            pos = e
    pieces.append(content[pos:])
    out = "".join(pieces)
    if extra:
        out = out.rstrip() + " " + " ".join(extra) + (" " if comment else "")
    return out + comment + eol


def _patch_row(edit: _BlockEdit, line: str, row: int, path: Path) -> str:
    """One data row of an edited loop block, rewritten."""
    blk = edit.block
    cells: dict[int, str] = {}
    for name, (mask, values, fmt) in edit.replace.items():
        if mask[row]:
            cells[edit.positions[name]] = fmt(float(values[row]))
    extra = [fmt(float(values[row])) for _, values, fmt in edit.append]

    def check(i: int, token: str) -> None:
        _check_old(edit, edit.names[i], row, token, path)

    where = f"data_{blk.name} row {row + 1}"
    return _patch(line, cells, extra, len(blk.columns), where, path, check)


def _patch_keyval(edit: _BlockEdit, line: str, column: int, path: Path) -> str:
    """One ``_name value`` line of an edited simple block, rewritten if its value changes."""
    name = edit.block.columns[column]
    if name not in edit.replace or not edit.replace[name][0][0]:
        return line
    _, values, fmt = edit.replace[name]

    def check(i: int, token: str) -> None:
        _check_old(edit, name, 0, token, path)

    where = f"data_{edit.block.name} _{name}"
    return _patch(line, {1: fmt(float(values[0]))}, (), 2, where, path, check)


def _write_star(src: Path, dst: Path, edits: dict[int, _BlockEdit]) -> None:
    """Copy ``src`` to ``dst`` line by line, applying ``edits`` (keyed by block index)."""
    with atomic_write(dst, "w") as fh:
        for line, b, kind, idx in _scan(_open_text(src)):
            edit = edits.get(b)
            if edit is None or kind in ("data", "loop", "other"):
                fh.write(line)
                continue
            blk = edit.block
            eol = _split_eol(line)[1] or "\n"
            last = idx == len(blk.columns) - 1
            if kind == "coldef":
                fh.write(line)
                if last:
                    for k, (name, _, _) in enumerate(edit.append):
                        num = f" #{len(blk.columns) + k + 1}" if blk.numbered else ""
                        fh.write(f"_{name}{num}{eol}")
            elif kind == "row":
                fh.write(_patch_row(edit, line, idx, src))
            elif kind == "keyval":
                fh.write(_patch_keyval(edit, line, idx, src))
                if last:
                    for name, values, fmt in edit.append:
                        fh.write(f"_{name} {fmt(float(values[0]))}{eol}")


def _block_index(path: Path, layout: list[_Block], name: str, df: pd.DataFrame) -> int:
    """Index of block ``name`` in ``layout``, checked against the parsed table."""
    hits = [i for i, b in enumerate(layout) if b.name == name]
    if len(hits) != 1:
        raise InputError(f"{len(hits)} blocks named data_{name}; the file is malformed", path=path)
    blk = layout[hits[0]]
    n_rows = blk.n_rows if blk.loop else 1
    if blk.columns != [str(c) for c in df.columns] or n_rows != len(df):
        raise InputError(
            f"data_{name} could not be read consistently ({len(blk.columns)} columns and "
            f"{n_rows} rows in the text, {df.shape[1]} and {len(df)} parsed); the file has a "
            "layout anisoctf cannot rewrite safely",
            path=path,
        )
    return hits[0]


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
    layout = _layout(src)
    resolved = resolve_relion_mags(optics, table, mag, optics_groups=optics_groups)
    new_optics, new_table = apply_to_relion(
        optics, table, mag, shared_astigmatism=shared, optics_groups=optics_groups
    )
    groups = relion_row_groups(optics, table)
    mask = np.isin(groups, np.array(sorted(resolved), dtype=np.int64))

    edits: dict[int, _BlockEdit] = {}
    t_index = _block_index(src, layout, key, table)
    replace = {
        c: (mask, new_table[c].to_numpy(), _fmt_angle if c == "rlnDefocusAngle" else _fmt_defocus)
        for c in RELION_DEFOCUS_COLUMNS
    }
    if RELION_ASTIGMATISM_COLUMN in table.columns:
        replace[RELION_ASTIGMATISM_COLUMN] = (
            mask,
            new_table[RELION_ASTIGMATISM_COLUMN].to_numpy(),
            _fmt_defocus,
        )
    edits[t_index] = _BlockEdit(layout[t_index], table, replace, [])

    warnings: list[str] = []
    if optics is not None and new_optics is not None:
        o_index = _block_index(src, layout, "optics", optics)
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
                o_replace[label] = (o_mask, values, _fmt_exact)
            else:
                o_append.append((label, values, _fmt_exact))
        edits[o_index] = _BlockEdit(layout[o_index], optics, o_replace, o_append)
    else:
        warnings.append(
            "RELION 3.0 layout (no data_optics): the defocus was rewritten into the true frame "
            "but the matrix could not be stored, so the table is right only for images "
            f"resampled into the true frame (true pixel size = pixel size / {mag.scale:.5f}); "
            "convert the file with relion_convert_star and apply to that to keep the matrix"
        )
    _write_star(src, dst, edits)
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
