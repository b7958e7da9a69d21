"""The defocus-surface JSON file ``<stem>_surface.json`` (one per micrograph).

A small, documented, versioned document (docs/local.md) holding a micrograph's local defocus:
the surface (plane + residual spline, :class:`anisoctf.records.local.DefocusSurface`), the shared
astigmatism, the tilt, the thickness and the patches' own estimates. Non-finite numbers are
written as ``null``. Written atomically; reading checks the format and names the file in every
error.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from anisoctf.errors import InputError
from anisoctf.io.atomic import atomic_write
from anisoctf.records.local import DefocusSurface, LocalEstimate

__all__ = [
    "SURFACE_FORMAT",
    "SURFACE_VERSION",
    "SurfaceRecord",
    "read_surface_json",
    "surface_document",
    "write_surface_json",
]

#: the document's ``format`` field
SURFACE_FORMAT = "anisoctf-defocus-surface"
#: the layout version this module writes (and the newest it reads)
SURFACE_VERSION = 1


@dataclass(frozen=True)
class SurfaceRecord:
    """What ``assign`` and the pictures need from a surface file.

    Attributes
    ----------
    surface
        The defocus surface (pixels of the micrograph → mean defocus, Å).
    astigmatism, angle_deg
        ``U − V`` (Å) and the U-axis angle (degrees), shared by the whole micrograph.
    micrograph
        ``_rlnMicrographName`` of the micrograph.
    pixel_size
        Å per micrograph pixel.
    meta
        The whole document (tilt, thickness, patches, ...).
    """

    surface: DefocusSurface
    astigmatism: float
    angle_deg: float
    micrograph: str
    pixel_size: float
    meta: dict[str, Any]


def _num(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def surface_document(local: LocalEstimate, micrograph: str, pixel_size: float) -> dict[str, Any]:
    """The JSON document of a local estimate."""
    return {
        "format": SURFACE_FORMAT,
        "version": SURFACE_VERSION,
        "micrograph": micrograph,
        "pixel_size": float(pixel_size),
        "coordinates": "micrograph pixels: x = column, y = row, (0, 0) = first pixel's centre",
        "defocus": "mean defocus (U + V) / 2 in Å, underfocus positive, true frame",
        "surface": local.surface.to_dict(),
        "astigmatism": float(local.astigmatism),
        "defocus_angle": float(local.angle_deg),
        "phase_shift": float(local.phase_shift_deg),
        "tilt_angle": _num(local.tilt_angle),
        "tilt_axis_angle": _num(local.tilt_axis),
        "tilt_angle_sigma": _num(local.tilt_sigma),
        "thickness": _num(local.thickness),
        "thickness_sigma": _num(local.thickness_sigma),
        "tile": int(local.tile),
        "n_tiles": int(local.n_tiles),
        "patches": [
            {
                "x": float(p.x),
                "y": float(p.y),
                "defocus": _num(p.defocus),
                "sigma": _num(p.sigma),
                "n_tiles": int(p.n_tiles),
                "score": _num(p.score),
                "outlier": bool(p.outlier),
            }
            for p in local.patches
        ],
        "warnings": list(local.warnings),
    }


def write_surface_json(
    path: str | os.PathLike[str], local: LocalEstimate, micrograph: str, pixel_size: float
) -> None:
    """Write ``local`` as a surface JSON file, atomically."""
    text = json.dumps(surface_document(local, micrograph, pixel_size), indent=1)
    with atomic_write(path, "w") as fh:
        fh.write(text + "\n")


def read_surface_json(path: str | os.PathLike[str]) -> SurfaceRecord:
    """Read a surface JSON file.

    Raises
    ------
    InputError
        Unreadable file, not JSON, not a surface document, or missing/invalid values.
    """
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except OSError as exc:
        raise InputError(f"cannot read the surface file: {exc.strerror or exc}", path=p) from None
    except (ValueError, UnicodeDecodeError):
        raise InputError(
            "not a JSON file; re-run `anisoctf estimate --patches` to rewrite it", path=p
        ) from None
    if not isinstance(doc, dict) or doc.get("format") != SURFACE_FORMAT:
        raise InputError(f"not an anisoctf defocus surface (format {SURFACE_FORMAT!r})", path=p)
    if int(doc.get("version", 0)) > SURFACE_VERSION:
        raise InputError(
            f"surface format version {doc.get('version')} is newer than this anisoctf reads "
            f"({SURFACE_VERSION}); upgrade anisoctf",
            path=p,
        )
    try:
        surface = DefocusSurface.from_dict(doc["surface"])
        astig = float(doc["astigmatism"])
        angle = float(doc["defocus_angle"])
        apix = float(doc["pixel_size"])
        if not (math.isfinite(astig) and math.isfinite(angle) and apix > 0):
            raise ValueError("non-finite astigmatism/angle or bad pixel size")
        np.asarray(surface.coef)  # validated by from_dict
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"invalid surface document ({exc}); re-run the estimate", path=p) from None
    return SurfaceRecord(
        surface=surface,
        astigmatism=astig,
        angle_deg=angle,
        micrograph=str(doc.get("micrograph", "")),
        pixel_size=apix,
        meta=doc,
    )
