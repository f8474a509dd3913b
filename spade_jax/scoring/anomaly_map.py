"""Anomaly-map post-processing: bilinear upsampling, then a Gaussian blur.

Both are separable linear maps along H and W, so both are written as two small
matrices applied with einsum: [H_out, H_in] and [W_out, W_in], built once on the host
per (sizes, sigma) and cached. This is exact for the two reference semantics:

* upsampling matches torch.nn.functional.interpolate(mode="bilinear",
  align_corners=False): source coordinate (o + 0.5) * in / out - 0.5, clamped at 0,
  linear between floor and floor + 1 (clamped to the edge). No antialiasing, also when
  shrinking (jax.image.resize antialiases when downsampling, torch does not);
* the blur matches scipy.ndimage.gaussian_filter(mode="reflect", truncate=4.0):
  taps exp(-x^2 / 2 sigma^2), x in [-r, r], r = int(truncate * sigma + 0.5), normalised;
  the border reflects with the edge sample repeated (d c b a | a b c d | d c b a),
  folded into the matrix so maps smaller than the kernel are handled like SciPy.

sigma is bounded by the map: finite, >= 0 and at most the map's longer side
max(H, W) (a wider blur only flattens the map; a ValueError is raised before any
kernel is built). The work is bounded by the map too: taps beyond 40 sigma are exactly
0.0 in float64 (so truncate is capped at MAX_TRUNCATE without changing any number),
and taps further apart than the reflection period 2 * size are summed into one
column, so a matrix costs O(size^2) whatever sigma and truncate are.

A [224, 224] blur matrix is a banded 1-D convolution; as a matmul it runs at full
speed on any accelerator.
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
# exp(-0.5 * 40**2) == 0.0 in float64: Gaussian taps beyond 40 sigma are exactly zero.
MAX_TRUNCATE = 40.0


def bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """torch align_corners=False sampling positions along one axis.

  Returns:
    (i0 [out] int32, i1 [out] int32, frac [out] float64): output o is
    (1 - frac) * x[i0] + frac * x[i1].
  """
  scale = in_size / out_size
  src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
  src = np.maximum(src, 0.0)  # torch clamps negative source coordinates to 0.
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  frac = src - i0
  return i0.astype(np.int32), i1.astype(np.int32), frac


@functools.cache
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] float32 matrix of 1-D bilinear resampling (align_corners=False)."""
  i0, i1, frac = bilinear_taps(in_size, out_size)
  mat = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(mat, (rows, i0), 1.0 - frac)
  np.add.at(mat, (rows, i1), frac)
  return mat.astype(np.float32)


def _as_real(value, name: str) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise ValueError(f"{name} must be a real number, got {value!r}")
  return float(value)


def _check_sigma(sigma, truncate, side: int | None = None, *,
                 allow_zero: bool = False) -> tuple[float, float]:
  """Validated (sigma, truncate) as floats.

  Args:
    sigma: Gaussian standard deviation in pixels.
    truncate: kernel radius in sigmas.
    side: the map's longer side; sigma must not exceed it (None: no bound).
    allow_zero: sigma == 0 is allowed (no blur).

  Raises:
    ValueError: sigma not finite, negative (or zero unless allowed), or larger than
      `side`; truncate not finite and > 0.
  """
  sigma = _as_real(sigma, "sigma")
  truncate = _as_real(truncate, "truncate")
  if not math.isfinite(sigma):
    raise ValueError(f"sigma must be finite, got {sigma!r}")
  if sigma < 0 or (sigma == 0 and not allow_zero):
    raise ValueError(f"sigma must be {'>= 0' if allow_zero else '> 0'}, got {sigma!r}")
  if side is not None and sigma > side:
    raise ValueError(
        f"sigma={sigma!r} is wider than the map: it must be at most {side}, the map's "
        "longer side in pixels (a wider blur only flattens the map to its mean)")
  if not (math.isfinite(truncate) and truncate > 0):
    raise ValueError(f"truncate must be finite and > 0, got {truncate!r}")
  return sigma, truncate


def gaussian_kernel1d(sigma: float, truncate: float) -> np.ndarray:
  """scipy.ndimage's normalised 1-D Gaussian taps, [2r + 1] float64.

  r = int(min(truncate, MAX_TRUNCATE) * sigma + 0.5): the taps beyond MAX_TRUNCATE
  sigmas are exactly 0.0, so the cap changes no value, only the length.

  Raises:
    ValueError: sigma or truncate not finite and > 0, or a kernel of over 2**24 taps
      (bound sigma by the map's size first, see gaussian_matrix).
  """
  sigma, truncate = _check_sigma(sigma, truncate)
  radius = int(min(truncate, MAX_TRUNCATE) * sigma + 0.5)
  if radius > 2**23:
    raise ValueError(f"sigma={sigma!r} gives a Gaussian kernel of {2 * radius + 1} taps; "
                     "bound sigma by the map's size")
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  taps = np.exp(-0.5 * (x / sigma) ** 2)
  return taps / taps.sum()


def _reflect_index(i: np.ndarray, n: int) -> np.ndarray:
  """scipy mode='reflect' (numpy 'symmetric') source index of position i, any i."""
  i = np.mod(i, 2 * n)
  return np.where(i < n, i, 2 * n - 1 - i)


@functools.cache
def gaussian_matrix(size: int, sigma: float, truncate: float,
                    max_sigma: int | None = None) -> np.ndarray:
  """[size, size] float32 matrix of the 1-D reflect-padded Gaussian filter.

  Args:
    size: the axis length.
    sigma: standard deviation in pixels, finite, > 0 and at most max_sigma.
    truncate: kernel radius in sigmas (capped at MAX_TRUNCATE; no value changes).
    max_sigma: the bound on sigma, the map's longer side (default: size).

  Raises:
    ValueError: sigma or truncate out of range.
  """
  if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
    raise ValueError(f"size must be a positive int, got {size!r}")
  size = int(size)
  _check_sigma(sigma, truncate, size if max_sigma is None else max_sigma)
  taps = gaussian_kernel1d(sigma, truncate)
  radius = (len(taps) - 1) // 2
  offsets = np.arange(-radius, radius + 1)
  period = 2 * size  # _reflect_index(i + period, n) == _reflect_index(i, n).
  if len(taps) > period:  # Fold the taps: one column per offset mod the period.
    taps = np.bincount(np.mod(offsets, period), weights=taps, minlength=period)
    offsets = np.arange(period)
  rows = np.arange(size)
  cols = _reflect_index(rows[:, None] + offsets[None, :], size)
  mat = np.zeros((size, size), np.float64)
  # Row-major (row, offset) order: every entry sums its taps in increasing offset.
  np.add.at(mat, (np.repeat(rows, len(offsets)), cols.ravel()), np.tile(taps, size))
  return mat.astype(np.float32)


def _separable(maps: Array, mat_h: np.ndarray, mat_w: np.ndarray) -> Array:
  """[N, h, w] -> [N, H, W] = mat_h @ maps @ mat_w.T (float32, full precision)."""
  hi = lax.Precision.HIGHEST  # No TF32/bf16 passes on accelerators: 1e-5 agreement.
  out = jnp.einsum("Hh,nhw->nHw", jnp.asarray(mat_h), maps.astype(jnp.float32),
                   precision=hi)
  return jnp.einsum("Ww,nHw->nHW", jnp.asarray(mat_w), out, precision=hi)


def upsample_bilinear_impl(maps: Array, size: tuple[int, int]) -> Array:
  """Un-jitted upsample_bilinear, for use inside other jitted code."""
  h, w = maps.shape[-2:]
  return _separable(maps, bilinear_matrix(h, size[0]), bilinear_matrix(w, size[1]))


def gaussian_blur_impl(maps: Array, sigma: float, truncate: float) -> Array:
  """Un-jitted gaussian_blur, for use inside other jitted code (sigma > 0)."""
  h, w = maps.shape[-2:]
  side = max(h, w)
  return _separable(maps, gaussian_matrix(h, sigma, truncate, side),
                    gaussian_matrix(w, sigma, truncate, side))


def _check_maps(maps, name: str = "maps") -> None:
  if np.ndim(maps) != 3 or min(np.shape(maps)) < 1:
    raise ValueError(f"{name} must be a non-empty [N, H, W] array, got shape "
                     f"{np.shape(maps)}")


def _check_size(size) -> tuple[int, int]:
  try:
    h, w = (int(s) for s in size)
  except (TypeError, ValueError):
    raise ValueError(f"size must be (H, W), got {size!r}") from None
  if h < 1 or w < 1:
    raise ValueError(f"size must be positive, got {size!r}")
  return h, w


@functools.partial(jax.jit, static_argnames=("size",))
def _upsample_jit(maps: Array, size: tuple[int, int]) -> Array:
  return upsample_bilinear_impl(maps, size)


@functools.partial(jax.jit, static_argnames=("sigma", "truncate"))
def _blur_jit(maps: Array, sigma: float, truncate: float) -> Array:
  return gaussian_blur_impl(maps, sigma, truncate)


@functools.partial(jax.jit, static_argnames=("size", "sigma", "truncate"))
def _anomaly_maps_jit(maps: Array, size: tuple[int, int], sigma: float,
                      truncate: float) -> Array:
  return gaussian_blur_impl(upsample_bilinear_impl(maps, size), sigma, truncate)


def upsample_bilinear(maps: Array, size: tuple[int, int]) -> Array:
  """Bilinear resize like torch F.interpolate(mode="bilinear", align_corners=False).

  Args:
    maps: [N, h, w] float.
    size: (H, W) output size.

  Returns:
    [N, H, W] float32.
  """
  _check_maps(maps)
  return _upsample_jit(maps, _check_size(size))


def gaussian_blur(maps: Array, sigma: float = 4.0, truncate: float = 4.0) -> Array:
  """scipy.ndimage.gaussian_filter(maps[i], sigma, mode="reflect", truncate) per map.

  Args:
    maps: [N, H, W] float.
    sigma: standard deviation in pixels (both axes): finite, >= 0 (0: no blur, as
      SciPy) and at most max(H, W).
    truncate: kernel radius in sigmas, finite and > 0.

  Returns:
    [N, H, W] float32.

  Raises:
    ValueError: bad maps, or sigma / truncate out of range (before any kernel is built).
  """
  _check_maps(maps)
  sigma, truncate = _check_sigma(sigma, truncate, max(np.shape(maps)[-2:]), allow_zero=True)
  if sigma == 0:
    return jnp.asarray(maps, jnp.float32)
  return _blur_jit(maps, sigma, min(truncate, MAX_TRUNCATE))


def anomaly_maps(score_maps: Array, size: tuple[int, int], sigma: float = 4.0,
                 truncate: float = 4.0) -> Array:
  """SPADE's anomaly maps: upsample the score maps to the image size, then blur.

  Args:
    score_maps: [N, h, w] float, per-position scores.
    size: (H, W) image (crop) size.
    sigma: Gaussian sigma in output pixels (paper: 4); 0 disables the blur. Finite,
      >= 0 and at most max(H, W), the output's longer side.
    truncate: kernel radius in sigmas (scipy default 4), finite and > 0.

  Returns:
    [N, H, W] float32.

  Raises:
    ValueError: bad score_maps or size, or sigma / truncate out of range (before any
      kernel is built).
  """
  _check_maps(score_maps, "score_maps")
  size = _check_size(size)
  sigma, truncate = _check_sigma(sigma, truncate, max(size), allow_zero=True)
  if sigma == 0:
    return _upsample_jit(score_maps, size)
  return _anomaly_maps_jit(score_maps, size, sigma, min(truncate, MAX_TRUNCATE))
