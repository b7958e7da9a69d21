"""The ``anisoctf aniso compare`` job: the micrograph-based (``aniso detect``) and the
particle-based (``refine``) magnification matrices side by side
(:func:`anisoctf.refine.agreement.compare_matrices`)."""

from __future__ import annotations

import json
import os
from typing import Any

from anisoctf.io.atomic import write_text_atomic
from anisoctf.refine.agreement import compare_matrices, load_matrix_json

__all__ = ["run_compare"]


def run_compare(
    detect_json: str | os.PathLike[str],
    refine_json: str | os.PathLike[str],
    json_out: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Read both JSON records, compare their matrices, write the comparison to ``json_out``
    (when given) and return it.

    Raises
    ------
    AnisoctfError
        A JSON record that cannot be read or holds no matrix.
    """
    m_mic, rec_mic = load_matrix_json(detect_json)
    m_par, rec_par = load_matrix_json(refine_json)
    cmp = compare_matrices(m_mic, m_par, rec_mic, rec_par)
    if json_out is not None:
        write_text_atomic(json_out, json.dumps(cmp, indent=2) + "\n")
    return cmp
