"""The plot of an anisotropic-magnification detection (``anisoctf aniso detect --plot``, the
HTML report).

Two panels, the Cartesian astigmatism components ``a1 = h cos 2θ`` and ``a2 = h sin 2θ``
against the mean defocus, with the fitted line ``a = g m + c``, its bootstrap band, the
constant part ``c`` and the verdict (method: :mod:`anisoctf.magnification.detect`). Drawn with
matplotlib's Agg canvas, no pyplot state; :func:`detection_png` gives the PNG bytes in memory,
:func:`plot_detection` writes them atomically.
"""

from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING

import numpy as np

from anisoctf.io.atomic import write_bytes_atomic
from anisoctf.magnification.detection import AnisoDetection, format_p

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["detection_figure", "detection_png", "plot_detection"]


def detection_figure(detection: AnisoDetection, title: str | None = None) -> Figure:
    """Apparent astigmatism against defocus: two panels (``a1``, ``a2``), fit, band, verdict.

    Points: used micrographs (coloured by weight) and rejected ones (red crosses; drawn at the
    panel edge when they lie outside it). Line: the fit ``a = g m + c``; shaded: its bootstrap
    band; dashed: the constant part ``c`` alone (what the astigmatism would be without anisomag).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    d = detection
    m = np.array([r.mean_defocus for r in d.residuals])
    obs = np.array([r.observed for r in d.residuals]).reshape(-1, 2)
    rej = np.array([r.rejected for r in d.residuals], dtype=bool)
    lo_m, hi_m = float(np.min(m[~rej])), float(np.max(m[~rej]))
    pad = 0.05 * (hi_m - lo_m)
    grid = np.linspace(lo_m - pad, hi_m + pad, 100)
    pred = d.predict(grid)
    band = d.band(grid)

    fig = Figure(figsize=(11.0, 5.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for k, ax in enumerate(axes):
        y_used = obs[~rej, k]
        parts = [y_used, pred[:, k], np.array([d.intercept[k]])]
        if band is not None:
            parts += [band[0][:, k], band[1][:, k]]
        y_lo, y_hi = float(np.min(np.concatenate(parts))), float(np.max(np.concatenate(parts)))
        ypad = 0.08 * max(y_hi - y_lo, 1.0)
        y_lo, y_hi = y_lo - ypad, y_hi + ypad
        if band is not None:
            ax.fill_between(
                grid / 1e4, band[0][:, k], band[1][:, k], color="tab:blue", alpha=0.2,
                lw=0, label=f"{100 * d.confidence:.0f} % bootstrap band",
            )  # fmt: skip
        ax.plot(grid / 1e4, pred[:, k], color="tab:blue", lw=1.6, label="fit  a = g·defocus + c")
        ax.axhline(d.intercept[k], color="0.4", lw=1.0, ls="--", label="constant part c")
        ax.scatter(
            m[~rej] / 1e4, obs[~rej, k], s=18, c="k", alpha=0.8, zorder=3, label="micrographs"
        )
        if np.any(rej):
            ax.scatter(
                m[rej] / 1e4, np.clip(obs[rej, k], y_lo + ypad / 4, y_hi - ypad / 4), s=40,
                marker="x", color="tab:red", zorder=4, label=f"rejected ({int(np.sum(rej))})",
            )  # fmt: skip
        ax.set_ylim(y_lo, y_hi)
        ax.set_xlabel("mean defocus (µm)")
        name = "a1 = h cos 2θ" if k == 0 else "a2 = h sin 2θ"
        ax.set_ylabel(f"apparent astigmatism {name} (Å)")
        ax.grid(alpha=0.3)
        if k == 0:
            ax.legend(loc="best", fontsize=8)
    lo, hi = d.anisotropy_ci
    alo, ahi = d.axis_ci
    verdict = "SIGNIFICANT" if d.significant else "not significant"
    text = (
        f"anisotropy {d.anisotropy_percent:.3f} % [{lo:.3f}, {hi:.3f}]   "
        f"axis {d.axis_deg:.1f}° [{alo:.1f}, {ahi:.1f}]   ({100 * d.confidence:.0f} % CI)\n"
        f"{verdict}: Wald p {format_p(d.p_value)} (threshold {d.p_threshold:g});  "
        f"real astigmatism {d.real_astigmatism:.0f} Å at {d.real_astigmatism_angle:.0f}°;  "
        f"{d.n_used} used, {d.n_rejected} rejected"
    )
    fig.suptitle(title or "anisotropic magnification from CTF astigmatism", fontsize=12)
    fig.text(0.5, 0.015, text, ha="center", va="bottom", fontsize=9.5)
    fig.subplots_adjust(left=0.07, right=0.98, top=0.91, bottom=0.2, wspace=0.25)
    return fig


def detection_png(detection: AnisoDetection, title: str | None = None) -> bytes:
    """The plot of :func:`detection_figure` as PNG bytes (100 dpi, 1100 × 560 pixels)."""
    fig = detection_figure(detection, title)
    buf = io.BytesIO()
    fig.canvas.print_png(buf)
    return buf.getvalue()


def plot_detection(
    detection: AnisoDetection, path: str | os.PathLike[str], title: str | None = None
) -> None:
    """Write the plot of :func:`detection_figure` as a PNG file, atomically."""
    write_bytes_atomic(path, detection_png(detection, title))
