"""The real 2D FFT of the spectrum path, without importing :mod:`scipy.fft`.

``import scipy.fft`` costs 0.1–0.3 s per process (it pulls in ``scipy.special`` and the array-API
layer, which imports ``numpy.testing`` and more), as much as estimating a 4096² micrograph's CTF
takes with everything else. Its transforms are done by one compiled module, ``pypocketfft``,
that needs none of that: loaded on its own from scipy's installation it costs under a
millisecond. :func:`rfft2` uses it and falls back to :func:`scipy.fft.rfft2` whenever it cannot
(another scipy layout, a changed signature); ``tests/test_spectrum.py`` pins that both agree.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["rfft2"]

_LOCK = threading.Lock()
_R2C: list[Callable[..., Any] | None] = []  # [] until the first call, then [r2c or None]


def _load_r2c() -> Callable[..., Any] | None:
    """scipy's ``pypocketfft.r2c``, loaded without running ``scipy.fft/__init__``."""
    try:
        spec = importlib.util.find_spec("scipy")
        if spec is None or spec.origin is None:
            return None
        folder = os.path.join(os.path.dirname(spec.origin), "fft", "_pocketfft")
        names = [
            n
            for n in os.listdir(folder)
            if n.startswith("pypocketfft.") and n.endswith((".so", ".pyd"))
        ]
        if len(names) != 1:
            return None
        path = os.path.join(folder, names[0])
        loader = importlib.machinery.ExtensionFileLoader("pypocketfft", path)
        mspec = importlib.util.spec_from_file_location("pypocketfft", path, loader=loader)
        if mspec is None:
            return None
        module = importlib.util.module_from_spec(mspec)
        loader.exec_module(module)
        r2c = module.r2c
        probe = np.arange(12, dtype=np.float32).reshape(3, 4)  # check the signature and result
        got = r2c(probe, (0, 1), True, 0, None, 1)
        want = np.fft.rfft2(probe.astype(np.float64))
        if got.shape != want.shape or not np.allclose(got, want, rtol=1e-5, atol=1e-4):
            return None
        return r2c
    except Exception:  # noqa: BLE001 - any surprise means: use scipy.fft
        return None


def rfft2(a: NDArray[np.floating], workers: int = 1) -> NDArray[np.complexfloating]:
    """``scipy.fft.rfft2(a, workers=workers)`` of a 2D float32 or float64 array (unnormalised,
    complex64 for float32 input), over the last two axes."""
    if not _R2C:
        with _LOCK:
            if not _R2C:
                _R2C.append(_load_r2c())
    r2c = _R2C[0]
    a = np.asarray(a)
    if r2c is not None and a.dtype in (np.float32, np.float64):
        try:
            return r2c(a, (a.ndim - 2, a.ndim - 1), True, 0, None, _threads(workers))
        except (TypeError, ValueError, RuntimeError):
            pass
    import scipy.fft as sfft

    return sfft.rfft2(a, workers=workers)


def _threads(workers: int) -> int:
    """scipy.fft's ``workers`` convention: negative counts back from the number of CPUs."""
    if workers >= 1:
        return int(workers)
    return max(1, (os.cpu_count() or 1) + 1 + int(workers))
