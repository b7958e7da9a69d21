"""cryoSPARC result-group files (``.csg``): what cryoSPARC's *Import Result Group* job reads.

cryoSPARC does not import a bare ``.cs`` dataset; its Import Result Group job takes a small YAML
document that names the dataset's *results* and the ``.cs`` files that hold them (the same
document that cryoSPARC writes beside every exported result, "Guide: Data Management in
CryoSPARC", guide.cryosparc.com). Its layout::

    created: 2026-12-07 12:00:00.000000
    group:
      description: ...
      name: exposures
      title: ...
      type: exposure
    results:
      ctf:
        metafile: '>micrographs_ctf.cs'
        num_items: 24
        type: exposure.ctf
      micrograph_blob:
        metafile: '>micrographs_ctf.cs'
        num_items: 24
        type: exposure.micrograph_blob
    version: v4.4.1

* ``group/type`` is the item type (``exposure`` or ``particle``);
* every *result* is one field prefix of the dataset (``ctf`` for ``ctf/df1_A``, ``ctf/df2_A``,
  …; ``uid`` is not a result); its ``type`` is ``<item type>.<prefix>``;
* ``metafile`` is the ``.cs`` file, where a leading ``>`` means "beside this ``.csg``";
* ``num_items`` is the number of rows of that file.

:func:`write_cs_with_group` writes a dataset and its ``.csg`` together (both atomically, the
``.cs`` first, so a ``.csg`` never names a file that is not complete). The YAML is written
here (a fixed, flat layout: no YAML library is needed at run time); tests read it back with
PyYAML and load the ``.cs`` with cryosparc-tools' ``Dataset.load``.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path

import numpy as np

from anisoctf.io.atomic import atomic_write
from anisoctf.io.cryosparc import write_cs

__all__ = [
    "CSG_SUFFIX",
    "csg_path",
    "group_type",
    "result_group_text",
    "results_of",
    "write_cs_with_group",
]

#: Suffix of a result-group file.
CSG_SUFFIX = ".csg"
#: The cryoSPARC version whose layout is written (the layout is the same from v2.11 to v4.x).
CSG_VERSION = "v4.4.1"

#: Item type → (group name, title, description) written in ``group``.
_GROUPS: dict[str, tuple[str, str, str]] = {
    "exposure": (
        "exposures",
        "Exposures",
        "Micrographs with CTF estimated by anisoctf",
    ),
    "particle": (
        "particles",
        "Particles",
        "Particles with defocus rewritten by anisoctf",
    ),
}


def csg_path(cs_path: str | os.PathLike[str]) -> Path:
    """The ``.csg`` beside ``cs_path`` (``micrographs_ctf.cs`` → ``micrographs_ctf.csg``)."""
    return Path(cs_path).with_suffix(CSG_SUFFIX)


def group_type(array: np.ndarray) -> str:
    """The cryoSPARC item type of a dataset: ``"exposure"`` or ``"particle"``.

    A dataset with a ``micrograph_blob`` (and no ``blob``) holds exposures; one with ``blob``
    (particle images) or ``location`` holds particles.

    Raises
    ------
    ValueError
        Neither kind of field is present, so cryoSPARC could not import the dataset as either.
    """
    prefixes = set(results_of(array))
    if "blob" in prefixes or "location" in prefixes or "alignments3D" in prefixes:
        return "particle"
    if "micrograph_blob" in prefixes or "mscope_params" in prefixes:
        return "exposure"
    raise ValueError(
        "a dataset without blob/location (particles) or micrograph_blob (exposures) fields "
        "cannot be described as a cryoSPARC result group"
    )


def results_of(array: np.ndarray) -> list[str]:
    """The result names of a dataset: its field prefixes in field order, ``uid`` excluded."""
    out: list[str] = []
    for name in array.dtype.names or ():
        if "/" not in name:
            continue
        prefix = name.split("/", 1)[0]
        if prefix not in out:
            out.append(prefix)
    return out


def _quoted(text: str) -> str:
    """A YAML single-quoted scalar (a quote is written twice)."""
    return "'" + text.replace("'", "''") + "'"


def result_group_text(
    array: np.ndarray,
    metafile: str,
    *,
    created: _dt.datetime | None = None,
) -> str:
    """The ``.csg`` document for ``array`` stored in ``metafile`` (a name beside the ``.csg``).

    Parameters
    ----------
    array
        The dataset (one-dimensional structured array, cryoSPARC field names).
    metafile
        File name of the ``.cs`` relative to the ``.csg``'s folder (written with cryoSPARC's
        leading ``>``).
    created
        Creation time written in the document (default: now, UTC).
    """
    kind = group_type(array)
    name, title, description = _GROUPS[kind]
    stamp = (created or _dt.datetime.now(_dt.UTC)).strftime("%Y-%m-%d %H:%M:%S.%f")
    lines = [
        f"created: {stamp}",
        "group:",
        f"  description: {_quoted(description)}",
        f"  name: {name}",
        f"  title: {_quoted(title)}",
        f"  type: {kind}",
        "results:",
    ]
    for result in results_of(array):
        lines += [
            f"  {result}:",
            f"    metafile: {_quoted('>' + metafile)}",
            f"    num_items: {len(array)}",
            f"    type: {kind}.{result}",
        ]
    lines.append(f"version: {CSG_VERSION}")
    return "\n".join(lines) + "\n"


def write_cs_with_group(
    path: str | os.PathLike[str], array: np.ndarray, *, header: bytes | None = None
) -> Path:
    """Write ``array`` as ``path`` (``.cs``) and its result group beside it (``.csg``).

    The ``.cs`` is written first and the ``.csg`` only once it is complete, each atomically.

    Parameters
    ----------
    path
        The ``.cs`` file.
    array
        The dataset.
    header
        Passed to :func:`~anisoctf.io.cryosparc.write_cs` (reuse of the input's header bytes).

    Returns
    -------
    Path
        The ``.csg`` written.

    Raises
    ------
    ValueError
        The dataset is neither exposures nor particles (see :func:`group_type`), or is not a
        plain one-dimensional structured array (see :func:`~anisoctf.io.cryosparc.write_cs`).
    """
    p = Path(path)
    text = result_group_text(np.asarray(array), p.name)  # refuse before writing anything
    write_cs(p, array, header=header)
    out = csg_path(p)
    with atomic_write(out, "w") as fh:
        fh.write(text)
    return out
