"""Resuming ``anisoctf refine``: the state of each optics group that is already refined.

Once an optics group is refined, its result (:class:`~anisoctf.refine.group.GroupResult`) is
saved in ``<out>/.anisoctf_refine/group<N>.npz`` (the per-particle arrays) and
``group<N>.json`` (matrices, band, evidence, history, covariance, timings and a fingerprint of
everything the result depends on: the particle STAR's and the maps' size and modification
time, the settings except the thread count, the padding, the reference pixel size and the
package version). Both are written atomically, the JSON last, so a group counts as done only
when both are complete. A rerun (``--continue``, the default) takes a group whose state
matches from these files instead of refining it again; the particles STAR is always rewritten
(atomically) from all groups at the end. A run killed at any moment (SIGKILL included)
therefore resumes at the first unfinished optics group and ends with the outputs of an
uninterrupted run. Nothing is unpickled: the arrays are plain ``.npz`` (``allow_pickle=False``)
and the rest is JSON.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from anisoctf.io.atomic import atomic_write, write_text_atomic
from anisoctf.jobs.batch_state import input_signature, task_fingerprint
from anisoctf.optics.magmat import MagMat
from anisoctf.refine.group import GroupResult, RefineSettings
from anisoctf.version import __version__

__all__ = ["STATE_DIR", "group_fingerprint", "load_group", "save_group"]

#: Folder of the per-group state inside the output directory.
STATE_DIR = ".anisoctf_refine"

_ARRAYS = ("defocus_u", "defocus_v", "defocus_angle", "defocus_change", "score")


def group_fingerprint(
    star: str | os.PathLike[str],
    maps: list[str | os.PathLike[str]],
    settings: RefineSettings,
    group: int,
    **more: Any,
) -> str:
    """SHA-256 of everything one group's result depends on (threads excluded: they change the
    speed, not the numbers)."""
    return task_fingerprint(
        star=input_signature(star),
        maps=[input_signature(m) for m in maps],
        settings=dataclasses.replace(settings, threads=None),
        group=int(group),
        version=__version__,
        **more,
    )


def _paths(out_dir: str | os.PathLike[str], group: int) -> tuple[Path, Path]:
    d = Path(out_dir) / STATE_DIR
    return d / f"group{group}.npz", d / f"group{group}.json"


def save_group(out_dir: str | os.PathLike[str], result: GroupResult, fingerprint: str) -> None:
    """Save ``result`` as the state of its group (arrays first, then the JSON, each atomic)."""
    npz, js = _paths(out_dir, result.group)
    npz.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    arrays = {k: np.asarray(getattr(result, k), dtype=np.float64) for k in _ARRAYS}
    if result.defocus_sd is not None:
        arrays["defocus_sd"] = np.asarray(result.defocus_sd, dtype=np.float64)
    np.savez(buf, **arrays)
    with atomic_write(npz, "wb") as fh:
        fh.write(buf.getvalue())
    doc = {
        "fingerprint": fingerprint,
        "group": result.group,
        "n_particles": result.n_particles,
        "mag_initial": [list(r) for r in result.mag_initial.matrix],
        "mag": [list(r) for r in result.mag.matrix],
        "band": list(result.band),
        "evidence": result.evidence,
        "history": result.history,
        "cov": None if result.cov is None else np.asarray(result.cov).tolist(),
        "timing": result.timing,
        "flipped_contrast": bool(result.flipped_contrast),
        "displacement": result.displacement,
        "prior": result.prior,
        "reference": result.reference,
        "defocus_mode": result.defocus_mode,
    }
    write_text_atomic(js, json.dumps(doc) + "\n")  # NaN kept as NaN (JSON5-style), as read


def load_group(out_dir: str | os.PathLike[str], group: int, fingerprint: str) -> GroupResult | None:
    """The saved result of ``group`` when its state is complete and matches ``fingerprint``;
    None when it must be refined (again)."""
    npz, js = _paths(out_dir, group)
    try:
        doc = json.loads(js.read_text())
        if not isinstance(doc, dict) or doc.get("fingerprint") != fingerprint:
            return None
        with np.load(npz, allow_pickle=False) as z:
            arrays = {k: np.array(z[k], dtype=np.float64) for k in _ARRAYS}
            sd = np.array(z["defocus_sd"], dtype=np.float64) if "defocus_sd" in z else None
        n = int(doc["n_particles"])
        if any(a.shape != (n,) for a in arrays.values()) or (sd is not None and sd.shape != (n,)):
            return None
        return GroupResult(
            group=int(doc["group"]),
            n_particles=n,
            mag_initial=MagMat(tuple(map(tuple, doc["mag_initial"]))),
            mag=MagMat(tuple(map(tuple, doc["mag"]))),
            band=(float(doc["band"][0]), float(doc["band"][1])),
            evidence=list(doc["evidence"]),
            history=list(doc["history"]),
            cov=None if doc["cov"] is None else np.asarray(doc["cov"], dtype=np.float64),
            timing=dict(doc["timing"]),
            flipped_contrast=bool(doc["flipped_contrast"]),
            displacement=doc["displacement"],
            defocus_sd=sd,
            prior=doc.get("prior"),
            reference=doc.get("reference"),
            defocus_mode=str(doc.get("defocus_mode", "ml")),
            **arrays,
        )
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
