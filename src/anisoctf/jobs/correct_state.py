"""Resuming ``aniso correct``: which output files are already complete.

Every corrected file is written atomically; once it is, a small record is written beside the
batch's other state (``<out>/.anisoctf_correct/<output path>.json``, also atomically) with the
task (source, matrix, method, pixel sizes), the source file's size and modification time, the
output's size and the number of images. A rerun (``--continue``, the default) skips a task
whose record matches the current task and source and whose output still has the recorded
size; everything else is corrected again. A run killed at any moment (even SIGKILL) therefore
leaves only complete files and records for complete files, and the rerun ends with every file
exactly once, as an uninterrupted run would have written it. ``--overwrite`` ignores the
records.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from anisoctf.io.atomic import write_text_atomic
from anisoctf.jobs.batch_state import canonical_json, input_signature
from anisoctf.jobs.correct_plan import FileTask
from anisoctf.version import __version__

__all__ = ["STATE_DIR", "done_images", "mark_done", "record_path"]

#: Folder of the per-file records inside the output directory.
STATE_DIR = ".anisoctf_correct"


def record_path(task: FileTask, out_dir: str | os.PathLike[str]) -> Path:
    """Where the record of ``task`` lives (mirrors the output's path below ``out_dir``)."""
    out = Path(out_dir)
    dst = Path(task.dst)
    try:
        rel = dst.relative_to(out)
    except ValueError:  # an output outside the directory (never planned so): by name
        rel = Path(dst.name)
    return out / STATE_DIR / rel.with_name(rel.name + ".json")


def _record(task: FileTask, n_images: int) -> dict:
    dst = input_signature(task.dst)
    return {
        "task": json.loads(canonical_json(task)),
        "source": input_signature(task.src),
        "output_size": None if dst is None else dst["size"],
        "n_images": int(n_images),
        "version": __version__,
    }


def mark_done(task: FileTask, n_images: int, out_dir: str | os.PathLike[str]) -> None:
    """Record that ``task``'s output is complete (call after the output was renamed in)."""
    path = record_path(task, out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(_record(task, n_images), sort_keys=True) + "\n")


def done_images(task: FileTask, out_dir: str | os.PathLike[str]) -> int | None:
    """The number of images of ``task``'s complete output, or None when it must be redone."""
    try:
        old = json.loads(record_path(task, out_dir).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(old, dict):
        return None
    if old.get("task") != json.loads(canonical_json(task)):
        return None
    if old.get("source") != input_signature(task.src) or old.get("source") is None:
        return None
    dst = input_signature(task.dst)
    if dst is None or dst["size"] != old.get("output_size"):
        return None
    n = old.get("n_images")
    return int(n) if isinstance(n, int) and n >= 1 else None
