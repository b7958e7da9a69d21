"""The per-micrograph diagnostic picture ``<stem>_ctf.png``.

One picture lets a person judge a CTF fit at a glance, in the style of CTFFIND's and
cryoSPARC's diagnostics:

* left: the 2D power spectrum as a centred square (zero frequency in the middle), the observed
  spectrum in the left half and the fitted CTF² in the right half, so that the rings of the two
  halves continue into each other across the vertical centre line when the fit is right; dotted
  circles mark the limits of the fitted band;
* right: the 1D equiphase-averaged profile (observed and fitted) against spatial frequency with
  the axis labelled in Å, the local agreement ("quality", 0–1, right-hand axis), a dashed marker
  at the fit resolution and the frequencies outside the fitted band shaded;
* text: title, defocus U/V, angle, astigmatism, phase shift, figure of merit, fit resolution,
  pixel size, optics, and the estimate's warnings.

The picture is composed directly with numpy and Pillow's ImageDraw (no matplotlib figure,
which alone takes over 100 ms) and written by a small PNG encoder; the whole takes a few tens
of milliseconds for a 512-pixel spectrum. Nothing here touches global state (fonts are
cached per thread), so pictures may be rendered from several threads or processes at once.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import struct
import threading
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont

from anisoctf.fit.result import CTFEstimate, FitDiagnostics
from anisoctf.io.atomic import write_bytes_atomic
from anisoctf.report.display_model import display_ctf2, display_frequencies

__all__ = ["render_diagnostic"]

# ---------------------------------------------------------------------------------------------
# Layout (pixels). The picture always has the same size so that pictures of a data set can be
# browsed or tiled side by side.
WIDTH, HEIGHT = 960, 512
_MARGIN = 12
_SPEC_X0, _SPEC_Y0, _SPEC_SIZE = _MARGIN, 40, 384  # spectrum panel (square)
_RIGHT_X0 = _SPEC_X0 + _SPEC_SIZE + 30  # left edge of the right-hand column
_PLOT = (_RIGHT_X0 + 46, 150, WIDTH - 40, 404)  # profile plot area (x0, y0, x1, y1)
_SUPERSAMPLE = 2  # the curves are drawn at 2x and reduced: cheap anti-aliasing
_DIM_OUTSIDE_BAND = 0.35  # brightness of the fitted CTF² outside the fit band
_PNG_COMPRESS_LEVEL = 1  # fast; the spectrum's noise barely compresses at higher levels

_WHITE = (255, 255, 255)
_TEXT = (25, 25, 25)
_MUTED = (110, 110, 110)
_FRAME = (120, 120, 120)
_GRID = (228, 228, 228)
_SHADE = (238, 238, 238)
_OBSERVED = (70, 70, 70)
_FIT = (214, 39, 40)
_FIT_FADED = (240, 160, 160)
_QUALITY = (44, 160, 44)
_MARKER = (31, 119, 180)
_BAND_CIRCLE = (255, 190, 40)
_WARN = (190, 85, 0)

# Resolutions (Å) used as x-axis ticks, in order of preference.
_RES_TICKS = (
    (10.0, 5.0, 3.0, 20.0, 4.0, 2.0, 2.5, 50.0, 1.5, 1.0),
    (30.0, 15.0, 8.0, 6.0, 3.5, 2.2, 1.8, 1.2, 0.8),
    (100.0, 40.0, 25.0, 12.0, 7.0, 4.5, 2.8, 1.6, 1.4, 0.9),
)
_MIN_TICK_GAP = 40  # px between x tick labels


# ---------------------------------------------------------------------------------------------
# Public API


def render_diagnostic(
    estimate: CTFEstimate,
    path: str | Path,
    title: str = "",
    warnings: Sequence[str] | None = None,
) -> None:
    """Write the diagnostic picture of a CTF fit as a PNG.

    The file is written atomically (:func:`anisoctf.io.atomic.write_bytes_atomic`): the picture
    goes to a hidden temporary file in the same directory, which is then renamed over ``path``;
    on any error the temporary file is removed and ``path`` is left as it was.

    Parameters
    ----------
    estimate
        The fit; its ``diagnostics`` must be present.
    path
        Where to write the PNG (conventionally ``<stem>_ctf.png``). The directory must exist.
    title
        Shown at the top (e.g. the micrograph's name).
    warnings
        The remarks to show (flags of implausible numbers first); default the estimate's.

    Raises
    ------
    ValueError
        If the estimate carries no diagnostics or their arrays do not fit together.
    OSError
        If the file cannot be written.
    """
    data = encode_png(np.asarray(_compose(estimate, title, warnings)))
    # a picture is cheap to make again: atomic (a hidden temporary renamed into place, which a
    # killed run's successor removes), but not fsynced
    write_bytes_atomic(path, data, durable=False)


def encode_png(rgb: NDArray[np.uint8]) -> bytes:
    """A minimal PNG (8-bit RGB, no row filter, zlib level 1) of an ``h × w × 3`` image.

    About 1.5x faster than Pillow's encoder, whose per-row adaptive filter choice buys little
    on a picture that is mostly flat background plus a noisy spectrum.
    """
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"need an h x w x 3 uint8 image, got {rgb.dtype} {rgb.shape}")
    h, w, _ = rgb.shape
    rows = np.empty((h, 1 + 3 * w), dtype=np.uint8)
    rows[:, 0] = 0  # filter type "none" for every row
    rows[:, 1:] = rgb.reshape(h, 3 * w)

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(payload, zlib.crc32(kind))
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bit, truecolour, no interlace
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            chunk(b"IHDR", header),
            chunk(b"IDAT", zlib.compress(rows.tobytes(), _PNG_COMPRESS_LEVEL)),
            chunk(b"IEND", b""),
        )
    )


# ---------------------------------------------------------------------------------------------
# Composition


def _titled_canvas(title: str) -> tuple[Image.Image, ImageDraw.ImageDraw, dict[str, object]]:
    """A white page of the diagnostic's size with ``title`` (shortened to fit) at the top."""
    canvas = Image.new("RGB", (WIDTH, HEIGHT), _WHITE)
    draw = ImageDraw.Draw(canvas)
    fonts = _fonts()
    if title:
        draw.text(
            (_MARGIN, 10),
            _ellipsize(title, fonts["title"], WIDTH - 2 * _MARGIN),
            font=fonts["title"],
            fill=_TEXT,
        )
    return canvas, draw, fonts


def _compose(
    estimate: CTFEstimate, title: str, warnings: Sequence[str] | None = None
) -> Image.Image:
    diag = estimate.diagnostics
    if diag is None:
        raise ValueError("the CTF estimate carries no diagnostics; fit with diagnostics to plot")
    _check_diagnostics(diag)

    canvas, draw, fonts = _titled_canvas(title)
    _draw_spectrum_panel(canvas, draw, estimate, diag, fonts)
    _draw_info(draw, estimate, diag, fonts)
    _draw_profile_panel(canvas, draw, estimate, diag, fonts)
    _draw_warnings(draw, estimate.warnings if warnings is None else warnings, fonts)
    return canvas


def _check_diagnostics(diag: FitDiagnostics) -> None:
    spec = np.asarray(diag.spectrum)
    model = np.asarray(diag.model)
    if spec.ndim != 2 or spec.shape != model.shape:
        raise ValueError(
            f"diagnostic spectrum and model must be 2D arrays of the same shape, got "
            f"{spec.shape} and {model.shape}"
        )
    n, nh = spec.shape
    if n < 4 or n not in (2 * (nh - 1), 2 * (nh - 1) + 1):
        raise ValueError(
            f"diagnostic spectrum must be a half-plane rfft grid n x (n//2 + 1), got {spec.shape}"
        )
    sizes = {np.asarray(a).shape for a in (diag.k, diag.profile, diag.profile_fit, diag.quality)}
    if len(sizes) != 1 or len(next(iter(sizes))) != 1:
        raise ValueError(
            "diagnostic profiles k, profile, profile_fit and quality must be 1D "
            "arrays of the same length"
        )
    if not (np.isfinite(diag.pixel_size) and diag.pixel_size > 0):
        raise ValueError(f"diagnostic pixel size must be positive, got {diag.pixel_size}")


# --- spectrum ------------------------------------------------------------------------------


def full_plane(half: NDArray[np.floating]) -> NDArray[np.float32]:
    """The full, centred plane (zero frequency at ``[n//2, n//2]``) of a half-plane spectrum.

    ``half`` is ``n × (n//2 + 1)`` in FFT order as from ``rfft2``; the missing columns follow
    from the symmetry of a power spectrum, ``S(-k) = S(k)``.
    """
    half = np.asarray(half, dtype=np.float32)
    n, nh = half.shape
    full = np.empty((n, n), dtype=np.float32)
    full[:, :nh] = half
    # column j >= nh holds kx = j - n < 0: S(ky, kx) = S(-ky, -kx) = half[-ky, n - j]
    rows = (-np.arange(n)) % n
    full[:, nh:] = half[rows][:, n - nh : 0 : -1]
    return np.fft.fftshift(full)


def _band_values(a: NDArray[np.floating], kr: NDArray[np.float64], band: tuple[float, float]):
    lo, hi = band
    vals = a[(kr >= lo) & (kr <= hi)]
    if vals.size < 16:
        vals = a.ravel()
    vals = vals[np.isfinite(vals)]
    return vals


def _robust_range(vals: NDArray[np.floating], q_lo: float, q_hi: float) -> tuple[float, float]:
    if vals.size == 0:
        return 0.0, 1.0
    if vals.size > 40000:  # percentiles of a subsample are as good and much cheaper
        vals = vals[:: vals.size // 20000]
    lo, hi = np.percentile(vals, [q_lo, q_hi])
    lo, hi = float(lo), float(hi)
    if not hi > lo:
        hi = lo + 1.0
    return lo, hi


def _to_gray(a: NDArray[np.float32], lo: float, hi: float) -> NDArray[np.float32]:
    out = (a - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    np.clip(out, 0.0, 255.0, out=out)
    return np.nan_to_num(out, copy=False, nan=0.0)


def _draw_spectrum_panel(canvas, draw, estimate: CTFEstimate, diag: FitDiagnostics, fonts) -> None:
    spec = np.asarray(diag.spectrum, dtype=np.float32)
    model = np.asarray(diag.model, dtype=np.float32)
    n = spec.shape[0]

    # radial frequency on the half-plane grid, for the contrast percentiles within the band
    ky = np.fft.fftfreq(n, d=diag.pixel_size)[:, None]
    kx = np.fft.rfftfreq(n, d=diag.pixel_size)[None, :]
    kr = np.sqrt(kx * kx + ky * ky)
    band = diag.fit_band
    s_lo, s_hi = _robust_range(_band_values(spec, kr, band), 1.0, 99.5)
    m_lo, m_hi = _robust_range(_band_values(model, kr, band), 0.5, 99.5)

    # observed half: the spectrum's grid reduced (or enlarged) to the display
    obs = Image.fromarray(full_plane(_to_gray(spec, s_lo, s_hi)).astype(np.uint8))  # mode L
    if n != _SPEC_SIZE:
        resample = Image.Resampling.BOX if n > _SPEC_SIZE else Image.Resampling.BILINEAR
        obs = obs.resize((_SPEC_SIZE, _SPEC_SIZE), resample=resample)
    composite = np.asarray(obs, dtype=np.float32).copy()
    # fitted half: CTF² evaluated at the display's own pixels, rings finer than the display
    # can draw faded to their mean (no aliasing rings: report.display_model); dimmed outside
    # the fitted band, where it only shows what the fit implies
    c0 = n // 2  # zero-frequency column after fftshift
    split = int(round(_SPEC_SIZE * (c0 + 0.5) / n - 0.5))  # the zero column on the display
    kx_d, ky_d = display_frequencies(n, _SPEC_SIZE, diag.pixel_size)
    kr_d = np.hypot(kx_d[:, split:], ky_d)
    model_d = display_ctf2(
        estimate.params, estimate.optics, n, _SPEC_SIZE, diag.pixel_size, first_column=split
    )
    model_gray = _to_gray(model_d, m_lo, m_hi)
    model_gray[(kr_d < band[0]) | (kr_d > band[1])] *= np.float32(_DIM_OUTSIDE_BAND)
    composite[:, split:] = model_gray
    canvas.paste(Image.fromarray(composite.astype(np.uint8)), (_SPEC_X0, _SPEC_Y0))

    # dotted circles at the band limits (radius in display pixels: k / k_nyquist * size / 2)
    k_nyq = 0.5 / diag.pixel_size
    scale = _SPEC_SIZE / n
    cx = _SPEC_X0 + (c0 + 0.5) * scale
    cy = _SPEC_Y0 + (c0 + 0.5) * scale
    for k in band:
        r = k / k_nyq * (n / 2) * scale
        if not (np.isfinite(r) and 4 < r < _SPEC_SIZE * 0.7):
            continue
        t = np.arange(0.0, 2 * np.pi, 1.0 / r)  # ~1 px apart
        t = t[(np.arange(t.size) // 3) % 2 == 0]  # 3 px on, 3 px off
        pts = np.column_stack([cx + r * np.cos(t), cy + r * np.sin(t)])
        draw.point(np.round(pts).ravel().tolist(), fill=_BAND_CIRCLE)

    x0, y0, s = _SPEC_X0, _SPEC_Y0, _SPEC_SIZE
    draw.rectangle((x0 - 1, y0 - 1, x0 + s, y0 + s), outline=_FRAME)
    small = fonts["small"]
    y_lab = y0 + s + 5
    _text_centred(draw, x0 + s * 0.25, y_lab, "observed", small, _TEXT)
    _text_centred(draw, x0 + s * 0.75, y_lab, "fit (CTF²)", small, _FIT)
    _text_centred(
        draw,
        x0 + s * 0.5,
        y_lab + 17,
        f"edge: Nyquist {2 * diag.pixel_size:.2f} Å   ·   dotted: fit band "
        f"{_res_text_k(band[0])}–{_res_text_k(band[1])} Å",
        small,
        _MUTED,
    )


# --- text ----------------------------------------------------------------------------------


def _draw_info(draw, estimate: CTFEstimate, diag: FitDiagnostics, fonts) -> None:
    p = estimate.params
    o = estimate.optics
    lab, val = (fonts["info"], _MUTED), (fonts["info_bold"], _TEXT)

    def run(*parts: tuple[str, bool]) -> list[tuple[str, object, tuple[int, int, int]]]:
        return [(t, *(val if bold else lab)) for t, bold in parts]

    lines = [
        run(
            ("Defocus U ", False),
            (f"{p.defocus_u:.0f} Å", True),
            ("   V ", False),
            (f"{p.defocus_v:.0f} Å", True),
            ("   angle ", False),
            (f"{p.angle_deg:.1f}°", True),
        ),
        run(
            ("Astigmatism ", False),
            (f"{p.astigmatism:.0f} Å", True),
            ("   mean defocus ", False),
            (f"{p.mean_defocus:.0f} Å", True),
        ),
        run(
            ("Fit resolution ", False),
            (f"{_res_text(estimate.fit_resolution)} Å", True),
            ("   FOM ", False),
            (f"{estimate.figure_of_merit:.3f}", True),
            ("   pixel ", False),
            (f"{o.pixel_size:.3f} Å", True),
        ),
    ]
    if p.phase_shift_deg:
        lines[1] += run(("   phase shift ", False), (f"{p.phase_shift_deg:.1f}°", True))
    y = _SPEC_Y0
    for parts in lines:
        _draw_runs(draw, _RIGHT_X0, y, parts)
        y += 21

    optics = []
    if not math.isclose(diag.pixel_size, o.pixel_size, rel_tol=1e-4):
        optics.append(f"fitted at {diag.pixel_size:.3f} Å/px")
    optics += [
        f"{o.voltage_kv:g} kV",
        f"Cs {o.cs_mm:g} mm",
        f"amp. contrast {o.amplitude_contrast:g}",
    ]
    if estimate.n_tiles > 1:  # a pooled spectrum (tiles or particles); 1 = one periodogram
        optics.append(f"{estimate.n_tiles:.0f} periodograms pooled")
    if o.has_anisomag:
        (a, b), (c, d) = o.mag_matrix
        optics.append(f"mag. matrix [{a:.4f} {b:.4f}; {c:.4f} {d:.4f}]")
    draw.text(
        (_RIGHT_X0, y + 1),
        _ellipsize("  ·  ".join(optics), fonts["small"], WIDTH - _MARGIN - _RIGHT_X0),
        font=fonts["small"],
        fill=_MUTED,
    )


def _draw_warnings(draw, warnings: Sequence[str], fonts) -> None:
    font = fonts["info"]
    y0 = HEIGHT - 46
    width = WIDTH - 2 * _MARGIN
    if not warnings:
        draw.text((_MARGIN, y0 + 10), "No warnings.", font=fonts["small"], fill=_MUTED)
        return
    shown = list(warnings[:2])
    for i, warning in enumerate(shown):
        more = f"   (+{len(warnings) - 2} more)" if i == 1 and len(warnings) > 2 else ""
        line = _ellipsize(f"⚠ {warning}", font, width - font.getlength(more)) + more
        draw.text((_MARGIN, y0 + 21 * i), line, font=font, fill=_WARN)


# --- profile -------------------------------------------------------------------------------


def _draw_profile_panel(canvas, draw, estimate: CTFEstimate, diag: FitDiagnostics, fonts) -> None:
    k = np.asarray(diag.k, dtype=np.float64)
    obs = np.asarray(diag.profile, dtype=np.float64)
    fit = np.asarray(diag.profile_fit, dtype=np.float64)
    qual = np.asarray(diag.quality, dtype=np.float64)
    k_lo_band, k_hi_band = diag.fit_band

    x0, y0, x1, y1 = _PLOT
    w, h = x1 - x0, y1 - y0
    finite_k = k[np.isfinite(k)]
    k_max = float(finite_k.max()) if finite_k.size else 0.5 / diag.pixel_size
    if not k_max > 0:
        k_max = 0.5 / diag.pixel_size
    k_min = 0.0

    # y range of the profiles from their values within the band
    in_band = (k >= k_lo_band) & (k <= k_hi_band)
    if np.count_nonzero(in_band) < 4:
        in_band = np.isfinite(k)
    vals = np.concatenate([obs[in_band], fit[in_band]])
    vals = vals[np.isfinite(vals)]
    if vals.size:
        v_lo, v_hi = (float(x) for x in np.percentile(vals, [0.5, 99.5]))
        fit_in = fit[in_band]
        fit_in = fit_in[np.isfinite(fit_in)]
        if fit_in.size:  # keep the fit's zeros on the plot
            v_lo = min(v_lo, float(fit_in.min()))
    else:
        v_lo, v_hi = 0.0, 1.0
    if not v_hi > v_lo:
        v_lo, v_hi = v_lo - 0.5, v_lo + 0.5
    pad = 0.06 * (v_hi - v_lo)
    v_lo, v_hi = v_lo - pad, v_hi + pad

    ss = _SUPERSAMPLE
    plot = Image.new("RGB", (w * ss, h * ss), _WHITE)
    pd = ImageDraw.Draw(plot)

    def px(kv):  # k -> x in supersampled plot coordinates
        return (np.asarray(kv, dtype=np.float64) - k_min) / (k_max - k_min) * (w * ss - 1)

    def py(v):  # profile value -> y
        v = np.clip(np.asarray(v, dtype=np.float64), v_lo, v_hi)
        return (v_hi - v) / (v_hi - v_lo) * (h * ss - 1)

    q_pad = 0.06 * h * ss

    def qy(q):  # quality (0..1) -> y
        q = np.clip(np.asarray(q, dtype=np.float64), 0.0, 1.0)
        return q_pad + (1.0 - q) * (h * ss - 1 - 2 * q_pad)

    # shading outside the fitted band
    if k_lo_band > k_min:
        pd.rectangle((0, 0, float(px(min(k_lo_band, k_max))), h * ss), fill=_SHADE)
    if k_hi_band < k_max:
        pd.rectangle((float(px(max(k_hi_band, k_min))), 0, w * ss, h * ss), fill=_SHADE)

    # grid
    x_ticks = _resolution_ticks(k_min, k_max, w)
    y_ticks = _nice_ticks(v_lo, v_hi, 5)
    for r in x_ticks:
        xv = float(px(1.0 / r))
        pd.line((xv, 0, xv, h * ss), fill=_GRID, width=ss)
    for t in y_ticks:
        yv = float(py(t))
        pd.line((0, yv, w * ss, yv), fill=_GRID, width=ss)

    # curves: quality underneath, then the fit as a broad band, then the observed profile as
    # a thin line on top: where the two agree the observed trace stays visible inside the
    # fit's band (the fit must never hide what was measured), and the fit shows at its edges
    xs = px(k)
    band_k = (k >= k_lo_band) & (k <= k_hi_band)
    everywhere = np.ones(k.shape, dtype=bool)
    for ys, colour, width, where in (
        (qy(qual), _QUALITY, 2 * ss, everywhere),
        (py(fit), _FIT_FADED, ss, everywhere),  # the fit outside the band: faint
        (py(fit), _FIT, 3 * ss, band_k),
        (py(obs), _OBSERVED, ss, everywhere),
    ):
        finite = np.isfinite(xs) & np.isfinite(ys) & np.isfinite(k) & where
        for seg in _runs(finite):
            pts = np.column_stack([xs[seg], ys[seg]]).ravel().tolist()
            if len(pts) >= 4:
                pd.line(pts, fill=colour, width=width, joint="curve")

    # fit-resolution marker (dashed)
    res = estimate.fit_resolution
    k_res = 1.0 / res if (np.isfinite(res) and res > 0) else float("nan")
    x_res = None
    if k_min < k_res <= k_max:
        x_res = float(px(k_res))
        dash = 6 * ss
        for ya in range(0, h * ss, 2 * dash):
            pd.line((x_res, ya, x_res, min(ya + dash, h * ss)), fill=_MARKER, width=ss + 1)

    canvas.paste(plot.reduce(ss) if ss > 1 else plot, (x0, y0))

    # axes, ticks and labels at 1x
    small = fonts["small"]
    draw.rectangle((x0 - 1, y0 - 1, x1, y1), outline=_FRAME)
    for r in x_ticks:
        xv = x0 + float(px(1.0 / r)) / ss
        draw.line((xv, y1, xv, y1 + 4), fill=_FRAME)
        _text_centred(draw, xv, y1 + 6, _res_text(r), small, _TEXT)
    _text_centred(draw, (x0 + x1) / 2, y1 + 24, "resolution (Å)", small, _MUTED)
    step = y_ticks[1] - y_ticks[0] if len(y_ticks) > 1 else 1.0
    decimals = max(0, -int(math.floor(math.log10(step)))) if step > 0 else 0
    for t in y_ticks:
        yv = y0 + float(py(t)) / ss
        draw.line((x0 - 5, yv, x0 - 1, yv), fill=_FRAME)
        label = f"{t:.{decimals}f}"
        draw.text((x0 - 7 - small.getlength(label), yv - 7), label, font=small, fill=_TEXT)
    for q in (0.0, 0.5, 1.0):
        yv = y0 + float(qy(q)) / ss
        draw.line((x1, yv, x1 + 4, yv), fill=_QUALITY)
        draw.text((x1 + 7, yv - 7), f"{q:g}", font=small, fill=_QUALITY)
    if x_res is not None:
        xr = x0 + x_res / ss
        label = f"{_res_text(res)} Å"
        lw = small.getlength(label)
        lx = xr + 4 if xr + 4 + lw < x1 - 2 else xr - 4 - lw
        draw.rectangle((lx - 1, y0 + 3, lx + lw + 1, y0 + 18), fill=_WHITE)
        draw.text((lx, y0 + 3), label, font=small, fill=_MARKER)

    # legend above the plot
    lx, ly = _RIGHT_X0, y0 - 24
    items = (
        ("observed", _OBSERVED, "line"),
        ("fit", _FIT, "line"),
        ("quality (right axis)", _QUALITY, "line"),
        ("fit resolution", _MARKER, "dash"),
        ("outside band", _SHADE, "box"),
    )
    for label, colour, kind in items:
        yc = ly + 8
        if kind == "line":
            draw.line((lx, yc, lx + 18, yc), fill=colour, width=2)
        elif kind == "dash":
            draw.line((lx, yc, lx + 6, yc), fill=colour, width=2)
            draw.line((lx + 11, yc, lx + 18, yc), fill=colour, width=2)
        else:
            draw.rectangle((lx, yc - 5, lx + 18, yc + 5), fill=colour, outline=_FRAME)
        draw.text((lx + 22, ly), label, font=small, fill=_TEXT)
        lx += 22 + small.getlength(label) + 14


def _resolution_ticks(k_min: float, k_max: float, width_px: int) -> list[float]:
    """Round resolutions (Å) to label on a linear frequency axis, at least a label apart."""
    chosen: list[float] = []
    span = k_max - k_min
    for level in _RES_TICKS:
        for r in level:
            x = (1.0 / r - k_min) / span * width_px
            if not (12 <= x <= width_px - 8):
                continue
            if all(abs(x - (1.0 / c - k_min) / span * width_px) >= _MIN_TICK_GAP for c in chosen):
                chosen.append(r)
    return sorted(chosen, reverse=True)


def _nice_ticks(lo: float, hi: float, target: int) -> list[float]:
    span = hi - lo
    if not (np.isfinite(span) and span > 0):
        return [lo]
    raw = span / max(target - 1, 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    ticks = []
    t = first
    while t <= hi + 1e-9 * span:
        ticks.append(0.0 if abs(t) < 1e-12 * step else t)
        t += step
    return ticks


def _runs(mask: NDArray[np.bool_]) -> Iterator[slice]:
    """Slices of the contiguous True runs of a 1D mask."""
    if mask.all():
        yield slice(0, mask.size)
        return
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.view(np.int8), [0]])))
    for a, b in zip(edges[::2], edges[1::2], strict=True):
        yield slice(int(a), int(b))


# --- small helpers -------------------------------------------------------------------------


def _res_text(r: float) -> str:
    if not np.isfinite(r) or r <= 0:
        return "–"
    if r >= 100:
        return f"{r:.0f}"
    if r >= 10:
        return f"{r:.1f}".removesuffix(".0")
    return f"{r:.2f}".rstrip("0").rstrip(".")


def _res_text_k(k: float) -> str:
    """Resolution text of a frequency (Å⁻¹); ∞ for zero."""
    return "∞" if not k > 0 else _res_text(1.0 / k)


def _text_centred(draw, x: float, y: float, text: str, font, fill) -> None:
    draw.text((x - font.getlength(text) / 2, y), text, font=font, fill=fill)


def _draw_runs(draw, x: float, y: float, parts) -> None:
    for text, font, fill in parts:
        draw.text((x, y), text, font=font, fill=fill)
        x += font.getlength(text)


def _ellipsize(text: str, font, width: float) -> str:
    text = " ".join(str(text).split())
    if font.getlength(text) <= width:
        return text
    lo, hi = 0, len(text)
    while lo < hi:  # longest prefix that fits with the ellipsis
        mid = (lo + hi + 1) // 2
        if font.getlength(text[:mid] + "…") <= width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip() + "…"


# --- fonts ---------------------------------------------------------------------------------

_FONT_SIZES = {
    "title": (17, True),
    "info": (14, False),
    "info_bold": (14, True),
    "small": (12, False),
}
_local = threading.local()


def _font_dirs() -> list[str]:
    dirs = []
    spec = importlib.util.find_spec("matplotlib")  # DejaVu ships with matplotlib; no import
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            dirs.append(os.path.join(loc, "mpl-data", "fonts", "ttf"))
    return dirs


def _load_font(size: int, bold: bool):
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    for d in _font_dirs():
        with contextlib.suppress(OSError):
            return ImageFont.truetype(os.path.join(d, name), size)
    with contextlib.suppress(OSError):
        return ImageFont.truetype(name, size)  # Pillow searches the system's font folders
    try:
        return ImageFont.load_default(size)
    except (TypeError, ImportError, OSError):  # old Pillow or no FreeType
        return ImageFont.load_default()


def _fonts() -> dict[str, object]:
    """The fonts, loaded once per thread (FreeType faces are not shared between threads)."""
    fonts = getattr(_local, "fonts", None)
    if fonts is None:
        fonts = {key: _load_font(size, bold) for key, (size, bold) in _FONT_SIZES.items()}
        _local.fonts = fonts
    return fonts
