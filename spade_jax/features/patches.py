"""PatchCore's locally aware patch features: pyramid levels -> one feature per position.

For each chosen level l with features phi_l [N, h_l, w_l, C_l] (PatchCore, Sec. 3.1):

1. local aggregation: phi_l is averaged over the p x p neighbourhood of every position
   (stride 1, same padding). This follows torch.nn.AvgPool2d(p, 1, p // 2) with its
   default count_include_pad=True, as anomalib's PatchCore uses it: zeros are padded
   around the map and every window sum is divided by p^2, also at the border;
2. alignment: every level is resized bilinearly to the finest grid among the chosen
   levels (torch F.interpolate(mode="bilinear", align_corners=False), no antialiasing);
3. concatenation over channels, in the order of `layers`: D = sum_l C_l;
4. optional reduction to E = embed_dim channels when D > E (none when D <= E: steps
   1-3 are then the features, whatever the reduction):
   * "per_level": patchcore-inspection's (the PatchCore authors' code,
     github.com/amazon-science/patchcore-inspection, patchcore/patchcore.py and
     common.py), which replaces steps 1-3. Each level's p x p neighbourhood is
     unfolded (torch.nn.Unfold(p, padding=p // 2): zeros beyond the border) into
     u_l [C_l p^2], channel-major, then row and column offset; a coarser level's
     unfolded maps are resized to the grid as in step 2. Each level is reduced
     separately, v_l = AAP(u_l, E) (its MeanMapper, to pretrain_embed_dimension),
     the levels are concatenated in order, and phi = AAP([v_1, ..., v_L], E) (its
     Aggregator, to target_embed_dimension; E for both, the paper's WRN50 setting
     D1024-1024). AAP(x, E) is torch F.adaptive_avg_pool1d over channels: output i
     is the mean of x[floor(i L / E) : ceil((i + 1) L / E)], L = len(x). Every level
     weighs the same (WRN50: 512 of the 1024 outputs each from layer2 and layer3),
     and the p x p mean is AAP's: for WRN50's layer3 (L = 9 * 1024) exactly the
     zero-padded 3 x 3 mean per channel; for layer2 (L = 9 * 512, 4.5 entries per
     output) the mean of the first 5 and of the last 5 of the 9 window entries of a
     channel, which the Aggregator then averages (weights 1/10, the centre 2/10);
   * "adaptive_avg": one AAP(., E) over the concatenation of step 3 (all levels
     pooled together: a level's share of the outputs is its share of the D channels;
     WRN50: layer3 gets two thirds). This library's default before "per_level"; an
     index recording it is scored as before;
   * "random_projection": a fixed dense random projection with entries
     +-1 / sqrt(E) (Achlioptas), drawn from the raw bits of NumPy's Philox bit
     generator, whose stream NumPy keeps stable, so `seed` fixes the matrix everywhere.
   anomalib's PatchCore reduces nothing (embed_dim=None: WRN50's 1536 channels).

Every step is linear. Aggregation, unfolding and resizing are separable: small
matrices per axis (a band of ones for the window sum, a shift per offset of the
window, the bilinear taps), applied with einsum like the anomaly maps
(scoring/anomaly_map.py builds the same bilinear matrix; the small builder is repeated
here because features/ sits below scoring/). AAP is a gather of each output's bin
(at most ceil(L / E) + 1 entries), or a reshape when E divides L. All matrices and
bins are built once on the host per shape and cached.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
# "per_level" first: PatchCoreConfig's default (the paper's code).
REDUCTIONS = ("per_level", "adaptive_avg", "random_projection")


@functools.cache
def window_sum_matrix(size: int, patch_size: int) -> np.ndarray:
  """[size, size] float32: out[o] = sum of x[i] for |i - o| <= patch_size // 2 (zeros
  beyond the border), the 1-D window sum of AvgPool2d(p, 1, p // 2)."""
  radius = patch_size // 2
  rows = np.arange(size)
  return (np.abs(rows[:, None] - rows[None, :]) <= radius).astype(np.float32)


@functools.cache
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] float32 1-D bilinear resampling, torch align_corners=False.

  Source coordinate (o + 0.5) * in / out - 0.5, clamped at 0; linear between floor and
  floor + 1, clamped to the last sample.
  """
  src = np.maximum((np.arange(out_size, dtype=np.float64) + 0.5) * in_size / out_size - 0.5,
                   0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  frac = src - i0
  mat = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(mat, (rows, i0), 1.0 - frac)
  np.add.at(mat, (rows, i1), frac)
  return mat.astype(np.float32)


@functools.cache
def adaptive_avg_matrix(dim_in: int, dim_out: int) -> np.ndarray:
  """[dim_in, dim_out] float32: x @ M is torch F.adaptive_avg_pool1d(x, dim_out)."""
  mat = np.zeros((dim_in, dim_out), np.float64)
  for i in range(dim_out):
    lo = (i * dim_in) // dim_out
    hi = -((-(i + 1) * dim_in) // dim_out)  # ceil((i + 1) * dim_in / dim_out)
    mat[lo:hi, i] = 1.0 / (hi - lo)
  return mat.astype(np.float32)


@functools.cache
def adaptive_avg_bins(dim_in: int, dim_out: int) -> tuple[np.ndarray, np.ndarray]:
  """The bins of torch F.adaptive_avg_pool1d(x, dim_out) on x [dim_in], as taps.

  Output i is the mean of x[lo_i:hi_i], lo_i = floor(i L / E), hi_i = ceil((i + 1) L / E)
  (L = dim_in, E = dim_out).

  Returns:
    (index [K, E] int32, weight [K, E] float32), K = max_i (hi_i - lo_i): output i is
    sum_k weight[k, i] * x[index[k, i]]; weight[k, i] = 1 / (hi_i - lo_i) for
    k < hi_i - lo_i, else 0 (and index[k, i] = lo_i).
  """
  lo = (np.arange(dim_out) * dim_in) // dim_out
  hi = -((-(np.arange(dim_out) + 1) * dim_in) // dim_out)  # ceil((i + 1) * L / E)
  width = hi - lo
  taps = np.arange(int(width.max()))[:, None]
  used = taps < width[None, :]
  index = np.where(used, lo[None, :] + taps, lo[None, :]).astype(np.int32)
  weight = np.where(used, 1.0 / width[None, :], 0.0).astype(np.float32)
  return index, weight


def adaptive_avg_pool(x: Array, dim_out: int) -> Array:
  """[..., L] -> [..., E] torch F.adaptive_avg_pool1d over the last axis, float32.

  A reshape and mean when E divides L (equal bins of L / E), else a weighted sum of
  the bins' taps (adaptive_avg_bins): no dense [L, E] matrix.
  """
  dim_in = x.shape[-1]
  x = x.astype(jnp.float32)
  if dim_in % dim_out == 0:
    return jnp.mean(x.reshape(*x.shape[:-1], dim_out, dim_in // dim_out), axis=-1)
  index, weight = adaptive_avg_bins(dim_in, dim_out)
  out = None
  for k in range(index.shape[0]):  # K <= ceil(L / E) + 1 taps.
    term = jnp.take(x, jnp.asarray(index[k]), axis=-1) * jnp.asarray(weight[k])
    out = term if out is None else out + term
  return out


@functools.cache
def unfold_axis_matrices(size: int, out_size: int, patch_size: int) -> np.ndarray:
  """[p, out_size, size] float32: for each offset i of the window, the sample at
  offset i - p // 2 (zero beyond the border, as torch.nn.Unfold's padding), then
  bilinear resampling to out_size; one axis of "per_level"'s unfolding."""
  radius = patch_size // 2
  rows = np.arange(size)
  resize = bilinear_matrix(size, out_size).astype(np.float64)
  mats = []
  for i in range(patch_size):
    shift = (rows[None, :] == rows[:, None] + i - radius).astype(np.float64)  # [size, size]
    mats.append(resize @ shift)
  return np.stack(mats).astype(np.float32)


def _unfolded(x: Array, grid: tuple[int, int], patch_size: int) -> Array:
  """[N, h, w, C] -> [N, H, W, C p^2]: each position's p x p neighbourhood, flattened
  channel-major, then row offset, then column offset (torch.nn.Unfold's order),
  resized to `grid` per entry."""
  n, h, w, c = x.shape
  hi = lax.Precision.HIGHEST
  mat_h = jnp.asarray(unfold_axis_matrices(h, grid[0], patch_size))  # [p, H, h]
  mat_w = jnp.asarray(unfold_axis_matrices(w, grid[1], patch_size))  # [p, W, w]
  x = jnp.einsum("iHh,nhwc->nHwci", mat_h, x.astype(jnp.float32), precision=hi)
  x = jnp.einsum("jWw,nHwci->nHWcij", mat_w, x, precision=hi)
  return x.reshape(n, grid[0], grid[1], c * patch_size * patch_size)


def per_level_features(levels: Sequence[Array], grid: tuple[int, int], patch_size: int,
                       embed_dim: int) -> Array:
  """The "per_level" reduction (module docstring): [N, H, W, E] float32.

  phi = AAP([AAP(u_1, E), ..., AAP(u_L, E)], E), u_l the unfolded, resized p x p
  neighbourhoods of level l (patchcore-inspection's Preprocessing, then Aggregator).
  """
  per_level = [adaptive_avg_pool(_unfolded(x, grid, patch_size), embed_dim) for x in levels]
  return adaptive_avg_pool(jnp.concatenate(per_level, axis=-1), embed_dim)


@functools.cache
def random_projection_matrix(dim_in: int, dim_out: int, seed: int) -> np.ndarray:
  """[dim_in, dim_out] float32 with entries +-1 / sqrt(dim_out), fixed by `seed`.

  The signs are the low bits of np.random.Philox(seed).random_raw(), row-major; bit
  generator streams do not change between NumPy versions (distribution methods may).
  E |x @ M|^2 = |x|^2 (Johnson-Lindenstrauss).
  """
  bits = np.random.Philox(seed).random_raw(dim_in * dim_out) & np.uint64(1)
  signs = bits.astype(np.float64) * 2.0 - 1.0
  return (signs / np.sqrt(dim_out)).reshape(dim_in, dim_out).astype(np.float32)


def reduction_matrix(dim_in: int, embed_dim: int | None, reduction: str,
                     seed: int = 0) -> np.ndarray | None:
  """The [dim_in, embed_dim] channel reduction of the concatenated features, or None
  when none applies (embed_dim None, or dim_in <= embed_dim: the features are kept as
  they are). "per_level" is not one matrix on the concatenation (per_level_features)."""
  if embed_dim is None or dim_in <= embed_dim:
    return None
  if reduction == "per_level":
    raise ValueError("the per_level reduction is per_level_features, not a matrix on the "
                     "concatenated features")
  if reduction == "adaptive_avg":
    return adaptive_avg_matrix(dim_in, embed_dim)
  return random_projection_matrix(dim_in, embed_dim, seed)


@functools.cache
def axis_matrix(size: int, out_size: int, patch_size: int) -> np.ndarray:
  """[out_size, size] float32: the window mean of p samples (zero padded, divided by p),
  then bilinear resampling to out_size; one axis of steps 1-2."""
  mat = bilinear_matrix(size, out_size).astype(np.float64) @ window_sum_matrix(
      size, patch_size).astype(np.float64)
  return (mat / patch_size).astype(np.float32)


def output_dim(channels: Sequence[int], embed_dim: int | None) -> int:
  """D of patch_features: sum of the levels' channels, capped at embed_dim."""
  total = int(sum(channels))
  return total if embed_dim is None else min(total, int(embed_dim))


def _separable(x: Array, mat_h: np.ndarray, mat_w: np.ndarray) -> Array:
  """[N, h, w, C] -> [N, H, W, C] = mat_h @ x @ mat_w.T along (h, w), float32."""
  hi = lax.Precision.HIGHEST  # No TF32 / bf16 passes on accelerators.
  x = jnp.einsum("Hh,nhwc->nHwc", jnp.asarray(mat_h), x.astype(jnp.float32), precision=hi)
  return jnp.einsum("Ww,nHwc->nHWc", jnp.asarray(mat_w), x, precision=hi)


def patch_features_impl(levels: Sequence[Array], patch_size: int, embed_dim: int | None,
                        reduction: str, seed: int) -> Array:
  """Un-jitted patch_features on validated levels (in order), for use inside jit."""
  grid = max((x.shape[1:3] for x in levels), key=lambda hw: hw[0] * hw[1])
  total = sum(x.shape[-1] for x in levels)
  if reduction == "per_level" and embed_dim is not None and total > embed_dim:
    return per_level_features(levels, grid, patch_size, embed_dim)
  parts = []
  for x in levels:
    h, w = x.shape[1:3]
    # The p x p mean is the product of two 1-D means (each divided by p, so by p^2 in
    # all, padding included), and each is followed by that axis's bilinear resize.
    parts.append(_separable(x, axis_matrix(h, grid[0], patch_size),
                            axis_matrix(w, grid[1], patch_size)))
  out = jnp.concatenate(parts, axis=-1)
  mat = reduction_matrix(out.shape[-1], embed_dim, reduction, seed)
  if mat is not None:
    out = jnp.einsum("nhwc,ce->nhwe", out, jnp.asarray(mat), precision=lax.Precision.HIGHEST)
  return out


@functools.partial(jax.jit, static_argnames=("patch_size", "embed_dim", "reduction", "seed"))
def _patch_features_jit(levels: tuple[Array, ...], patch_size: int, embed_dim: int | None,
                        reduction: str, seed: int) -> Array:
  return patch_features_impl(levels, patch_size, embed_dim, reduction, seed)


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def check_settings(patch_size, embed_dim, reduction, seed) -> None:
  """Validates the settings of patch_features (shared with PatchCoreConfig).

  Raises:
    ValueError: naming the bad argument.
  """
  if not _is_int(patch_size) or patch_size < 1 or patch_size % 2 == 0:
    raise ValueError(f"patch_size must be an odd positive int (p x p neighbourhoods, same "
                     f"padding), got {patch_size!r}")
  if embed_dim is not None and (not _is_int(embed_dim) or embed_dim < 1):
    raise ValueError(f"embed_dim must be a positive int or None, got {embed_dim!r}")
  if reduction not in REDUCTIONS:
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
  if not _is_int(seed) or seed < 0:
    raise ValueError(f"seed must be a non-negative int, got {seed!r}")


def patch_features(levels: Mapping[str, Array], layers: Sequence[str], *,
                   patch_size: int = 3, embed_dim: int | None = None,
                   reduction: str = "adaptive_avg", seed: int = 0) -> Array:
  """PatchCore's locally aware patch features of a batch of images.

  Args:
    levels: level name -> [N, h_l, w_l, C_l] float features (e.g. a backbone's output;
      other entries are ignored).
    layers: the levels to use, in concatenation order (PatchCore: layer2, layer3).
    patch_size: p, the neighbourhood side (odd; 1: no aggregation; PatchCore: 3).
    embed_dim: E, reduce the channels to E when the levels have more, sum_l C_l > E
      (None: keep them all).
    reduction: how (module docstring): "per_level" (patchcore-inspection's, the
      paper's; PatchCoreConfig's default), "adaptive_avg" (one pooling over the
      concatenation; this function's default, as before "per_level" existed) or
      "random_projection".
    seed: fixes the random projection (unused by the others).

  Returns:
    [N, H, W, D] float32: (H, W) the finest grid among `layers`, D = sum_l C_l, or E
    when sum_l C_l > E.

  Raises:
    ValueError: bad settings, no or unknown layers, duplicates, levels that are not
      [N, h, w, C] or differ in N.
  """
  check_settings(patch_size, embed_dim, reduction, seed)
  if isinstance(layers, str) or not isinstance(layers, Sequence) or not layers:
    raise ValueError(f"layers must be a non-empty sequence of level names, got {layers!r}")
  if len(set(layers)) != len(layers):
    raise ValueError(f"layers has duplicates: {list(layers)}")
  if not isinstance(levels, Mapping):
    raise ValueError(f"levels must be a dict level -> [N, h, w, C], got "
                     f"{type(levels).__name__}")
  missing = [l for l in layers if l not in levels]
  if missing:
    raise ValueError(f"levels has no {missing}; it has {list(levels)}")
  count = None
  for l in layers:
    shape = np.shape(levels[l])
    if len(shape) != 4 or min(shape) < 1:
      raise ValueError(f"levels[{l!r}] must be a non-empty [N, h, w, C] array, got shape "
                       f"{shape}")
    dtype = np.dtype(getattr(levels[l], "dtype", np.float32))
    if not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)):
      raise ValueError(f"levels[{l!r}] must hold real numbers, got dtype {dtype}")
    if count is not None and shape[0] != count:
      raise ValueError(f"levels[{l!r}] holds {shape[0]} images, {layers[0]!r} holds {count}")
    count = shape[0]
  return _patch_features_jit(tuple(levels[l] for l in layers), int(patch_size),
                             None if embed_dim is None else int(embed_dim), reduction,
                             int(seed))
