"""cryoSPARC exposures/particles ``.cs`` as CTF-estimation input, and CTF results as ``.cs``.

Input (:func:`read_cs_micrographs`): the images to estimate, with their optics.

* An *exposures* dataset (e.g. the output of Patch Motion Correction or an exported exposure
  group) has ``micrograph_blob/path`` and ``micrograph_blob/psize_A``.
* A *particles* dataset has ``blob/path`` (one particle stack per micrograph) and
  ``blob/psize_A``; every distinct stack is one input whose particles' periodograms are pooled.
* Optics: voltage and Cs from ``mscope_params/accel_kv`` and ``mscope_params/cs_mm`` (else
  ``ctf/accel_kv``, ``ctf/cs_mm``), amplitude contrast from ``ctf/amp_contrast`` (else 0.1,
  cryoSPARC's default), the exposure group from ``mscope_params/exp_group_id`` (else
  ``ctf/exp_group_id``). Each
  distinct combination becomes one optics group, numbered in order of appearance. Without a
  voltage or Cs field the caller must give them (``--kv``/``--cs``); nothing is assumed.
* An exposure with ``micrograph_blob_non_dw/path`` (Patch Motion Correction's sum without
  dose weighting) is read from that file by default, as cryoSPARC Patch CTF does; its name
  stays ``micrograph_blob/path``.
* Paths in a ``.cs`` file are relative to the cryoSPARC *project* directory. They are taken
  relative to the current directory when the file is there, else relative to the folder two
  levels above the ``.cs`` file (``<project>/<job>/<file>.cs``), else relative to the ``.cs``
  file's own folder.

Output (:func:`ctf_results_array`, :func:`write_ctf_cs`): one row per micrograph with ``uid``,
``micrograph_blob/path``, ``micrograph_blob/psize_A`` and cryoSPARC's ``ctf/*`` fields with the
types of the real files in ``shared/data/real/cryodrgn`` (``ctf/type`` ``|S9``,
``ctf/exp_group_id`` ``<u4``, ``ctf/accel_kv``, ``ctf/cs_mm``, ``ctf/amp_contrast``,
``ctf/df1_A``, ``ctf/df2_A``, ``ctf/df_angle_rad``, ``ctf/phase_shift_rad``, ``ctf/scale``,
``ctf/scale_const``, ``ctf/bfactor`` ``<f4``; ``ctf/shift_A``, ``ctf/tilt_A``,
``ctf/trefoil_A`` ``<f4 (2,)``; ``ctf/tetra_A``, ``ctf/anisomag`` ``<f4 (4,)``), plus
``ctf/ctf_fit_to_A`` (fit resolution, Å), and ``mscope_params/accel_kv``, ``cs_mm`` and
``exp_group_id``; a ``.csg`` result group is written beside it for cryoSPARC's Import Result
Group job (:mod:`anisoctf.io.cryosparc_csg`). ``df1_A``/``df2_A``/``df_angle_rad`` are RELION's
DefocusU/DefocusV/DefocusAngle (angle in radians); ``ctf/anisomag`` is ``M^-1 - I`` row-major
(:func:`~anisoctf.optics.magmat.to_cryosparc_anisomag`). The uid of an input row is
kept; otherwise the uid is the first 8 bytes of the SHA-256 of the micrograph name.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from anisoctf.errors import InputError
from anisoctf.io import labels as L
from anisoctf.io.cryosparc import read_cs
from anisoctf.io.cryosparc_csg import write_cs_with_group
from anisoctf.io.star import MicrographCTFRow
from anisoctf.optics.ctf import Optics
from anisoctf.optics.magmat import to_cryosparc_anisomag

__all__ = [
    "CTF_FIELDS",
    "DEFAULT_CS_AMP_CONTRAST",
    "MSCOPE_FIELDS",
    "CSMicrograph",
    "CSMicrographs",
    "ctf_results_array",
    "name_uid",
    "read_cs_micrographs",
    "write_ctf_cs",
]

#: ``mscope_params/*`` fields written (the microscope of each exposure, as cryoSPARC's own
#: exposures carry them; its jobs read voltage and Cs from here)
MSCOPE_FIELDS: list[tuple] = [
    ("mscope_params/accel_kv", "<f4"),
    ("mscope_params/cs_mm", "<f4"),
    ("mscope_params/exp_group_id", "<u4"),
]

#: ``ctf/*`` fields written, with the dtypes of real cryoSPARC files
CTF_FIELDS: list[tuple] = [
    (L.CS_TYPE, "S9"),
    (L.CS_EXP_GROUP, "<u4"),
    (L.CS_VOLTAGE, "<f4"),
    (L.CS_CS, "<f4"),
    (L.CS_AMP_CONTRAST, "<f4"),
    ("ctf/df1_A", "<f4"),
    ("ctf/df2_A", "<f4"),
    ("ctf/df_angle_rad", "<f4"),
    (L.CS_PHASE_SHIFT, "<f4"),
    (L.CS_SCALE, "<f4"),
    (L.CS_SCALE_CONST, "<f4"),
    (L.CS_SHIFT, "<f4", (2,)),
    (L.CS_TILT, "<f4", (2,)),
    (L.CS_TREFOIL, "<f4", (2,)),
    (L.CS_TETRA, "<f4", (4,)),
    (L.CS_ANISOMAG, "<f4", (4,)),
    (L.CS_BFACTOR, "<f4"),
    (L.CS_FIT_TO, "<f4"),
]
#: cryoSPARC's amplitude contrast when an exposure has none (Patch CTF's default)
DEFAULT_CS_AMP_CONTRAST = 0.1
_NON_DW_PATH = "micrograph_blob_non_dw/path"


@dataclass(frozen=True)
class CSMicrograph:
    """One image to estimate: ``name`` as in the file, ``path`` the file to read (resolved; the
    non-dose-weighted sum where there is one), optics group, uid."""

    name: str
    path: Path
    optics_group: int
    uid: int
    non_dw: bool = False  # ``path`` is the sum without dose weighting


@dataclass(frozen=True)
class CSMicrographs:
    """What :func:`read_cs_micrographs` found."""

    micrographs: list[CSMicrograph]
    optics: dict[int, Optics]
    kind: str  # "exposures" or "particles"
    notes: list[str] = field(default_factory=list)
    #: where the voltage, Cs and amplitude contrast came from (field name, or "default")
    sources: dict[str, str] = field(default_factory=dict)


def name_uid(name: str) -> int:
    """A stable 64-bit uid for a micrograph name (first 8 bytes of its SHA-256)."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")


def _field(arr: np.ndarray, *names: str) -> np.ndarray | None:
    for n in names:
        if n in (arr.dtype.names or ()):
            return arr[n]
    return None


def _decode(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace").rstrip("\x00")
    return str(value)


def _project_root(cs_path: Path, names: Sequence[str]) -> Path:
    sample = [n for n in names[:20] if n]
    candidates = [Path.cwd(), cs_path.absolute().parent.parent, cs_path.absolute().parent]
    for root in candidates:
        if sample and all((root / n.lstrip(">")).exists() for n in sample):
            return root
    return candidates[0]


def read_cs_micrographs(
    path: str | os.PathLike[str],
    project_dir: str | os.PathLike[str] | None = None,
    *,
    kv: float | None = None,
    cs: float | None = None,
    use_non_dw: bool = True,
) -> CSMicrographs:
    """The micrographs (or particle stacks) of an exposures/particles ``.cs`` file.

    Parameters
    ----------
    path
        The ``.cs`` file.
    project_dir
        Directory the paths are relative to; default: see the module notes.
    kv, cs
        Voltage (kV) and Cs (mm) for a file without those fields (the command line's; the
        caller replaces the file's values with them anyway).
    use_non_dw
        Read an exposure's ``micrograph_blob_non_dw/path`` where it has one.

    Raises
    ------
    InputError
        Unreadable file, no ``micrograph_blob/path`` nor ``blob/path`` field, no pixel size,
        no voltage or Cs field and none given, or optics values that are not physical.
    """
    p = Path(path)
    arr = read_cs(p).array
    if "micrograph_blob/path" in (arr.dtype.names or ()):
        kind, prefix = "exposures", "micrograph_blob"
    elif L.CS_BLOB_PATH in (arr.dtype.names or ()):
        kind, prefix = "particles", "blob"
    else:
        raise InputError(
            "has neither micrograph_blob/path (exposures) nor blob/path (particles); give an "
            "exposures or particles .cs file",
            path=p,
        )
    psize = _field(arr, f"{prefix}/psize_A")
    if psize is None:
        raise InputError(f"has no {prefix}/psize_A field (pixel size)", path=p)
    fields = arr.dtype.names or ()
    sources = {
        what: next((n for n in names if n in fields), "")
        for what, names in (
            ("voltage", ("mscope_params/accel_kv", L.CS_VOLTAGE)),
            ("Cs", ("mscope_params/cs_mm", L.CS_CS)),
            ("amplitude contrast", (L.CS_AMP_CONTRAST,)),
        )
    }
    kv_f, cs_f = _field(arr, "mscope_params/accel_kv", L.CS_VOLTAGE), _field(
        arr, "mscope_params/cs_mm", L.CS_CS
    )
    ac = _field(arr, L.CS_AMP_CONTRAST)
    if (kv_f is None and kv is None) or (cs_f is None and cs is None):
        raise InputError(
            "has no voltage or Cs field (mscope_params/accel_kv, cs_mm or ctf/accel_kv, "
            "cs_mm); pass the optics with --kv, --cs and --ac",
            path=p,
        )
    sources = {k: (f".cs field {v}" if v else "default") for k, v in sources.items()}
    non_dw = (
        [_decode(v).lstrip(">") for v in arr[_NON_DW_PATH]]
        if use_non_dw and kind == "exposures" and _NON_DW_PATH in fields
        else None
    )
    group = _field(arr, "mscope_params/exp_group_id", L.CS_EXP_GROUP)
    uids = _field(arr, "uid")
    names = [_decode(v).lstrip(">") for v in arr[f"{prefix}/path"]]
    root = Path(project_dir) if project_dir is not None else _project_root(p, names)
    notes: list[str] = []
    key_of: dict[tuple, int] = {}
    optics: dict[int, Optics] = {}
    out: list[CSMicrograph] = []
    seen: set[str] = set()
    for i, name in enumerate(names):
        if not name:
            raise InputError(f"row {i} has an empty {prefix}/path", path=p)
        if name in seen:  # particles: one entry per stack
            continue
        seen.add(name)
        values = (
            float(psize[i]),
            float(kv if kv_f is None else kv_f[i]),
            float(cs if cs_f is None else cs_f[i]),
            DEFAULT_CS_AMP_CONTRAST if ac is None else float(ac[i]),
            0 if group is None else int(group[i]),
        )
        key = tuple(round(v, 5) for v in values)
        if key not in key_of:
            try:
                o = Optics(
                    pixel_size=float(f"{values[0]:.6g}"),
                    voltage_kv=float(f"{values[1]:.6g}"),
                    cs_mm=float(f"{values[2]:.6g}"),
                    amplitude_contrast=float(f"{values[3]:.6g}"),
                )
            except ValueError as exc:
                raise InputError(f"row {i}: bad optics ({exc})", path=p) from None
            key_of[key] = len(key_of) + 1
            optics[key_of[key]] = o
        uid = int(uids[i]) if uids is not None else name_uid(name)
        read = non_dw[i] if non_dw is not None and non_dw[i] else name
        out.append(CSMicrograph(name, root / read, key_of[key], uid, read != name))
    if not out:
        raise InputError("lists no micrographs", path=p)
    return CSMicrographs(out, optics, kind, notes, sources)


def ctf_results_array(
    rows: Sequence[MicrographCTFRow],
    optics: dict[int, Optics],
    *,
    uids: dict[str, int] | None = None,
    ctf_type: str = "anisoctf",
) -> np.ndarray:
    """CTF results as a cryoSPARC structured array (one row per micrograph).

    Raises
    ------
    ValueError
        A row refers to an optics group not in ``optics``.
    """
    width = max([1, *(len(r.name.encode("utf-8")) for r in rows)])
    dtype = np.dtype(
        [
            ("uid", "<u8"),
            ("micrograph_blob/path", f"S{width}"),
            ("micrograph_blob/psize_A", "<f4"),
            *MSCOPE_FIELDS,
            *CTF_FIELDS,
        ]
    )
    out = np.zeros(len(rows), dtype=dtype)
    uids = uids or {}
    groups = sorted(optics)
    for i, r in enumerate(rows):
        if r.optics_group not in optics:
            raise ValueError(f"{r.name}: optics group {r.optics_group} is not in `optics`")
        o = optics[r.optics_group]
        out["uid"][i] = uids.get(r.name, name_uid(r.name))
        out["micrograph_blob/path"][i] = r.name.encode("utf-8")
        out["micrograph_blob/psize_A"][i] = o.pixel_size
        out["mscope_params/accel_kv"][i] = o.voltage_kv
        out["mscope_params/cs_mm"][i] = o.cs_mm
        out["mscope_params/exp_group_id"][i] = groups.index(r.optics_group)
        out[L.CS_TYPE][i] = ctf_type.encode("ascii")[:9]
        out[L.CS_EXP_GROUP][i] = groups.index(r.optics_group)
        out[L.CS_VOLTAGE][i] = o.voltage_kv
        out[L.CS_CS][i] = o.cs_mm
        out[L.CS_AMP_CONTRAST][i] = o.amplitude_contrast
        out["ctf/df1_A"][i] = r.defocus_u
        out["ctf/df2_A"][i] = r.defocus_v
        out["ctf/df_angle_rad"][i] = math.radians(r.defocus_angle)
        out[L.CS_PHASE_SHIFT][i] = math.radians(r.phase_shift or 0.0)
        out[L.CS_SCALE][i] = 1.0
        out[L.CS_ANISOMAG][i] = to_cryosparc_anisomag(o.M) if o.has_anisomag else 0.0
        out[L.CS_FIT_TO][i] = r.max_resolution if math.isfinite(r.max_resolution) else 0
    return out


def write_ctf_cs(
    path: str | os.PathLike[str],
    rows: Sequence[MicrographCTFRow],
    optics: dict[int, Optics],
    *,
    uids: dict[str, int] | None = None,
) -> None:
    """Write :func:`ctf_results_array` as a ``.cs`` file and its ``.csg`` result group beside it
    (:func:`~anisoctf.io.cryosparc_csg.write_cs_with_group`), each atomically."""
    write_cs_with_group(path, ctf_results_array(rows, optics, uids=uids))
