"""The sinc resampling's compiled passes against its numpy passes, and the cached plans."""

from __future__ import annotations

import numpy as np
import pytest

from anisoctf.magnification import resample, sinc_compiled
from anisoctf.optics.magmat import MagMat

needs_compiled = pytest.mark.skipif(
    not sinc_compiled.AVAILABLE, reason="anisoctf.magnification._sinc was not built"
)


def _both(image: np.ndarray, m, monkeypatch, **kw) -> tuple[np.ndarray, np.ndarray]:
    monkeypatch.setattr(resample, "_USE_COMPILED", True)
    fast = resample.correct_image(image, m, **kw)
    monkeypatch.setattr(resample, "_USE_COMPILED", False)
    slow = resample.correct_image(image, m, **kw)
    return fast, slow


@needs_compiled
@pytest.mark.parametrize("shape", [(512, 512), (300, 417), (64, 97), (3, 128, 160)])
@pytest.mark.parametrize("percent", [1.0, 3.0])
def test_compiled_passes_equal_the_numpy_passes(shape, percent, monkeypatch):
    rot = np.deg2rad(0.05)
    r = np.array([[np.cos(rot), -np.sin(rot)], [np.sin(rot), np.cos(rot)]])
    m = MagMat(MagMat.from_anisotropy(percent, 37.0).array @ r)
    image = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    fast, slow = _both(image, m, monkeypatch)
    assert fast.dtype == np.float32 and fast.shape == image.shape
    # the same float32 products summed in the same tap order: equal to rounding
    np.testing.assert_allclose(fast, slow, rtol=0, atol=2e-6 * np.abs(slow).max())


@needs_compiled
def test_compiled_passes_keep_pixel_size_and_float64_input(monkeypatch):
    m = MagMat.from_anisotropy(2.0, -20.0)
    image = np.random.default_rng(4).standard_normal((200, 256))  # float64 input
    fast, slow = _both(image, m, monkeypatch, keep_pixel_size=True)
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-5 * np.abs(slow).max())


@needs_compiled
def test_identity_matrix_is_exact_in_the_compiled_passes(monkeypatch):
    monkeypatch.setattr(resample, "_USE_COMPILED", True)
    image = np.random.default_rng(5).standard_normal((128, 96)).astype(np.float32)
    np.testing.assert_array_equal(resample.correct_image(image, np.eye(2)), image)


def test_plan_is_reused_for_the_same_shape_and_matrix():
    resample._cached_plan.cache_clear()
    m = MagMat.from_anisotropy(1.5, 10.0)
    image = np.ones((96, 128), dtype=np.float32)
    for _ in range(3):
        out = resample.correct_image(image, m)
    info = resample._cached_plan.cache_info()
    assert (info.misses, info.hits) == (1, 2)
    np.testing.assert_allclose(out, 1.0, atol=1e-6)  # constants stay exact (weights sum to 1)
    resample.correct_image(image, MagMat.from_anisotropy(1.5, 11.0))  # another matrix: new plan
    assert resample._cached_plan.cache_info().misses == 2


@needs_compiled
def test_compiled_kernels_refuse_inconsistent_sizes():
    from anisoctf.magnification import _sinc

    src = np.zeros((8, 8), dtype=np.float32)
    out = np.zeros((8, 8), dtype=np.float32)
    idx = np.full((8, 2), 9, dtype=np.int32)  # source row 9 of 8
    w = np.ones((8, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="mix_rows"):
        _sinc.mix_rows(src, 8, 8, out, 8, idx, w, 2)
    start = np.full(8, 7, dtype=np.int32)  # 7 + 8 + 1 > 8 rows
    with pytest.raises(ValueError, match="shear_transpose"):
        _sinc.shear_transpose(src, 8, 8, out, 8, start, w, 2)
