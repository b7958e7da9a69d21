"""One self-contained HTML page about a CTF output folder (``anisoctf report DIR``).

The page needs no network and no other file: plots are PNG images drawn with matplotlib and
embedded as base64 ``data:`` URIs, the table is sorted by a few lines of inline JavaScript.
It shows

* histograms of mean defocus, astigmatism |U − V| and fit resolution;
* astigmatism against defocus with the anisotropic-magnification fit
  (:func:`anisoctf.magnification.detect.detect_anisomag`, its own plot), when there are enough
  micrographs;
* a table of the micrographs (name, defocus U/V, astigmatism, angle, figure of merit, fit
  resolution, the flags of implausible numbers: :mod:`anisoctf.records.flags`) with a thumbnail
  of each diagnostic picture ``<stem>_ctf.png``, sortable by any column and first sorted by fit
  resolution (worst last); the summary line counts the flagged micrographs;
* the failures, with their one-line reasons (from the per-micrograph records of the batch) and
  the thumbnail of each failure's own picture (its spectrum and the reason).

Input: the folder written by ``anisoctf estimate`` (``micrographs_ctf.star``, ``*_ctf.png``,
``*.record.json``); any folder with a CTF STAR table works, with fewer details.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from anisoctf.errors import InputError
from anisoctf.io.atomic import write_text_atomic
from anisoctf.io.batch_records import read_record
from anisoctf.io.gctf import read_gctf_star
from anisoctf.io.star import MicrographCTFRow
from anisoctf.magnification.detection import AnisoDetection
from anisoctf.optics.frames import defocus_table_to_observed
from anisoctf.records.flags import FLAG_PREFIX, flags_of
from anisoctf.report.detection_plot import detection_png

__all__ = ["ReportData", "collect_report_data", "render_report", "write_report"]

STAR_NAME = "micrographs_ctf.star"
RECORD_SUFFIX = ".record.json"


@dataclass
class ReportData:
    """What the page shows."""

    title: str
    rows: list[MicrographCTFRow]
    thumbnails: dict[str, Path]  # micrograph name -> diagnostic PNG
    failures: list[tuple[str, str]]  # (stem or name, message)
    mag_matrices: dict[int, np.ndarray]  # optics group -> M, for groups with anisomag
    flags: dict[str, tuple[str, ...]] = field(default_factory=dict)  # name -> its flags
    failure_pictures: dict[str, Path] = field(default_factory=dict)  # stem -> its picture


def _stem_of(row: MicrographCTFRow) -> str | None:
    if row.ctf_image:
        return Path(row.ctf_image.split(":")[0]).stem
    return None


def collect_report_data(directory: str | os.PathLike[str]) -> ReportData:
    """Read the folder: STAR table, diagnostic PNGs and failure records.

    Raises
    ------
    InputError
        The folder does not exist or holds neither a CTF STAR table nor records.
    """
    d = Path(directory)
    if not d.is_dir():
        raise InputError("not a folder; give the output folder of anisoctf estimate", path=d)
    star = d / STAR_NAME
    rows: list[MicrographCTFRow] = []
    mags: dict[int, np.ndarray] = {}
    if star.is_file():
        rows, optics = read_gctf_star(star)
        mags = {g: o.M for g, o in optics.items() if o.has_anisomag}
    thumbs: dict[str, Path] = {}
    for r in rows:
        stem = _stem_of(r)
        png = d / f"{stem}_ctf.png" if stem else None
        if png is not None and png.is_file():
            thumbs[r.name] = png
    ok_names = {r.name for r in rows}
    failures: list[tuple[str, str]] = []
    flags: dict[str, tuple[str, ...]] = {}
    failure_pictures: dict[str, Path] = {}
    for rec_file in sorted(d.glob(f"*{RECORD_SUFFIX}")):
        rec = read_record(rec_file)
        if rec is None:
            continue
        if rec.ok:
            if rec.row is not None and flags_of(rec.warnings):
                flags[rec.row.name] = flags_of(rec.warnings)
            continue
        name = rec_file.name[: -len(RECORD_SUFFIX)]
        if name not in ok_names:
            failures.append((name, rec.message))
            png = d / f"{name}_ctf.png"  # a failure's picture: its spectrum and the reason
            if png.is_file():
                failure_pictures[name] = png
    if not rows and not failures:
        raise InputError(
            f"holds no {STAR_NAME} and no records; give the output folder of anisoctf estimate",
            path=d,
        )
    return ReportData(str(d), rows, thumbs, failures, mags, flags, failure_pictures)


def _png_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _thumbnail_uri(path: Path, width: int = 160) -> str | None:
    """A small PNG of ``path`` (downsampled by striding) as a data URI; None if unreadable."""
    try:
        from matplotlib.image import imread, imsave

        img = imread(path)
    except (OSError, ValueError, SyntaxError):
        return None
    step = max(1, int(math.ceil(img.shape[1] / width)))
    small = np.ascontiguousarray(img[::step, ::step])
    buf = io.BytesIO()
    imsave(buf, small, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _histograms(rows: list[MicrographCTFRow]) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    mean = np.array([0.5 * (r.defocus_u + r.defocus_v) for r in rows]) / 1e4
    astig = np.array([abs(r.defocus_u - r.defocus_v) for r in rows])
    res = np.array([r.max_resolution for r in rows], dtype=float)
    fig = Figure(figsize=(12.0, 3.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    panels = (
        (mean, "mean defocus (µm)", "tab:blue"),
        (astig, "astigmatism |U − V| (Å)", "tab:orange"),
        (res[np.isfinite(res)], "fit resolution (Å)", "tab:green"),
    )
    for ax, (values, label, colour) in zip(axes, panels, strict=True):
        if values.size:
            ax.hist(values, bins=min(40, max(5, values.size // 3)), color=colour)
        ax.set_xlabel(label)
        ax.set_ylabel("micrographs")
    fig.tight_layout()
    return _png_uri(fig)


def anisomag_observed_table(
    data: ReportData,
) -> tuple[int, list[str], np.ndarray, np.ndarray, np.ndarray] | None:
    """The largest optics group's observed-frame defocus table for the anisomag plot.

    Returns ``(group, names, U, V, angle)``, or None without successful micrographs.
    True-frame fits (a group with a magnification matrix) are taken back to the observed frame
    first, where anisomag shows as astigmatism.
    """
    groups: dict[int, list[MicrographCTFRow]] = {}
    for r in data.rows:
        groups.setdefault(r.optics_group, []).append(r)
    if not groups:
        return None
    group, rows = max(groups.items(), key=lambda kv: len(kv[1]))
    u = np.array([r.defocus_u for r in rows])
    v = np.array([r.defocus_v for r in rows])
    a = np.array([r.defocus_angle for r in rows])
    if group in data.mag_matrices:
        u, v, a = defocus_table_to_observed(u, v, a, data.mag_matrices[group])
    return group, [r.name for r in rows], u, v, a


@dataclass(frozen=True)
class AnisomagSection:
    """The report's anisomag section: the plot as a data URI (None without one) and a line."""

    image_uri: str | None
    text: str


def anisomag_section(group: int, n_micrographs: int, detection: AnisoDetection) -> AnisomagSection:
    """The section for a detection already computed (the report computes none itself)."""
    try:
        png = detection_png(detection, title=f"optics group {group}: astigmatism against defocus")
    except (ValueError, OSError) as exc:
        return AnisomagSection(None, f"anisomag plot not possible: {exc}")
    uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    text = " ".join(detection.summary_lines())
    return AnisomagSection(uri, f"optics group {group}, {n_micrographs} micrographs. {text}")


_STYLE = """
body{font-family:sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;font-size:0.85em}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right}
td.name,th.name{text-align:left}
th{background:#eee;cursor:pointer;user-select:none}
th.sorted-asc::after{content:" \\25B2"} th.sorted-desc::after{content:" \\25BC"}
img.plot{max-width:100%} img.thumb,img.failthumb{width:120px;height:auto}
.fail td{text-align:left}
.flag{color:#b45500;font-size:0.9em;max-width:22em}
"""

_SCRIPT = """
function sortTable(table, col, asc){
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  const key = r => { const c = r.cells[col];
    const v = c.dataset.v !== undefined ? c.dataset.v : c.textContent;
    const f = parseFloat(v); return isNaN(f) ? v : f; };
  rows.sort((a, b) => { const x = key(a), y = key(b);
    if (typeof x === 'number' && typeof y === 'number') return asc ? x - y : y - x;
    return asc ? String(x).localeCompare(String(y)) : String(y).localeCompare(String(x)); });
  rows.forEach(r => body.appendChild(r));
  Array.from(table.tHead.rows[0].cells).forEach((th, i) => {
    th.classList.remove('sorted-asc', 'sorted-desc');
    if (i === col) th.classList.add(asc ? 'sorted-asc' : 'sorted-desc'); });
  table.dataset.sortCol = col; table.dataset.sortAsc = asc ? '1' : '0';
}
document.querySelectorAll('table.sortable').forEach(table => {
  Array.from(table.tHead.rows[0].cells).forEach((th, i) => th.addEventListener('click', () => {
    const asc = !(table.dataset.sortCol == i && table.dataset.sortAsc === '1');
    sortTable(table, i, asc); }));
  const first = table.dataset.initialSort;
  if (first !== undefined) sortTable(table, parseInt(first), true);
});
document.body.dataset.ready = '1';
"""


def _num(x: float, fmt: str) -> str:
    return format(x, fmt) if math.isfinite(x) else "nan"


def render_report(data: ReportData, anisomag: AnisomagSection, max_thumbnails: int = 400) -> str:
    """The HTML text of the page."""
    esc = html.escape
    n_ok, n_fail = len(data.rows), len(data.failures)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>anisoctf report: {esc(data.title)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>anisoctf CTF report: {esc(data.title)}</h1>",
        f'<p id="summary">{n_ok} micrographs fitted, {n_fail} failed{_flag_count(data)}.</p>',
    ]
    if data.rows:
        res = np.array([r.max_resolution for r in data.rows], dtype=float)
        mean = np.array([0.5 * (r.defocus_u + r.defocus_v) for r in data.rows])
        finite = res[np.isfinite(res)]
        parts.append(
            f"<p>median defocus {np.median(mean):,.0f} Å; median fit resolution "
            f"{(np.median(finite) if finite.size else float('nan')):.2f} Å</p>"
        )
        parts.append("<h2>Distributions</h2>")
        parts.append(
            f'<img class="plot" id="histograms" alt="histograms" src="{_histograms(data.rows)}">'
        )
        parts.append("<h2>Astigmatism against defocus (anisotropic magnification)</h2>")
        uri, text = anisomag.image_uri, anisomag.text
        if uri is not None:
            parts.append(f'<img class="plot" id="anisomag" alt="anisomag fit" src="{uri}">')
        parts.append(f"<p>{esc(text)}</p>")

        # thumbnails for the worst fits first (highest resolution number), up to the limit
        order = sorted(
            range(n_ok),
            key=lambda i: (
                -data.rows[i].max_resolution
                if math.isfinite(data.rows[i].max_resolution)
                else -math.inf
            ),
        )
        with_thumb = set(order[: max(0, int(max_thumbnails))])
        parts.append("<h2>Micrographs</h2>")
        parts.append(
            "<p>Click a column header to sort; first sorted by fit resolution. "
            f"Thumbnails: the {min(len(with_thumb), n_ok)} worst fits.</p>"
        )
        heads = [
            ("name", "micrograph"),
            ("", "defocus U (Å)"),
            ("", "defocus V (Å)"),
            ("", "|U − V| (Å)"),
            ("", "angle (°)"),
            ("", "figure of merit"),
            ("", "fit resolution (Å)"),
            ("name", "flags"),
            ("name", "diagnostic"),
        ]
        parts.append('<table class="sortable" id="micrographs" data-initial-sort="6"><thead><tr>')
        parts += [f'<th class="{c}">{esc(h)}</th>' for c, h in heads]
        parts.append("</tr></thead><tbody>")
        for i, r in enumerate(data.rows):
            thumb = ""
            if i in with_thumb and r.name in data.thumbnails:
                t = _thumbnail_uri(data.thumbnails[r.name])
                if t:
                    thumb = f'<img class="thumb" alt="diagnostic" src="{t}">'
            cells = [
                f'<td class="name">{esc(r.name)}</td>',
                f"<td>{_num(r.defocus_u, '.1f')}</td>",
                f"<td>{_num(r.defocus_v, '.1f')}</td>",
                f"<td>{_num(abs(r.defocus_u - r.defocus_v), '.1f')}</td>",
                f"<td>{_num(r.defocus_angle, '.2f')}</td>",
                f"<td>{_num(r.figure_of_merit, '.4f')}</td>",
                f'<td data-v="{r.max_resolution if math.isfinite(r.max_resolution) else 1e9}">'
                f"{_num(r.max_resolution, '.2f')}</td>",
                f'<td class="name flag">{_flag_cell(data.flags.get(r.name, ()))}</td>',
                f'<td class="name">{thumb}</td>',
            ]
            parts.append("<tr>" + "".join(cells) + "</tr>")
        parts.append("</tbody></table>")
    parts.append(f'<h2 id="failures-title">Failures ({n_fail})</h2>')
    if data.failures:
        parts.append('<table class="fail" id="failures"><thead><tr><th>micrograph</th>')
        parts.append("<th>reason</th><th>spectrum</th></tr></thead><tbody>")
        for i, (name, msg) in enumerate(data.failures):
            pic = data.failure_pictures.get(name)
            t = _thumbnail_uri(pic) if pic is not None and i < max_thumbnails else None
            thumb = f'<img class="failthumb" alt="failure picture" src="{t}">' if t else ""
            parts.append(f"<tr><td>{esc(name)}</td><td>{esc(msg)}</td><td>{thumb}</td></tr>")
        parts.append("</tbody></table>")
    else:
        parts.append("<p>none</p>")
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    return "\n".join(parts) + "\n"


def _flag_count(data: ReportData) -> str:
    n = len(data.flags)
    return f", {n} flagged as implausible" if n else ""


def _flag_cell(flags: tuple[str, ...]) -> str:
    """The flags of one micrograph (:mod:`anisoctf.records.flags`), one per line."""
    return "<br>".join(html.escape("⚠ " + f.removeprefix(FLAG_PREFIX)) for f in flags)


def write_report(
    data: ReportData,
    anisomag: AnisomagSection,
    path: str | os.PathLike[str],
    *,
    max_thumbnails: int = 400,
) -> Path:
    """Write the page for ``data`` to ``path``, atomically.

    Raises
    ------
    InputError
        The page cannot be written.
    """
    path = Path(path)
    try:
        write_text_atomic(path, render_report(data, anisomag, max_thumbnails=max_thumbnails))
    except OSError as exc:
        raise InputError(f"cannot write the report ({exc.strerror or exc})", path=path) from None
    return path
