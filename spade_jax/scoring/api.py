"""The public SPADE scores: validation in Python, then one device or a sharded gallery.

`image_scores` and `pixel_scores` check their arguments before anything is traced
(a ValueError naming the bad one), then run the single-device kernels (local.py) or,
when the training features are a gallery sharded over a mesh (spade_jax.shard_gallery),
their sharded forms (sharded.py), which return the same numbers. This module sits above
both, so neither imports the other back.

`metric` is a name, a Metric or a kernel (spade_jax.kernels); pixel_scores also takes
a dict level -> metric ("ensemble": levels differ in size, so a fitted kernel is one
per level). `aggregate` turns the k (kappa) nearest distances into a score
(aggregate.py: "mean", SPADE's; "softmin" and "kde" with a bandwidth). Scores are
differentiable with respect to the features and the kernels' parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spade_jax.scoring import aggregate as aggregate_lib
from spade_jax.scoring import local, sharded
from spade_jax.search import distances, neighbors, sharding

Array = jax.Array
COMBINE_MODES = local.COMBINE_MODES
AGGREGATES = aggregate_lib.AGGREGATES


def image_scores(test_pool: Array, train_pool: Array, k: int,
                 metric: str | distances.Metric = "l2", *,
                 num_neighbors: int | None = None, aggregate: str = "mean",
                 bandwidth: Any = None,
                 check_finite_inputs: bool = True) -> tuple[Array, Array]:
  """DN2 image scores: the distances to the k nearest training pooled features, averaged.

  Args:
    test_pool: [N, D] float pooled features of the test images.
    train_pool: [M, D] float pooled features of the training images, or a sharded
      gallery (ShardedGallery / jax.Array split along axis 0): then searched where it
      lies, same results, replicated on its mesh.
    k: neighbours averaged into the score, 1 <= k <= M.
    metric: name, Metric or kernel (spade_jax.kernels) of [D] features.
    num_neighbors: how many nearest training images to return (SPADE's K for the
      pixel gallery; may differ from k; one search serves both). Default k.
    aggregate: "mean" (SPADE), "softmin" or "kde" (aggregate.py) over the k distances.
    bandwidth: h > 0 of "softmin" / "kde" (a finite number, a 0-d array or a traced
      scalar); None for "mean".
    check_finite_inputs: reject NaN/Inf (one device reduction per input and kernel).

  Returns:
    (scores [N] float32, neighbor indices [N, num_neighbors] int32, nearest first).

  Raises:
    ValueError: naming a bad argument (e.g. a bandwidth that is not one number > 0).
  """
  sharded_pool = sharding.as_sharded(train_pool, "train_pool")
  if sharded_pool is not None:
    train_pool = sharded_pool
  neighbors.validate_knn_args(test_pool, train_pool, k, queries_name="test_pool",
                              gallery_name="train_pool")
  num_neighbors = k if num_neighbors is None else num_neighbors
  if isinstance(num_neighbors, bool) or not isinstance(num_neighbors, (int, np.integer)) \
      or not 1 <= num_neighbors <= train_pool.shape[0]:
    raise ValueError(f"num_neighbors must be an int in [1, {train_pool.shape[0]}] (the "
                     f"number of training images), got {num_neighbors!r}")
  aggregate_lib.check_aggregate(aggregate, bandwidth)
  if sharded_pool is not None:
    return sharded.image_scores(test_pool, sharded_pool, k, metric,
                                num_neighbors=num_neighbors, aggregate=aggregate,
                                bandwidth=bandwidth, check_finite_inputs=check_finite_inputs)
  m = neighbors.resolve_metric(metric, train_pool.shape[1],
                               check_finite_inputs=check_finite_inputs)
  if check_finite_inputs:
    neighbors.check_finite("test_pool", test_pool)
    neighbors.check_finite("train_pool", train_pool)
  chunk, query_block = neighbors.default_blocks(test_pool.shape[0], train_pool.shape[0])
  return local.image_scores_jit(test_pool, train_pool, m, _bandwidth(bandwidth), k=int(k),
                                num_neighbors=int(num_neighbors), aggregate=aggregate,
                                chunk_size=chunk, query_block=query_block)


def _bandwidth(value: Any) -> Array:
  """A bandwidth as a float32 scalar jit argument (1 when unused: "mean")."""
  return jnp.asarray(1.0 if value is None else value, jnp.float32)


def _per_part(value: Any, levels: tuple[str, ...], combine: str, what: str) -> tuple:
  """A value or a dict level -> value as one entry per level ("ensemble") or one entry
  ("cat", where the levels form one gallery).

  Raises:
    ValueError: a dict whose levels differ from `levels`, or a dict with "cat".
  """
  if isinstance(value, Mapping):
    if combine == "cat":
      raise ValueError(f'combine="cat" searches the concatenated levels: pass one {what}, '
                       f"not a dict level -> {what}")
    if set(value) != set(levels):
      raise ValueError(f"{what} has levels {sorted(value)}, the features have "
                       f"{sorted(levels)}")
    return tuple(value[level] for level in levels)
  return (value,) * (len(levels) if combine == "ensemble" else 1)


# ----------------------------------------------------------------------------------
# Pixel-level scores: validation and the public entry point.


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _validate_pixel_args(test_features, train_features, neighbor_indices, kappa, combine):
  """Checks shapes in Python; returns (levels, grid, N, M, K)."""
  if not isinstance(test_features, Mapping) or not test_features:
    raise ValueError("test_features must be a non-empty dict level -> [N, h, w, C]")
  if not isinstance(train_features, Mapping) or not train_features:
    raise ValueError("train_features must be a non-empty dict level -> [M, h, w, C] "
                     "(empty training set?)")
  levels = tuple(test_features)
  if set(levels) != set(train_features):
    raise ValueError(f"test_features levels {sorted(levels)} differ from train_features "
                     f"levels {sorted(train_features)}")
  n = m = None
  for level in levels:
    te, tr = test_features[level], train_features[level]
    neighbors.check_real(f"test_features[{level!r}]", te)
    neighbors.check_real(f"train_features[{level!r}]", tr)
    if np.ndim(te) != 4 or np.ndim(tr) != 4:
      raise ValueError(f"level {level!r}: features must be [N, h, w, C]; got test "
                       f"{np.shape(te)}, train {np.shape(tr)}")
    if te.shape[1:] != tr.shape[1:]:
      raise ValueError(f"level {level!r}: test features {te.shape[1:]} and train features "
                       f"{tr.shape[1:]} differ in [h, w, C]")
    if n is not None and (te.shape[0] != n or tr.shape[0] != m):
      raise ValueError(f"level {level!r}: {te.shape[0]} test / {tr.shape[0]} train images, "
                       f"other levels have {n} / {m}")
    n, m = te.shape[0], tr.shape[0]
  if m == 0:
    raise ValueError("train_features hold 0 images (empty training set)")
  if n == 0:
    raise ValueError("test_features hold 0 images")
  if np.ndim(neighbor_indices) != 2 or neighbor_indices.shape[0] != n:
    raise ValueError(f"neighbor_indices must be [N={n}, K], got {np.shape(neighbor_indices)}")
  if not np.issubdtype(neighbor_indices.dtype, np.integer):
    raise ValueError(f"neighbor_indices must be integers, got {neighbor_indices.dtype}")
  k = neighbor_indices.shape[1]
  if not 1 <= k <= m:
    raise ValueError(f"neighbor_indices has K={k} images per test image; need 1 <= K <= "
                     f"{m} (the number of training images)")
  if not isinstance(neighbor_indices, jax.core.Tracer):
    lo, hi = int(jnp.min(neighbor_indices)), int(jnp.max(neighbor_indices))
    if lo < 0 or hi >= m:
      raise ValueError(f"neighbor_indices must be in [0, {m}), got values in [{lo}, {hi}]")
  if combine not in local.COMBINE_MODES:
    raise ValueError(f"combine must be one of {local.COMBINE_MODES}, got {combine!r}")
  grid = max((test_features[level].shape[1:3] for level in levels),
             key=lambda hw: hw[0] * hw[1])
  smallest = min(test_features[level].shape[1] * test_features[level].shape[2]
                 for level in levels)
  gallery = k * (grid[0] * grid[1] if combine == "cat" else smallest)
  if not _is_int(kappa) or not 1 <= kappa <= gallery:
    raise ValueError(f"kappa must be an int in [1, {gallery}] (K * positions), got {kappa!r}")
  return levels, tuple(int(s) for s in grid), n, m, k


def pixel_scores(test_features: Mapping[str, Array], train_features: Mapping[str, Array],
                 neighbor_indices: Array, kappa: int = 1, combine: str = "ensemble",
                 metric: Any = "l2", *, aggregate: str = "mean", bandwidth: Any = None,
                 images_per_chunk: int | None = None, test_batch_size: int = 1,
                 check_finite_inputs: bool = True, blocking: str = "auto") -> Array:
  """SPADE pixel scores on the finest pyramid grid.

  Args:
    test_features: level -> [N, h_l, w_l, C_l] float pyramid features of test images.
    train_features: level -> [M, h_l, w_l, C_l] float, the same levels; or every level
      a sharded gallery on one mesh (spade_jax.shard_gallery(dict)): each device then
      scores against the neighbours it holds, the gallery never moves (see
      sharded_scoring.py); same results, replicated on the mesh.
    neighbor_indices: [N, K] int, the K nearest training images of each test image
      (from image_scores(..., num_neighbors=K)).
    kappa: nearest gallery features per position (paper: 1).
    combine: "ensemble" or "cat" (see module docstring).
    metric: name, Metric or kernel; or ("ensemble") a dict level -> one of those, e.g.
      a kernel fitted on each level's features. "cat": one, for the concatenated levels.
    aggregate: "mean" (SPADE), "softmin" or "kde" (aggregate.py) over the kappa
      distances (with kappa = 1 all three are the nearest distance).
    bandwidth: h > 0 of "softmin" / "kde", a finite number (or 0-d array, or traced
      scalar) or a dict level -> number ("ensemble"); None for "mean".
    images_per_chunk: training images per streamed gallery chunk; None targets ~8M
      proxy entries per chunk.
    test_batch_size: test images vmapped together (lax.map batch); 1 is fastest on CPU.
    check_finite_inputs: reject NaN/Inf features and kernel parameters (one device
      reduction per array).
    blocking: the search blocking, as spade_jax.knn's: "auto" by the platform lowered
      for (on GPUs and TPUs all positions of a test image against ~2^23-entry blocks,
      lax.top_k over each on GPUs; images_per_chunk, when given, is kept), or "cpu",
      "gpu", "tpu" on every platform. Every blocking gives the same scores up to the
      proxies' rounding. A sharded gallery uses the CPU blocking.

  Returns:
    [N, H0, W0] float32 score maps, (H0, W0) = the finest level's grid.

  Raises:
    ValueError: naming a bad argument.
  """
  sharded_features = (sharding.resolve_levels(train_features, "train_features")
                      if isinstance(train_features, Mapping) and train_features else None)
  if sharded_features is not None:
    train_features = sharded_features
  levels, grid, n, _, k = _validate_pixel_args(test_features, train_features,
                                               neighbor_indices, kappa, combine)
  aggregate_lib.check_aggregate(aggregate, bandwidth, levels=levels)
  parts = levels if combine == "ensemble" else ("cat",)
  dims = ([test_features[level].shape[-1] for level in levels] if combine == "ensemble"
          else [sum(test_features[level].shape[-1] for level in levels)])
  metrics = tuple(
      neighbors.resolve_metric(m, dim, name=f"metric[{part!r}]" if part != "cat" else "metric",
                               check_finite_inputs=check_finite_inputs)
      for m, dim, part in zip(_per_part(metric, levels, combine, "metric"), dims, parts))
  bandwidths = tuple(_bandwidth(h) for h in _per_part(bandwidth, levels, combine,
                                                      "bandwidth"))
  if not _is_int(test_batch_size) or test_batch_size < 1:
    raise ValueError(f"test_batch_size must be a positive int, got {test_batch_size!r}")
  if images_per_chunk is not None and (not _is_int(images_per_chunk) or images_per_chunk < 1):
    raise ValueError(f"images_per_chunk must be a positive int, got {images_per_chunk!r}")
  if blocking not in neighbors.BLOCKING_CHOICES:
    raise ValueError(f"blocking must be one of {neighbors.BLOCKING_CHOICES}, got "
                     f"{blocking!r}")
  if check_finite_inputs:
    for level in levels:
      neighbors.check_finite(f"test_features[{level!r}]", test_features[level])
      neighbors.check_finite(f"train_features[{level!r}]",
                             sharding.data_of(train_features[level]))
  if combine == "cat":
    sizes = [grid[0] * grid[1]]
  else:
    sizes = [test_features[level].shape[1] * test_features[level].shape[2]
             for level in levels]
  chunks, query_blocks = [], []
  for p in sizes:  # p = positions per image = queries per test image at that level.
    default_rows, _ = neighbors.default_blocks(p, k * p)
    b = images_per_chunk or max(1, round(default_rows / p))
    b = min(b, k)
    chunks.append(b)
    query_blocks.append(neighbors.default_query_block(p, b * p))
  if sharded_features is not None:
    return sharded.pixel_scores(
        test_features, sharded_features, neighbor_indices, levels=levels, grid=grid,
        kappa=int(kappa), combine=combine, metrics=metrics, aggregate=aggregate,
        bandwidths=bandwidths, images_per_chunk=tuple(chunks),
        query_blocks=tuple(query_blocks), test_batch_size=int(min(test_batch_size, n)))
  return local.pixel_scores_jit(
      {level: test_features[level] for level in levels},
      {level: train_features[level] for level in levels},
      jnp.asarray(neighbor_indices, jnp.int32), metrics, bandwidths, levels=levels,
      grid=grid, kappa=int(kappa), combine=combine, aggregate=aggregate,
      images_per_chunk=tuple(chunks), query_blocks=tuple(query_blocks),
      test_batch_size=int(min(test_batch_size, n)), blocking=blocking,
      fixed_chunks=images_per_chunk is not None)
