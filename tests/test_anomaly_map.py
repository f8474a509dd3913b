"""Upsampling vs torch's align_corners=False equations, blur vs scipy.ndimage."""

import numpy as np
import numpy_reference as reference
import pytest
from scipy import ndimage

import spade_jax
from spade_jax.scoring import anomaly_map


def _bilinear_ref(x, out_h, out_w):
  """[N, h, w] -> [N, out_h, out_w] float64 through the shared reference."""
  return np.moveaxis(reference.bilinear(np.moveaxis(x, 0, -1), out_h, out_w), -1, 0)


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
    (lambda x: spade_jax.gaussian_blur(x, sigma=float("inf")), "finite"),
    (lambda x: spade_jax.gaussian_blur(x, sigma=float("nan")), "finite"),
    (lambda x: spade_jax.gaussian_blur(x, sigma=4.0), "at most 3"),
    (lambda x: spade_jax.gaussian_blur(x, sigma=1.0, truncate=float("inf")), "truncate"),
    (lambda x: spade_jax.gaussian_blur(x, sigma="wide"), "sigma"),
    (lambda x: spade_jax.anomaly_maps(x, (4, 4), sigma=float("inf")), "finite"),
    (lambda x: spade_jax.anomaly_maps(x, (4, 4), sigma=-0.5), "sigma"),
    (lambda x: spade_jax.anomaly_maps(x, (4, 6), sigma=6.5), "at most 6"),
    (lambda x: spade_jax.anomaly_maps(x[:0], (4, 4)), "score_maps"),
])
def test_bad_input(call, match):
  with pytest.raises(ValueError, match=match):
    call(np.zeros((2, 3, 3), np.float32))


@pytest.mark.parametrize("sigma", [float("inf"), 1e6, 1e10, 225.0])
def test_huge_sigma_is_refused_at_once(sigma):
  """sigma=inf used to raise OverflowError, 1e6 to run for minutes, 1e10 to try 596 GiB."""
  x = np.zeros((1, 7, 7), np.float32)
  with pytest.raises(ValueError, match="sigma"):
    spade_jax.anomaly_maps(x, (224, 224), sigma=sigma)
  with pytest.raises(ValueError, match="sigma"):
    anomaly_map.gaussian_matrix(224, sigma, 4.0)


@pytest.mark.parametrize("shape,sigma,truncate", [
    ((1, 30, 30), 30.0, 4.0),   # sigma = the side: radius 120 folds around 4 times.
    ((1, 12, 5), 12.0, 4.0),    # Bounded by the longer side; the short side folds more.
    ((1, 9, 9), 2.0, 1000.0),   # A huge truncate: taps past 40 sigma are exactly 0.
])
def test_wide_kernels_still_match_scipy(shape, sigma, truncate):
  x = np.random.default_rng(4).standard_normal(shape)
  got = spade_jax.gaussian_blur(x.astype(np.float32), sigma=sigma, truncate=truncate)
  ref = ndimage.gaussian_filter(x[0], sigma=sigma, mode="reflect",
                                truncate=min(truncate, 40.0))
  np.testing.assert_allclose(got[0], ref, atol=1e-5)


def test_kernel_radius_is_bounded_by_the_map():
  # Folded with the reflection period 2 * size: the work no longer grows with sigma.
  mat = anomaly_map.gaussian_matrix(5, 5.0, 1e9)
  assert mat.shape == (5, 5)
  np.testing.assert_allclose(mat.sum(axis=1), 1.0, atol=1e-6)
  assert len(anomaly_map.gaussian_kernel1d(1.0, 1e9)) == 81  # Capped at 40 sigma.


def test_sigma_zero_is_no_blur():
  x = np.random.default_rng(5).standard_normal((2, 6, 5)).astype(np.float32)
  np.testing.assert_array_equal(spade_jax.gaussian_blur(x, sigma=0.0), x)
  assert spade_jax.anomaly_maps(x, (6, 5), sigma=6.0).shape == (2, 6, 5)
