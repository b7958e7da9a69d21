"""The per-micrograph record of a batch (``<stem>.record.json``): its layout, reader and writer.

A record is what a finished micrograph leaves behind in the output folder of ``anisoctf
estimate``: its STAR row (successes), scores, warnings, output files and, for a failure, the
one-line reason. The batch (:mod:`anisoctf.jobs.batch_state`) writes and reads them to resume;
the report (:mod:`anisoctf.report.html`) reads them to show failures. Floats round-trip
exactly (NaN and infinities as their ``repr``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

from anisoctf.io.atomic import write_text_atomic
from anisoctf.records.micrograph import MicrographCTFRow

__all__ = [
    "RECORD_SUFFIX",
    "RECORD_VERSION",
    "MicrographRecord",
    "read_record",
    "record_path",
    "write_record",
]

#: file name suffix of a record
RECORD_SUFFIX = ".record.json"
#: layout version; a record of another version is not read (the micrograph is redone)
RECORD_VERSION = 1


@dataclasses.dataclass(frozen=True)
class MicrographRecord:
    """What a finished micrograph left behind.

    Attributes
    ----------
    fingerprint
        :func:`task_fingerprint` of its task.
    ok
        True for a success.
    row
        Its ``micrographs_ctf.star`` row (successes only).
    figure_of_merit, fit_resolution
        Scores of the fit (successes only).
    warnings
        The estimate's remarks.
    outputs
        Files written besides the record.
    message
        One-line reason of a failure.
    seconds
        Wall time spent on it.
    """

    fingerprint: str
    ok: bool
    row: MicrographCTFRow | None = None
    figure_of_merit: float = math.nan
    fit_resolution: float = math.nan
    warnings: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    message: str = ""
    seconds: float = 0.0

    def outputs_exist(self) -> bool:
        """Whether every output file listed is still there."""
        return all(Path(p).is_file() for p in self.outputs)


def record_path(out_dir: str | os.PathLike[str], stem: str) -> Path:
    """``<out_dir>/<stem>.record.json``."""
    return Path(out_dir) / f"{stem}{RECORD_SUFFIX}"


def _float_out(x: float) -> float | str:
    return x if math.isfinite(x) else repr(float(x))


def _float_in(x: Any) -> float:
    return float(x)  # float("nan"), float("inf") read back the repr written by _float_out


def write_record(path: str | os.PathLike[str], record: MicrographRecord) -> None:
    """Write ``record`` atomically as JSON (floats round-trip exactly)."""
    row = None
    if record.row is not None:
        row = {
            k: (_float_out(v) if isinstance(v, float) else v)
            for k, v in dataclasses.asdict(record.row).items()
        }
    data = {
        "version": RECORD_VERSION,
        "fingerprint": record.fingerprint,
        "ok": record.ok,
        "row": row,
        "figure_of_merit": _float_out(record.figure_of_merit),
        "fit_resolution": _float_out(record.fit_resolution),
        "warnings": list(record.warnings),
        "outputs": list(record.outputs),
        "message": record.message,
        "seconds": record.seconds,
    }
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def read_record(path: str | os.PathLike[str]) -> MicrographRecord | None:
    """Read a record; None when it is absent, unreadable or of another layout version."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("version") != RECORD_VERSION:
            return None
        row = None
        if data.get("row") is not None:
            fields = {f.name: f for f in dataclasses.fields(MicrographCTFRow)}
            raw = data["row"]
            kwargs = {}
            for k, v in raw.items():
                if k not in fields:
                    return None  # written by another version of the row: redo
                kwargs[k] = _float_in(v) if isinstance(v, str) and k not in _STRING_ROW else v
            row = MicrographCTFRow(**kwargs)
        return MicrographRecord(
            fingerprint=str(data["fingerprint"]),
            ok=bool(data["ok"]),
            row=row,
            figure_of_merit=_float_in(data["figure_of_merit"]),
            fit_resolution=_float_in(data["fit_resolution"]),
            warnings=tuple(str(w) for w in data.get("warnings", ())),
            outputs=tuple(str(p) for p in data.get("outputs", ())),
            message=str(data.get("message", "")),
            seconds=float(data.get("seconds", 0.0)),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


_STRING_ROW = {"name", "ctf_image", "surface"}
