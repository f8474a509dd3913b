"""PaDiM's embedding vectors (Defard et al., ICPR 2020, Sec. 3.1): pyramid levels -> one
vector x_ij per position (i, j) of the first level's grid, on a fixed channel subset.

For the chosen levels l_1, ..., l_L (paper: ResNet's layer1, layer2, layer3) with
features phi_l [N, h_l, w_l, C_l]:

1. alignment: every level is resized to the grid of the first one, h x w = h_1 x w_1,
   by nearest neighbour, as the reference implementations do (anomalib's PaDiM:
   torch F.interpolate(mode="nearest") of the coarser maps to layer1's size; the
   authors' code of xiahaifeng1995 spreads each coarse position over its s x s block
   with unfold / fold, the same for the integer ratios s of a ResNet). Output row o
   reads input row min(floor(o * scale), h_l - 1) with scale = h_l / h in float32, as
   torch's "nearest" computes it (the same along the width);
2. concatenation over channels, in the order of `layers`: C = sum_l C_l channels;
3. the random channel subset: the d channels `channels` (sorted indices into [0, C),
   random_channels) are kept. The paper draws d = 100 of ResNet18's 448 channels and
   d = 550 of Wide-ResNet50-2's 1792.

Every step is a gather, an exact copy. The subset is taken level by level before the
resize, so the C-channel embedding is never materialised; the result equals
concatenate(resized levels)[..., channels].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def random_channels(num_channels: int, num_features: int, seed: int) -> np.ndarray:
  """PaDiM's fixed random channel subset: d = num_features of C = num_channels, sorted.

  Exactly: keys = np.random.default_rng(seed).bit_generator.random_raw(C), the first C
  raw 64-bit outputs of default_rng's PCG64 generator (a stream NumPy keeps stable,
  unlike the Generator's sampling methods); the channels are the d indices with the
  smallest keys (ties, which PCG64 does not produce in practice, broken by the lower
  index), in ascending order. Every d-subset is equally likely; d = C keeps all
  channels, 0 .. C - 1.

  Args:
    num_channels: C, the channels of the concatenated levels.
    num_features: d, 1 <= d <= C.
    seed: a non-negative int.

  Returns:
    [d] int32 channel indices, strictly increasing.

  Raises:
    ValueError: d outside [1, C], or a negative seed.
  """
  for name, value in (("num_channels", num_channels), ("num_features", num_features),
                      ("seed", seed)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
      raise ValueError(f"{name} must be a non-negative int, got {value!r}")
  if not 1 <= num_features <= num_channels:
    raise ValueError(f"num_features={num_features} must be in [1, {num_channels}] (the "
                     "channels of the concatenated levels)")
  keys = np.random.default_rng(int(seed)).bit_generator.random_raw(int(num_channels))
  chosen = np.argsort(keys, kind="stable")[:num_features]
  return np.sort(chosen).astype(np.int32)


@functools.cache
def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """[out_size] int32 source indices of torch's 1-D "nearest" resize (F.interpolate).

  out[o] = x[min(floor(o * scale), in_size - 1)], scale = in_size / out_size in float32;
  torch's exact shortcuts (equal sizes, out = 2 in) give the same indices.
  """
  scale = np.float32(in_size / out_size)
  src = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(src, in_size - 1).astype(np.int32)


def _split_channels(channels: Sequence[int], sizes: Sequence[int]) -> list[np.ndarray]:
  """Per level, the chosen channels that fall in it, as indices into that level."""
  chosen = np.asarray(channels, np.int64)
  parts, offset = [], 0
  for size in sizes:
    parts.append((chosen[(chosen >= offset) & (chosen < offset + size)] - offset)
                 .astype(np.int32))
    offset += size
  return parts


def padim_embedding_impl(levels: Sequence[Array], channels: Sequence[int]) -> Array:
  """Un-jitted padim_embedding on validated arguments (traced inside jit).

  Args:
    levels: L arrays [N, h_l, w_l, C_l], the first one's grid is the output's.
    channels: sorted, distinct channel indices into [0, sum_l C_l).

  Returns:
    [N, h_1, w_1, d] float32.
  """
  h, w = levels[0].shape[1:3]
  parts = []
  for x, local in zip(levels, _split_channels(channels, [x.shape[-1] for x in levels])):
    if local.size == 0:
      continue
    if local.size != x.shape[-1]:
      x = x[..., local]
    x = x[:, nearest_indices(x.shape[1], h)][:, :, nearest_indices(x.shape[2], w)]
    parts.append(x.astype(jnp.float32))
  return jnp.concatenate(parts, axis=-1)


@functools.partial(jax.jit, static_argnames=("channels",))
def _embedding_jit(levels: tuple[Array, ...], channels: tuple[int, ...]) -> Array:
  return padim_embedding_impl(levels, channels)


def padim_embedding(levels: Mapping[str, Array], layers: Sequence[str],
                    channels: Sequence[int] | None = None) -> Array:
  """PaDiM's embedding vectors of a feature pyramid (module docstring).

  Args:
    levels: name -> [N, h_l, w_l, C_l] float features (a backbone's pyramid).
    layers: the levels to concatenate, in order; the first one's grid is the output's
      (PaDiM: layer1, the finest).
    channels: the kept channels, indices into [0, C) of the concatenated levels (e.g.
      random_channels(C, d, seed)), kept in ascending order; None: all C.

  Returns:
    [N, h_1, w_1, d] float32 embeddings x_ij (d = len(channels), or C).

  Raises:
    ValueError: a missing level, levels that are not [N, h, w, C] of one N, no layers,
      or channels that are not distinct ints in [0, C).
  """
  if isinstance(layers, str) or not layers:
    raise ValueError(f"layers must be a non-empty sequence of level names, got {layers!r}")
  missing = [l for l in layers if l not in levels]
  if missing:
    raise ValueError(f"levels has no {missing}; it has {list(levels)}")
  arrays = tuple(levels[l] for l in layers)
  for l, x in zip(layers, arrays):
    if np.ndim(x) != 4 or min(np.shape(x)) < 1:
      raise ValueError(f"levels[{l!r}] must be a non-empty [N, h, w, C] array, got shape "
                       f"{np.shape(x)}")
  if len({np.shape(x)[0] for x in arrays}) != 1:
    raise ValueError(f"levels hold different numbers of images: "
                     f"{ {l: np.shape(x)[0] for l, x in zip(layers, arrays)} }")
  total = sum(int(np.shape(x)[-1]) for x in arrays)
  if channels is None:
    channels = tuple(range(total))
  else:
    chosen = np.asarray(channels)
    if chosen.ndim != 1 or chosen.size == 0 or not np.issubdtype(chosen.dtype, np.integer):
      raise ValueError(f"channels must be a non-empty 1-D sequence of ints, got {channels!r}")
    if chosen.min() < 0 or chosen.max() >= total or len(np.unique(chosen)) != chosen.size:
      raise ValueError(f"channels must be distinct ints in [0, {total}) (the channels of "
                       f"{list(layers)}), got {chosen.tolist()}")
    channels = tuple(int(c) for c in np.sort(chosen))
  return _embedding_jit(arrays, channels)
