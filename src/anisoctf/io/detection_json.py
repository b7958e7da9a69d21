"""The anisotropic-magnification detection as a JSON file (``anisoctf aniso detect --json``).

The document is :meth:`anisoctf.magnification.detection.AnisoDetection.to_dict` (layout in
``docs/anisomag.md``): indented, NaN written as ``null`` by the record itself, strict JSON
(``allow_nan=False``). This module knows only the file: it takes the document, or any record
with a ``to_dict(residuals=...)`` method, and writes it atomically
(:func:`anisoctf.io.atomic.write_text_atomic`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, Protocol

from anisoctf.io.atomic import write_text_atomic
from anisoctf.io.matrix_json import read_json_document

__all__ = [
    "DetectionDocument",
    "detection_json_text",
    "read_detection_verdict",
    "write_detection_json",
]


class DetectionDocument(Protocol):
    """A record that gives its JSON document (e.g. ``AnisoDetection``)."""

    def to_dict(self, residuals: bool = True) -> dict[str, Any]:
        """The JSON-ready document."""
        ...


def detection_json_text(
    detection: DetectionDocument | Mapping[str, Any], residuals: bool = True
) -> str:
    """The file's text (ends with a newline).

    Parameters
    ----------
    detection
        The detection record, or its document (a mapping, written as it is).
    residuals
        Include the per-micrograph residual table (records only; a mapping is not changed).
    """
    doc = detection if isinstance(detection, Mapping) else detection.to_dict(residuals=residuals)
    return json.dumps(doc, indent=2, allow_nan=False) + "\n"


def write_detection_json(
    detection: DetectionDocument | Mapping[str, Any],
    path: str | os.PathLike[str],
    residuals: bool = True,
) -> None:
    """Write the detection's document as indented JSON, atomically (see
    :func:`detection_json_text`)."""
    write_text_atomic(path, detection_json_text(detection, residuals=residuals))


def read_detection_verdict(path: str | os.PathLike[str]) -> tuple[bool | None, float | None]:
    """``(significant, p_value)`` of a detection JSON file; None for a key it lacks (a bare
    ``mag_matrix`` file written by hand has neither).

    Raises
    ------
    InputError
        Unreadable file or invalid JSON.
    """
    data = read_json_document(path)
    if not isinstance(data, dict):
        return None, None
    sig = data.get("significant")
    pv = data.get("p_value")
    return (
        sig if isinstance(sig, bool) else None,
        float(pv) if isinstance(pv, (int, float)) and not isinstance(pv, bool) else None,
    )
