"""Rewrite chosen cells of a STAR file in place, keeping everything else byte for byte.

RELION and other programs write STAR files with their own number formats, comments and column
numbering; a tool that changes a few columns must not reformat the rest. These helpers scan a
STAR file line by line (the same block/loop rules as the ``starfile`` reader), replace the
tokens of chosen columns in chosen rows (right-aligned in the old width), append new columns,
and write the result atomically. Every replaced token is checked against the value the table
was parsed with, so a layout that cannot be rewritten safely is refused with one clear line.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from anisoctf._lazy import pandas as pd
from anisoctf.errors import InputError
from anisoctf.io import labels as L
from anisoctf.io.atomic import atomic_write
from anisoctf.optics.magmat import MagMat

__all__ = [
    "BlockEdit",
    "StarBlock",
    "block_index",
    "fmt_angle",
    "fmt_defocus",
    "fmt_exact",
    "patch_defocus_star",
    "star_layout",
    "write_patched_star",
]

_TOKEN = re.compile(r'"[^"]*"|\'[^\']*\'|\S+')


@dataclass
class StarBlock:
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


def star_layout(path: Path) -> list[StarBlock]:
    blocks: list[StarBlock] = []
    for line, b, kind, _ in _scan(_open_text(path)):
        if kind == "data":
            blocks.append(StarBlock(name=line.strip()[5:]))
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


def fmt_defocus(x: float) -> str:
    return f"{x:.6f}"


def fmt_angle(x: float) -> str:
    s = f"{x:.6f}"
    return "0.000000" if s == "180.000000" else s


def fmt_exact(x: float) -> str:
    return repr(float(x))


def _unquote(token: str) -> str:
    if len(token) >= 2 and token[0] == token[-1] and token[0] in "\"'":
        return token[1:-1]
    return token


@dataclass
class BlockEdit:
    """Changes to one block: new values for some cells, and new columns."""

    block: StarBlock
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


def _check_old(edit: BlockEdit, column: str, row: int, token: str, path: Path) -> None:
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


def _patch_row(edit: BlockEdit, line: str, row: int, path: Path) -> str:
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


def _patch_keyval(edit: BlockEdit, line: str, column: int, path: Path) -> str:
    """One ``_name value`` line of an edited simple block, rewritten if its value changes."""
    name = edit.block.columns[column]
    if name not in edit.replace or not edit.replace[name][0][0]:
        return line
    _, values, fmt = edit.replace[name]

    def check(i: int, token: str) -> None:
        _check_old(edit, name, 0, token, path)

    where = f"data_{edit.block.name} _{name}"
    return _patch(line, {1: fmt(float(values[0]))}, (), 2, where, path, check)


def write_patched_star(src: Path, dst: Path, edits: dict[int, BlockEdit]) -> None:
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


def block_index(path: Path, layout: list[StarBlock], name: str, df: pd.DataFrame) -> int:
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


_Replace = dict[str, tuple[np.ndarray, np.ndarray, Callable[[float], str]]]
_Append = list[tuple[str, np.ndarray, Callable[[float], str]]]


def patch_defocus_star(
    src: Path,
    dst: Path,
    block: str,
    table: pd.DataFrame,
    mask: np.ndarray,
    defocus: tuple[np.ndarray, np.ndarray, np.ndarray],
    optics: pd.DataFrame | None = None,
    magmats: Mapping[int, MagMat] | None = None,
    columns: Mapping[str, tuple[np.ndarray, Callable[[float], str]]] | None = None,
) -> None:
    """Copy ``src`` to ``dst`` with new defocus in some rows and new ``_rlnMagMat`` per group.

    The one rewrite behind ``aniso apply`` and ``refine``: in ``data_<block>`` (parsed as
    ``table``) the ``mask`` rows get ``defocus = (U, V, angle)`` (arrays over all rows;
    ``fmt_defocus``/``fmt_angle``) and ``_rlnCtfAstigmatism = U - V`` when the column exists;
    in ``data_optics`` (parsed as ``optics``) the groups of ``magmats`` get their matrix with
    full double precision, replacing ``_rlnMagMat00..11`` or appending the four columns (the
    identity, or the stored value, for other groups). ``columns`` (label → values over all
    rows, formatter) are set in the ``mask`` rows of ``data_<block>``: replaced where the column
    exists, else appended (rows outside ``mask`` get the value given for them). Every other byte
    is copied.
    """
    layout = star_layout(src)
    t_index = block_index(src, layout, block, table)
    u, v, ang = defocus
    replace: _Replace = {
        c: (mask, vals, fmt_angle if c == L.DEFOCUS_ANGLE else fmt_defocus)
        for c, vals in zip(L.DEFOCUS, (u, v, ang), strict=True)
    }
    if L.ASTIGMATISM in table.columns:
        replace[L.ASTIGMATISM] = (mask, np.asarray(u) - np.asarray(v), fmt_defocus)
    append: _Append = []
    for label, (vals, fmt) in (columns or {}).items():
        if label in table.columns:
            replace[label] = (mask, np.asarray(vals), fmt)
        else:
            append.append((label, np.asarray(vals), fmt))
    edits = {t_index: BlockEdit(layout[t_index], table, replace, append)}
    if optics is not None and magmats is not None:
        o_index = block_index(src, layout, "optics", optics)
        o_groups = (
            pd.to_numeric(optics[L.OPTICS_GROUP]).to_numpy(dtype=np.int64)
            if L.OPTICS_GROUP in optics.columns
            else np.arange(1, len(optics) + 1)
        )
        o_mask = np.isin(o_groups, np.array(sorted(magmats), dtype=np.int64))
        o_replace: _Replace = {}
        o_append: _Append = []
        for label, (i, j) in zip(L.MAGMAT, ((0, 0), (0, 1), (1, 0), (1, 1)), strict=True):
            if label in optics.columns:
                old = pd.to_numeric(optics[label], errors="coerce").to_numpy(dtype=np.float64)
            else:
                old = np.full(len(optics), 1.0 if i == j else 0.0)
            vals = np.array(
                [
                    magmats[g].array[i, j] if g in magmats else old[k]
                    for k, g in enumerate(o_groups.tolist())
                ],
                dtype=np.float64,
            )
            if label in optics.columns:
                o_replace[label] = (o_mask, vals, fmt_exact)
            else:
                o_append.append((label, vals, fmt_exact))
        edits[o_index] = BlockEdit(layout[o_index], optics, o_replace, o_append)
    write_patched_star(src, dst, edits)
