"""STAR files as tables: parsing, finding the table that holds a column, typed columns, loops.

The one place that calls ``starfile`` (and so pandas) for RELION STAR files. Readers of
particular kinds of table (:mod:`anisoctf.io.star`, :mod:`anisoctf.io.star_optics`,
:mod:`anisoctf.io.particles`) build on these helpers; :mod:`anisoctf.io.star_patch` rewrites
cells of a parsed table in the text. Column names are the labels of :mod:`anisoctf.io.labels`
(``starfile`` drops the leading underscore).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from anisoctf._lazy import pandas as pd
from anisoctf.errors import InputError
from anisoctf.io import labels as L
from anisoctf.io.atomic import atomic_path

if TYPE_CHECKING:
    from pandas import DataFrame as StarTable
else:
    StarTable = Any  # a parsed STAR table (``pandas.DataFrame``), for type hints outside io

__all__ = [
    "STAR_VERSION",
    "StarTable",
    "column_list",
    "find_block",
    "find_table",
    "float_column",
    "fmt_float",
    "format_loop",
    "int_column",
    "is_table",
    "numbers",
    "numeric_column",
    "optional_floats",
    "read_star_blocks",
    "read_star_file",
    "read_star_raw",
    "star_token",
    "strict_numbers",
    "string_column",
    "strip_type_tag",
    "write_star_tables",
]

#: RELION 3.1+ heads every block with this line
STAR_VERSION = "# version 30001"


def column_list(names: Iterable[str]) -> str:
    """Format column names the way they appear in a STAR file (``_rlnA, _rlnB``)."""
    return ", ".join(f"_{n}" for n in names)


# ============================================================================ parsing
def read_star_blocks(
    path: str | os.PathLike[str], *, names_as_strings: bool = True
) -> dict[str, pd.DataFrame]:
    """Every block of a STAR file as a table (simple key/value blocks become one-row tables).

    Unreadable, missing or empty files raise a one-line :class:`InputError`. With
    ``names_as_strings`` the file-name columns (:data:`anisoctf.io.labels.STRING_COLUMNS`) are
    kept as text (never parsed as numbers).
    """
    return read_star_file(path, names_as_strings=names_as_strings)[1]


def read_star_file(
    path: str | os.PathLike[str], *, names_as_strings: bool = True
) -> tuple[Path, dict[str, pd.DataFrame]]:
    """``(path, blocks)``: :func:`read_star_blocks` with the path as a :class:`~pathlib.Path`."""
    p = Path(path)
    if not p.exists():
        raise InputError("file not found; check the path", path=p)
    if p.is_dir():
        raise InputError("is a directory, not a STAR file; give the .star file itself", path=p)
    try:
        import starfile

        strings = list(L.STRING_COLUMNS) if names_as_strings else []
        raw = starfile.read(p, always_dict=True, parse_as_string=strings)
    except Exception as exc:  # starfile/pandas raise many types on malformed text
        raise InputError(
            f"not a readable STAR file ({type(exc).__name__}: {exc}); check the file", path=p
        ) from exc
    blocks: dict[str, pd.DataFrame] = {}
    for key, block in raw.items():
        if isinstance(block, pd.DataFrame):
            blocks[str(key)] = block
        elif isinstance(block, dict) and block:
            blocks[str(key)] = pd.DataFrame([block])
    if not blocks:
        raise InputError("no data blocks found: empty or not a STAR file; check the path", path=p)
    return p, blocks


def read_star_raw(path: Path) -> dict[str, object]:
    """The blocks of a STAR file exactly as ``starfile`` returns them (simple blocks as dicts),
    for a file that is rewritten whole (:func:`write_star_tables`)."""
    try:
        import starfile

        blocks = starfile.read(path, always_dict=True, parse_as_string=list(L.STRING_COLUMNS))
    except Exception as exc:  # starfile/pandas raise many types on malformed text
        raise InputError(
            f"not a readable STAR file ({type(exc).__name__}: {exc}); check the file", path=path
        ) from exc
    if not blocks:
        raise InputError("no data blocks found: empty or not a STAR file", path=path)
    return dict(blocks)


def is_table(block: object) -> bool:
    """True for a loop table (a ``pandas.DataFrame``) of :func:`read_star_raw`."""
    return isinstance(block, pd.DataFrame)


# ============================================================================ finding tables
def find_block(blocks: Mapping[str, Any], column: str, prefer: Sequence[str] = ()) -> list[str]:
    """Names of the tables (never ``data_optics``) with ``column``: ``prefer`` first, then the
    others in file order. Simple blocks of :func:`read_star_raw` (dicts) are skipped."""
    order = [k for k in prefer if k != "optics"]
    order += [k for k in blocks if k not in order and k != "optics"]
    return [k for k in order if k in blocks and is_table(blocks[k]) and column in blocks[k].columns]


def find_table(
    path: Path,
    blocks: Mapping[str, pd.DataFrame],
    required: Sequence[str],
    hint: str,
    *,
    prefer: Sequence[str] = ("micrographs", ""),
    key_column: str | None = None,
) -> tuple[str, pd.DataFrame]:
    """The table holding ``key_column`` (default ``required[0]``), with all of ``required``.

    Tables are tried in the order of :func:`find_block`. A table with the key column but not
    all of ``required`` is an error (``data_<name> lacks …; <hint>``), and so is no table with
    it (``no _<column> column in any data block (found …); <hint>``).
    """
    column = key_column or required[0]
    hits = find_block(blocks, column, prefer)
    if not hits:
        found = ", ".join(f"data_{k}" for k in blocks) or "none"
        raise InputError(
            f"no {column_list([column])} column in any data block (found {found}); {hint}",
            path=path,
        )
    key = hits[0]
    df = blocks[key]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(f"data_{key} lacks {column_list(missing)}; {hint}", path=path)
    return key, df


# ============================================================================ typed columns
def float_column(p: Path, df: pd.DataFrame, column: str, block: str) -> np.ndarray:
    """A numeric column as float64, with a clear error for text or missing values."""
    values = pd.to_numeric(df[column], errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        row = int(bad[0]) + 1
        raise InputError(
            f"data_{block} row {row}: _{column} is missing or not a number "
            f"({df[column].iloc[bad[0]]!r}); the file is truncated or malformed",
            path=p,
        )
    return values


def numeric_column(p: Path, df: pd.DataFrame, column: str, block: str) -> np.ndarray:
    """A numeric column as float64; a missing or non-numeric cell is a short InputError
    (``data_<block> row <i>: _<column> is missing or not a number``)."""
    v = numbers(df[column])
    bad = np.flatnonzero(~np.isfinite(v))
    if bad.size:
        raise InputError(
            f"data_{block} row {int(bad[0]) + 1}: _{column} is missing or not a number", path=p
        )
    return v


def int_column(p: Path, df: pd.DataFrame, column: str, block: str) -> np.ndarray:
    """An integer column (e.g. optics group numbers)."""
    values = float_column(p, df, column, block)
    if np.any(values != np.round(values)):
        raise InputError(f"data_{block}: _{column} must hold whole numbers; fix the file", path=p)
    return values.astype(np.int64)


def string_column(p: Path, df: pd.DataFrame, column: str, block: str) -> list[str]:
    """A string column, refusing missing values."""
    out: list[str] = []
    for i, v in enumerate(df[column].tolist()):
        if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA or str(v) == "":
            raise InputError(
                f"data_{block} row {i + 1}: _{column} is empty; the file is truncated or malformed",
                path=p,
            )
        out.append(str(v))
    return out


def optional_floats(df: pd.DataFrame, column: str) -> np.ndarray | None:
    """A column as float64 with NaN for non-numbers, or None when the table lacks it."""
    if column not in df.columns:
        return None
    return np.asarray(pd.to_numeric(df[column], errors="coerce"), dtype=np.float64)


def numbers(values: object) -> np.ndarray:
    """Any column-like value as float64, NaN for text (``pandas.to_numeric(errors="coerce")``)."""
    return np.asarray(pd.to_numeric(values, errors="coerce"), dtype=np.float64)


def strict_numbers(values: object) -> np.ndarray:
    """A column as float64; text raises ``ValueError`` (``pandas.to_numeric``), NaN stays."""
    return pd.to_numeric(values).to_numpy(dtype=np.float64)  # type: ignore[union-attr]


def strip_type_tag(
    name: str, tags: Sequence[str] = ("mrc", "mrcs", "tif", "tiff", "eer", "spi")
) -> str:
    """Drop RELION's trailing file-type tag (``x.ctf:mrc`` -> ``x.ctf``)."""
    head, sep, tail = name.rpartition(":")
    return head if sep and tail in tags else name


# ============================================================================ writing
def fmt_float(x: float) -> str:
    """Shortest text that reads back as exactly the same float."""
    return repr(float(x))


def star_token(value: str, what: str) -> str:
    """A STAR string value; RELION cannot read empty or whitespace-containing tokens."""
    if not value or any(c.isspace() for c in value):
        raise ValueError(f"{what} {value!r} cannot be written to a STAR file (empty or has spaces)")
    return value


def format_loop(block: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Lines of one ``data_<block>`` loop table, columns right-aligned as RELION does."""
    lines = ["", STAR_VERSION, "", f"data_{block}", "", "loop_"]
    lines += [f"_{c} #{i}" for i, c in enumerate(columns, start=1)]
    widths = [max(len(r[j]) for r in rows) for j in range(len(columns))] if rows else []
    for r in rows:
        cells = [
            v.ljust(w) if j == 0 else v.rjust(w)
            for j, (v, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append(" ".join(cells).rstrip())
    lines.append("")
    return lines


def write_star_tables(path: str | os.PathLike[str], blocks: Mapping[str, object]) -> None:
    """Write whole tables as a STAR file, atomically, values with 6 decimals (``%.6f``).

    ``starfile`` writes the tables; its banner is dropped and every block is headed by
    RELION 3.1+'s version line.
    """
    import starfile

    with atomic_path(path) as tmp:
        starfile.write(dict(blocks), tmp, float_format="%.6f", sep=" ", overwrite=True)
        lines = tmp.read_text(encoding="utf-8").splitlines()
        text = []
        for line in lines:
            if line.startswith("# Created by the starfile"):
                continue
            if line.startswith("data_"):
                text += [STAR_VERSION, ""]
            text.append(line)
        tmp.write_text("\n".join(text).lstrip("\n") + "\n", encoding="utf-8")
