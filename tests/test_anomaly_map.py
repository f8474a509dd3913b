"""Upsampling vs torch's align_corners=False equations, blur vs scipy.ndimage."""

import numpy as np
import pytest
from scipy import ndimage

import spade_jax
from spade_jax import anomaly_map


def _bilinear_ref(x, out_h, out_w):
  """[N, h, w] float64, one output pixel at a time from torch's definition:
  src = (dst + 0.5) * in / out - 0.5, clamped at 0; lerp floor / floor + 1 (edge)."""
  n, h, w = x.shape
  out = np.zeros((n, out_h, out_w))
  for oy in range(out_h):
    sy = max((oy + 0.5) * h / out_h - 0.5, 0.0)
    y0 = min(int(sy), h - 1)
    y1 = y0 + 1 if y0 < h - 1 else y0
    ly = sy - y0
    for ox in range(out_w):
      sx = max((ox + 0.5) * w / out_w - 0.5, 0.0)
      x0 = min(int(sx), w - 1)
      x1 = x0 + 1 if x0 < w - 1 else x0
      lx = sx - x0
      out[:, oy, ox] = ((1 - ly) * (1 - lx) * x[:, y0, x0] + (1 - ly) * lx * x[:, y0, x1] +
                        ly * (1 - lx) * x[:, y1, x0] + ly * lx * x[:, y1, x1])
  return out


def test_upsample_hand_case():
  # 2 -> 4 along one axis: sources -0.25 (clamped to 0), 0.25, 0.75, 1.25 (edge).
  x = np.array([[[0.0, 4.0]]], np.float32)
  got = spade_jax.upsample_bilinear(x, (1, 4))
  np.testing.assert_allclose(got, [[[0.0, 1.0, 3.0, 4.0]]], atol=1e-6)


@pytest.mark.parametrize("shape,size", [
    ((2, 3, 4), (9, 8)), ((1, 14, 14), (56, 56)), ((1, 7, 5), (224, 13)),
    ((3, 5, 5), (5, 5)), ((1, 8, 6), (3, 4)),  # Identity and shrinking (no antialias).
    ((1, 1, 1), (4, 3))])
def test_upsample_matches_reference(shape, size):
  x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  got = spade_jax.upsample_bilinear(x, size)
  assert got.shape == (shape[0],) + size and got.dtype == np.float32
  np.testing.assert_allclose(got, _bilinear_ref(x.astype(np.float64), *size), atol=1e-5)


@pytest.mark.parametrize("shape,sigma", [
    ((2, 40, 33), 4.0), ((1, 10, 12), 4.0),  # Kernel radius 16 > map: repeated reflection.
    ((1, 224, 224), 4.0), ((2, 17, 9), 1.5), ((1, 5, 6), 0.7)])
def test_gaussian_matches_scipy(shape, sigma):
  x = np.random.default_rng(1).standard_normal(shape)
  got = spade_jax.gaussian_blur(x.astype(np.float32), sigma=sigma)
  ref = np.stack([ndimage.gaussian_filter(m, sigma=sigma, mode="reflect", truncate=4.0)
                  for m in x])
  np.testing.assert_allclose(got, ref, atol=1e-5)


def test_gaussian_truncate_and_kernel():
  x = np.random.default_rng(2).standard_normal((1, 30, 30))
  got = spade_jax.gaussian_blur(x.astype(np.float32), sigma=2.0, truncate=2.5)
  ref = ndimage.gaussian_filter(x[0], sigma=2.0, mode="reflect", truncate=2.5)
  np.testing.assert_allclose(got[0], ref, atol=1e-5)
  taps = anomaly_map.gaussian_kernel1d(4.0, 4.0)
  assert taps.shape == (33,)  # radius int(4 * 4 + 0.5) = 16.
  np.testing.assert_allclose(taps.sum(), 1.0)


def test_anomaly_maps_is_upsample_then_blur():
  x = np.random.default_rng(3).standard_normal((2, 7, 7))
  got = spade_jax.anomaly_maps(x.astype(np.float32), (28, 28), sigma=4.0)
  up = _bilinear_ref(x, 28, 28)
  ref = np.stack([ndimage.gaussian_filter(m, 4.0, mode="reflect", truncate=4.0) for m in up])
  np.testing.assert_allclose(got, ref, atol=1e-5)
  np.testing.assert_allclose(spade_jax.anomaly_maps(x.astype(np.float32), (28, 28), sigma=0),
                             up, atol=1e-5)


@pytest.mark.parametrize("call,match", [
    (lambda x: spade_jax.upsample_bilinear(x[0], (4, 4)), r"\[N, H, W\]"),
    (lambda x: spade_jax.upsample_bilinear(x, (0, 4)), "size must be positive"),
    (lambda x: spade_jax.upsample_bilinear(x, 4), "size must be"),
    (lambda x: spade_jax.gaussian_blur(x, sigma=-1.0), "sigma"),
    (lambda x: spade_jax.anomaly_maps(x[:0], (4, 4)), "score_maps"),
])
def test_bad_input(call, match):
  with pytest.raises(ValueError, match=match):
    call(np.zeros((2, 3, 3), np.float32))
