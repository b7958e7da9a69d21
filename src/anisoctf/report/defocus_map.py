"""The picture of a micrograph's defocus surface, ``<stem>_defocus.png``.

The fitted surface is drawn as a colour map over the micrograph's area (x to the right, y
down, as the micrograph is displayed), with each patch's own estimate as a disc of its colour
(outlined; a patch left out of the surface is a red cross), a colour bar in Å, and a line of
text with the tilt, tilt axis (an arrow along the axis in the map) and thickness. Composed
with Pillow like the CTF diagnostic (no matplotlib), written atomically.
"""

from __future__ import annotations

import math
import os

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw

from anisoctf.io.atomic import write_bytes_atomic
from anisoctf.records.flags import FLAG_PREFIX, is_flag, tilt_support_flag
from anisoctf.records.local import LocalEstimate
from anisoctf.report.diagnostic import _ellipsize, _fonts, _nice_ticks, encode_png

__all__ = ["render_defocus_map"]

# a perceptually ordered dark-blue → green → yellow ramp (viridis-like anchor colours)
_ANCHORS = np.array(
    [
        [68, 1, 84],
        [59, 82, 139],
        [33, 145, 140],
        [94, 201, 98],
        [253, 231, 37],
    ],
    dtype=np.float64,
)


def _colour(v: NDArray) -> NDArray[np.uint8]:
    """Colours for values in [0, 1]."""
    t = np.clip(np.asarray(v, dtype=np.float64), 0.0, 1.0) * (len(_ANCHORS) - 1)
    i = np.minimum(t.astype(int), len(_ANCHORS) - 2)
    f = (t - i)[..., None]
    return (_ANCHORS[i] * (1 - f) + _ANCHORS[i + 1] * f).round().astype(np.uint8)


def _compose(local: LocalEstimate, title: str, pixel_size: float) -> Image.Image:
    fonts = _fonts()
    ny, nx = local.surface.shape
    side = 420
    sx = side / max(nx, ny)
    w_map, h_map = max(1, round(nx * sx)), max(1, round(ny * sx))
    left, top = 20, 56
    bar_x = left + w_map + 24
    width = bar_x + 110
    height = top + max(h_map, 200) + 44
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)

    # the surface on a grid of pixel centres of the map
    gx = (np.arange(w_map) + 0.5) / sx
    gy = (np.arange(h_map) + 0.5) / sx
    xx, yy = np.meshgrid(gx, gy)
    d = local.surface(xx, yy)
    pd = np.array([p.defocus for p in local.patches if math.isfinite(p.defocus)])
    vals = np.concatenate([d.ravel(), pd]) if pd.size else d.ravel()
    lo, hi = float(np.min(vals)), float(np.max(vals))
    if hi - lo < 20.0:  # a flat surface: show ±10 Å around it
        mid = 0.5 * (lo + hi)
        lo, hi = mid - 10.0, mid + 10.0
    img.paste(Image.fromarray(_colour((d - lo) / (hi - lo))), (left, top))
    draw.rectangle([left - 1, top - 1, left + w_map, top + h_map], outline=(0, 0, 0))

    # tilt axis through the centre
    if abs(local.tilt_angle) >= 0.5:
        a = math.radians(local.tilt_axis)
        cxm, cym = left + w_map / 2, top + h_map / 2
        r = 0.45 * min(w_map, h_map)
        dx, dy = r * math.cos(a), r * math.sin(a)
        draw.line([cxm - dx, cym - dy, cxm + dx, cym + dy], fill=(255, 255, 255), width=2)

    # patches
    rad = max(5, round(0.25 * sx * nx / (1 + max(1, round(math.sqrt(len(local.patches)))))))
    rad = min(rad, 14)
    for p in local.patches:
        px, py = left + p.x * sx, top + p.y * sx
        if p.outlier or not math.isfinite(p.defocus):
            draw.line([px - rad, py - rad, px + rad, py + rad], fill=(220, 30, 30), width=3)
            draw.line([px - rad, py + rad, px + rad, py - rad], fill=(220, 30, 30), width=3)
            continue
        c = tuple(int(v) for v in _colour(np.array([(p.defocus - lo) / (hi - lo)]))[0])
        draw.ellipse([px - rad, py - rad, px + rad, py + rad], fill=c, outline=(255, 255, 255))
        draw.ellipse([px - rad - 1, py - rad - 1, px + rad + 1, py + rad + 1], outline=(0, 0, 0))

    # colour bar
    bar_h = h_map
    ramp = np.linspace(1.0, 0.0, bar_h)[:, None].repeat(16, axis=1)
    img.paste(Image.fromarray(_colour(ramp)), (bar_x, top))
    draw.rectangle([bar_x - 1, top - 1, bar_x + 16, top + bar_h], outline=(0, 0, 0))
    for t in _nice_ticks(lo, hi, 6):
        yv = top + (hi - t) / (hi - lo) * (bar_h - 1)
        draw.line([bar_x + 16, yv, bar_x + 21, yv], fill=(0, 0, 0))
        draw.text((bar_x + 24, yv - 7), f"{t:,.0f}", font=fonts["small"], fill=(0, 0, 0))
    draw.text((bar_x - 4, top + bar_h + 6), "defocus (Å)", font=fonts["small"], fill=(0, 0, 0))

    # text
    draw.text((left, 8), title, font=fonts["title"], fill=(0, 0, 0))
    parts = [f"tilt {local.tilt_angle:.1f}° (±{local.tilt_sigma:.1f}°)"]
    parts.append(f"axis {local.tilt_axis:.1f}°")
    if local.thickness is not None:
        known = np.isfinite(local.thickness)
        parts.append(f"thickness {local.thickness:.0f} Å" if known else "thickness: at limit")
    n_out = sum(p.outlier for p in local.patches)
    parts.append(f"{len(local.patches) - n_out}/{len(local.patches)} patches used")
    draw.text((left, 32), "   ".join(parts), font=fonts["info"], fill=(0, 0, 0))
    foot = f"{nx}×{ny} px at {pixel_size:.3g} Å; discs: patch estimates; crosses: left out"
    draw.text((left, top + h_map + 8), foot, font=fonts["small"], fill=(90, 90, 90))
    flags = [f for f in (tilt_support_flag(local.patch_outliers),) if f]
    flags += [w for w in local.warnings if is_flag(w) and w not in flags]
    if flags:  # implausible numbers, in the warning colour under the caption
        more = f"   (+{len(flags) - 1} more)" if len(flags) > 1 else ""
        small = fonts["small"]
        line = _ellipsize("⚠ " + flags[0].removeprefix(FLAG_PREFIX), small, width - left - 8)
        draw.text((left, top + h_map + 24), line + more, font=small, fill=(190, 85, 0))
    return img


def render_defocus_map(
    local: LocalEstimate, path: str | os.PathLike[str], title: str = "", pixel_size: float = 1.0
) -> None:
    """Write the defocus-surface picture of ``local`` as a PNG, atomically.

    Parameters
    ----------
    local
        The local estimate.
    path
        Output file (conventionally ``<stem>_defocus.png``); the directory must exist.
    title
        Shown at the top (e.g. the micrograph's name).
    pixel_size
        Å per micrograph pixel (for the caption).
    """
    write_bytes_atomic(path, encode_png(np.asarray(_compose(local, title, pixel_size))))
