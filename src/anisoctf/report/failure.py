"""The diagnostic picture of a micrograph whose fit failed: its spectrum and why it failed.

A failed micrograph gets a ``<stem>_ctf.png`` like a successful one (same size, same place of
the spectrum panel), so that a person browsing a data set's pictures sees at once what the
failed ones look like (no rings, ice rings only, carbon, drift, a wrong pixel size) next to
the reason written in the record. The left panel is the micrograph's averaged periodogram as
a centred square, on a log scale with its radial mean removed (the Thon rings and any
anisotropy stand out, as in CTFFIND's and cryoSPARC's "raw" spectrum displays); the right
column gives the reason, word-wrapped. When the micrograph could not even be read there is no
spectrum, only the reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from anisoctf.io.atomic import write_bytes_atomic
from anisoctf.report.diagnostic import (
    _FRAME,
    _MARGIN,
    _MUTED,
    _RIGHT_X0,
    _SPEC_SIZE,
    _SPEC_X0,
    _SPEC_Y0,
    _WARN,
    WIDTH,
    _ellipsize,
    _robust_range,
    _text_centred,
    _titled_canvas,
    _to_gray,
    encode_png,
    full_plane,
)

__all__ = ["failure_picture", "render_failure"]


def render_failure(
    path: str | Path,
    title: str,
    reason: str,
    power: NDArray[np.floating] | None = None,
    pixel_size: float | None = None,
) -> None:
    """Write the picture of a failed fit as a PNG, atomically.

    Parameters
    ----------
    path
        Where to write (conventionally ``<stem>_ctf.png``); the directory must exist.
    title
        The micrograph's name.
    reason
        Why it failed (the one-line message of the record).
    power
        The averaged periodogram, half-plane ``n × (n//2 + 1)`` in FFT order, or None when
        there is none (the file could not be read).
    pixel_size
        Its pixel size (Å), for the Nyquist label.
    """
    data = encode_png(np.asarray(failure_picture(title, reason, power, pixel_size)))
    write_bytes_atomic(path, data, durable=False)


def failure_picture(
    title: str,
    reason: str,
    power: NDArray[np.floating] | None = None,
    pixel_size: float | None = None,
) -> Image.Image:
    """The picture of :func:`render_failure` as a Pillow image."""
    canvas, draw, fonts = _titled_canvas(title)
    x0, y0, s = _SPEC_X0, _SPEC_Y0, _SPEC_SIZE
    gray = _spectrum_gray(power) if power is not None else None
    if gray is not None:
        canvas.paste(Image.fromarray(gray), (x0, y0))
        label = "spectrum (log, radial mean removed)"
        if pixel_size and np.isfinite(pixel_size) and pixel_size > 0:
            label += f"  ·  edge: Nyquist {2 * pixel_size:.2f} Å"
    else:
        label = "no spectrum: the micrograph could not be read"
    draw.rectangle((x0 - 1, y0 - 1, x0 + s, y0 + s), outline=_FRAME)
    _text_centred(draw, x0 + s * 0.5, y0 + s + 5, label, fonts["small"], _MUTED)

    draw.text((_RIGHT_X0, y0), "Fit failed", font=fonts["title"], fill=_WARN)
    y = y0 + 30
    for line in _wrap(f"⚠ {reason}", fonts["info"], WIDTH - _MARGIN - _RIGHT_X0)[:14]:
        draw.text((_RIGHT_X0, y), line, font=fonts["info"], fill=_WARN)
        y += 21
    draw.text(
        (_RIGHT_X0, y + 10),
        "No CTF was fitted: this micrograph has no row in micrographs_ctf.star.",
        font=fonts["small"],
        fill=_MUTED,
    )
    return canvas


def _spectrum_gray(power: NDArray[np.floating]) -> NDArray[np.uint8] | None:
    """Display gray levels (``_SPEC_SIZE`` square) of a half-plane periodogram: log power
    minus its radial mean."""
    half = np.asarray(power, dtype=np.float64)
    if half.ndim != 2 or half.shape[0] < 4 or half.shape[1] != half.shape[0] // 2 + 1:
        return None
    n = half.shape[0]
    logp = np.log(np.maximum(half, 1e-30))
    ky = np.fft.fftfreq(n)[:, None] * n
    kx = np.arange(half.shape[1])[None, :]
    r = np.rint(np.hypot(kx, ky)).astype(np.int64)
    finite = np.isfinite(logp)
    cnt = np.bincount(r[finite], minlength=r.max() + 1)
    tot = np.bincount(r[finite], weights=logp[finite], minlength=r.max() + 1)
    radial = tot / np.maximum(cnt, 1)
    flat = np.where(finite, logp - radial[r], 0.0)
    flat[0, 0] = 0.0
    # reduce to the display first, then set the contrast on what is shown: a large box's
    # per-pixel noise averages out there, and percentiles of the full grid would wash it out
    img = Image.fromarray(full_plane(flat.astype(np.float32)), mode="F")
    if n != _SPEC_SIZE:
        resample = Image.Resampling.BOX if n > _SPEC_SIZE else Image.Resampling.BILINEAR
        img = img.resize((_SPEC_SIZE, _SPEC_SIZE), resample=resample)
    shown = np.asarray(img, dtype=np.float32)
    c = _SPEC_SIZE / 2
    yy, xx = np.mgrid[0:_SPEC_SIZE, 0:_SPEC_SIZE]
    rd = np.hypot(yy + 0.5 - c, xx + 0.5 - c)
    band = (rd >= _SPEC_SIZE / 64) & (rd <= c)
    lo, hi = _robust_range(shown[band], 1.0, 99.5)
    return _to_gray(shown.copy(), lo, hi).astype(np.uint8)


def _wrap(text: str, font, width: float) -> list[str]:
    """Greedy word wrap of ``text`` to lines of at most ``width`` pixels."""
    lines: list[str] = []
    line = ""
    for word in " ".join(str(text).split()).split(" "):
        trial = f"{line} {word}".strip()
        if line and font.getlength(trial) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    if line:
        lines.append(line)
    return [_ellipsize(x, font, width) for x in lines]
