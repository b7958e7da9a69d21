"""The figure of ``anisoctf refine``: one PNG per optics group (matrix evidence and history)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from anisoctf.io.atomic import atomic_path
from anisoctf.refine.group import GroupResult

__all__ = ["plot_refined_group"]


def plot_refined_group(result: GroupResult, path: Path) -> None:
    """Write ``anisomag_group<N>.png``: the evidence of one optics group's refinement.

    Top: anisotropy and axis per frequency shell (with their standard deviations) against the
    all-shell fit, and the anisotropy at every Gauss–Newton step. Bottom: the magnitude of the
    observed displacement per bin in the first step, that of the fitted matrix, and observed
    against model displacements. Written atomically as PNG (90 dpi).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = [e for e in result.evidence if np.isfinite(e.get("anisotropy_percent", np.nan))]
    fig, grid = plt.subplots(2, 3, figsize=(13, 7.6))
    axes = grid[0]
    m = result.mag
    if ev:
        res = np.array([e["resolution"] for e in ev])
        an = np.array([e["anisotropy_along_axis_percent"] for e in ev])
        asd = np.array([e["anisotropy_along_axis_sd"] for e in ev])
        ax_ = np.array([e["axis_deg"] for e in ev])
        axsd = np.array([e["axis_sd"] for e in ev])
        x = 1.0 / res
        axes[0].errorbar(x, an, yerr=asd, fmt="o", capsize=3, label="per shell")
        axes[0].axhline(m.anisotropy_percent, color="C1", label="all shells")
        axes[0].set_xlabel("spatial frequency (1/Å)")
        axes[0].set_ylabel("anisotropy along the axis (%)")
        axes[0].legend(fontsize=8)
        axd = (ax_ - m.axis_deg + 90.0) % 180.0 - 90.0 + m.axis_deg
        axes[1].errorbar(x, axd, yerr=axsd, fmt="o", capsize=3)
        axes[1].axhline(m.axis_deg, color="C1")
        axes[1].set_xlabel("spatial frequency (1/Å)")
        axes[1].set_ylabel("axis (deg)")
    it = result.history
    if it:
        axes[2].plot(range(1, len(it) + 1), [h["anisotropy_percent"] for h in it], "o-")
        axes[2].set_xlabel("Gauss–Newton step")
        axes[2].set_ylabel("anisotropy (%)")
    disp = result.displacement
    if disp is not None:
        obs = np.hypot(
            np.array(disp["observed_x"], dtype=float), np.array(disp["observed_y"], dtype=float)
        )
        mod = np.hypot(
            np.array(disp["model_x"], dtype=float), np.array(disp["model_y"], dtype=float)
        )
        kx = np.array(disp["kx"], dtype=float)
        ky = np.array(disp["ky"], dtype=float)
        ext = [np.nanmin(kx), np.nanmax(kx), np.nanmin(ky), np.nanmax(ky)]
        vmax = np.nanpercentile(mod, 99) * 1.5 if np.any(np.isfinite(mod)) else None
        for ax, img, title in (
            (grid[1, 0], obs, "|displacement| per bin, first step (1/Å)"),
            (grid[1, 1], mod, "|G t| of the fitted matrix (1/Å)"),
        ):
            im = ax.imshow(img, origin="lower", extent=ext, aspect="auto", vmin=0, vmax=vmax)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("kx (1/Å)")
            ax.set_ylabel("ky (1/Å)")
            fig.colorbar(im, ax=ax)
        ox = np.array(disp["observed_x"], dtype=float).ravel()
        oy = np.array(disp["observed_y"], dtype=float).ravel()
        mx = np.array(disp["model_x"], dtype=float).ravel()
        my = np.array(disp["model_y"], dtype=float).ravel()
        grid[1, 2].plot(mx, ox, ".", ms=3, label="x")
        grid[1, 2].plot(my, oy, ".", ms=3, label="y")
        lim = np.nanmax(np.abs(np.concatenate([mx, my]))) if np.any(np.isfinite(mx)) else 1.0
        grid[1, 2].plot([-lim, lim], [-lim, lim], "k-", lw=0.8)
        grid[1, 2].set_xlim(-1.5 * lim, 1.5 * lim)
        grid[1, 2].set_ylim(-3 * lim, 3 * lim)
        grid[1, 2].set_xlabel("model displacement (1/Å)")
        grid[1, 2].set_ylabel("observed displacement (1/Å)")
        grid[1, 2].legend(fontsize=8)
    else:
        for ax in grid[1]:
            ax.axis("off")
    fig.suptitle(
        f"optics group {result.group}: {result.n_particles} particles, "
        f"{m.anisotropy_percent:.3f} % along {m.axis_deg:.1f}°",
        fontsize=10,
    )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
