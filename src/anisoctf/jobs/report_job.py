"""``anisoctf report DIR``: one self-contained HTML page of a batch's results.

The job reads the folder (:func:`anisoctf.report.html.collect_report_data`), runs the anisomag
detection on the largest optics group's observed-frame defocus table (200 bootstrap
resamples), and has :mod:`anisoctf.report.html` draw and write the page; the report package
itself neither runs science nor reads jobs' internals.
"""

from __future__ import annotations

import os
from pathlib import Path

from anisoctf.errors import AnisoctfError
from anisoctf.magnification.detect import detect_anisomag
from anisoctf.report.html import (
    AnisomagSection,
    ReportData,
    anisomag_observed_table,
    anisomag_section,
    collect_report_data,
    write_report,
)

__all__ = ["REPORT_BOOTSTRAP", "run_report"]

#: bootstrap resamples of the report's anisomag detection
REPORT_BOOTSTRAP = 200


def _anisomag(data: ReportData) -> AnisomagSection:
    table = anisomag_observed_table(data)
    if table is None:
        return AnisomagSection(None, "no successful micrographs")
    group, names, u, v, a = table
    try:
        det = detect_anisomag(u, v, a, names, n_bootstrap=REPORT_BOOTSTRAP)
    except (AnisoctfError, ValueError) as exc:
        return AnisomagSection(None, f"anisomag fit not possible: {' '.join(str(exc).split())}")
    return anisomag_section(group, len(names), det)


def run_report(
    directory: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    max_thumbnails: int = 400,
) -> Path:
    """Write the report of ``directory`` (default ``directory/report.html``), atomically.

    Raises
    ------
    InputError
        The folder holds no results (see :func:`collect_report_data`), or the page cannot be
        written.
    """
    data = collect_report_data(directory)
    path = Path(out) if out is not None else Path(directory) / "report.html"
    return write_report(data, _anisomag(data), path, max_thumbnails=max_thumbnails)
