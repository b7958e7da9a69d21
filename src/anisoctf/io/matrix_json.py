"""The magnification matrix of a JSON document (``anisoctf aniso detect`` output).

The document is an object with a ``mag_matrix`` key: a 2×2 list in RELION's ``_rlnMagMat``
convention (``k_true = M k_obs``), or a flat list of four numbers (M00, M01, M10, M11).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from anisoctf.errors import InputError
from anisoctf.optics.magmat import MagMat

__all__ = ["mag_matrix_of_document", "read_json_document", "read_mag_matrix_json"]


def read_json_document(path: str | os.PathLike[str]) -> Any:
    """The decoded JSON of ``path``.

    Raises
    ------
    InputError
        A missing or unreadable file, or text that is not valid JSON.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise InputError("file not found; check the path", path=p) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read ({exc})", path=p) from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON ({exc})", path=p) from exc


def read_mag_matrix_json(path: str | os.PathLike[str]) -> MagMat:
    """The ``mag_matrix`` (2×2, RELION convention) of an ``anisoctf aniso detect`` JSON file.

    A flat list of four numbers (M00, M01, M10, M11) is accepted too.

    Raises
    ------
    InputError
        Unreadable file, invalid JSON, no ``mag_matrix`` key, or not a valid matrix.
    """
    return mag_matrix_of_document(read_json_document(path), path)


def mag_matrix_of_document(data: Any, path: str | os.PathLike[str]) -> MagMat:
    """The ``mag_matrix`` of an already decoded JSON document read from ``path``.

    Raises
    ------
    InputError
        No ``mag_matrix`` key, or not a valid matrix.
    """
    p = Path(path)
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
