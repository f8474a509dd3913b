"""SPADE scores: image-level kNN (DN2) and pixel-level pyramid correspondence.

Paper notation: f_p(y) is the pooled feature of image y, F(y, p) its pyramid feature
at position p; N_K(y) the K training images nearest to y in pooled space.

* image score s(y) = mean_{x in N_k(y)} d(f_p(y), f_p(x))       (`image_scores`)
* pixel score s(y, p) = mean over the kappa nearest g in
  G = {F(x, p') : x in N_K(y), all p'} of d(F(y, p), g)         (`pixel_scores`)

The gallery G of one test image (K * h * w positions) is never materialised: the K
images are streamed a few at a time (gather from the training features, then a
running top-kappa, see neighbors.stream_topk). The kernel is written for one test
image and mapped over the test batch with lax.map(batch_size=...) (vmap inside).

Combining the pyramid levels (layer1..3), both published ways:

* "ensemble": each level scored alone against its own gallery; the [h_l, w_l] score
  maps are upsampled bilinearly (align_corners=False) to the finest grid and averaged;
* "cat": every level resized to the finest grid by bilinear upsampling
  (align_corners=False, as the public SPADE/PaDiM ports do with F.interpolate) and the
  channels concatenated (256 + 512 + 1024 = 1792-d for wide_resnet50_2); the training
  images' levels are upsampled chunk by chunk inside the stream.
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from spade_jax import anomaly_map
from spade_jax import cpu_kernel
from spade_jax import distances
from spade_jax import neighbors
from spade_jax import sharding

Array = jax.Array
COMBINE_MODES = ("ensemble", "cat")


# ----------------------------------------------------------------------------------
# Image-level scores.


@functools.partial(jax.jit, static_argnames=("k", "num_neighbors", "metric", "chunk_size",
                                             "query_block"))
def _image_scores_jit(test_pool, train_pool, *, k, num_neighbors, metric, chunk_size,
                      query_block):
  dist, idx = neighbors.local_knn(test_pool, train_pool, max(k, num_neighbors), metric,
                                  chunk_size, query_block=query_block)
  return jnp.mean(dist[:, :k], axis=1), idx[:, :num_neighbors]


def image_scores(test_pool: Array, train_pool: Array, k: int,
                 metric: str | distances.Metric = "l2", *,
                 num_neighbors: int | None = None,
                 check_finite_inputs: bool = True) -> tuple[Array, Array]:
  """DN2 image scores: mean distance to the k nearest training pooled features.

  Args:
    test_pool: [N, D] float pooled features of the test images.
    train_pool: [M, D] float pooled features of the training images, or a sharded
      gallery (ShardedGallery / jax.Array split along axis 0): then searched where it
      lies, same results, replicated on its mesh.
    k: neighbours averaged into the score, 1 <= k <= M.
    metric: name or Metric.
    num_neighbors: how many nearest training images to return (SPADE's K for the
      pixel gallery; may differ from k; one search serves both). Default k.
    check_finite_inputs: reject NaN/Inf (one device reduction per input).

  Returns:
    (scores [N] float32, neighbor indices [N, num_neighbors] int32, nearest first).
  """
  sharded = sharding.as_sharded(train_pool, "train_pool")
  if sharded is not None:
    train_pool = sharded
  neighbors.validate_knn_args(test_pool, train_pool, k, queries_name="test_pool",
                              gallery_name="train_pool")
  num_neighbors = k if num_neighbors is None else num_neighbors
  if isinstance(num_neighbors, bool) or not isinstance(num_neighbors, (int, np.integer)) \
      or not 1 <= num_neighbors <= train_pool.shape[0]:
    raise ValueError(f"num_neighbors must be an int in [1, {train_pool.shape[0]}] (the "
                     f"number of training images), got {num_neighbors!r}")
  if sharded is not None:
    from spade_jax import sharded_search  # pylint: disable=import-outside-toplevel
    return sharded_search.image_scores(test_pool, sharded, k, metric,
                                       num_neighbors=num_neighbors,
                                       check_finite_inputs=check_finite_inputs)
  m = distances.get_metric(metric)
  if check_finite_inputs:
    neighbors.check_finite("test_pool", test_pool)
    neighbors.check_finite("train_pool", train_pool)
  chunk, query_block = neighbors.default_blocks(test_pool.shape[0], train_pool.shape[0])
  return _image_scores_jit(test_pool, train_pool, k=int(k), num_neighbors=int(num_neighbors),
                           metric=m, chunk_size=chunk, query_block=query_block)


# ----------------------------------------------------------------------------------
# Pixel-level scores: one test image.


def _resize_rows(feats: Array, size: tuple[int, int]) -> Array:
  """[B, h, w, C] -> [B, H, W, C] bilinear (align_corners=False); identity if same size."""
  h, w = feats.shape[1:3]
  if (h, w) == tuple(size):
    return feats
  mat_h = jnp.asarray(anomaly_map.bilinear_matrix(h, size[0]))
  mat_w = jnp.asarray(anomaly_map.bilinear_matrix(w, size[1]))
  hi = lax.Precision.HIGHEST
  out = jnp.einsum("Hh,bhwc->bHwc", mat_h, feats, precision=hi)
  return jnp.einsum("Ww,bHwc->bHWc", mat_w, out, precision=hi)


def _resize_at(feats: Array, image: Array, pos: Array, grid: tuple[int, int]) -> Array:
  """Bilinearly resized features of single positions without resizing whole images.

  Args:
    feats: [M, h, w, C] one level's training features.
    image: [...] int32 training-image ids.
    pos: [...] int32 positions on the `grid` (row-major).
    grid: (H, W) finest grid.

  Returns:
    [..., C] float32, == _resize_rows(feats[image], grid)[pos] (4-tap form).
  """
  h, w = feats.shape[1:3]
  if (h, w) == tuple(grid):
    return feats[image, pos // w, pos % w].astype(jnp.float32)
  y0, y1, fy = (jnp.asarray(a) for a in anomaly_map.bilinear_taps(h, grid[0]))
  x0, x1, fx = (jnp.asarray(a) for a in anomaly_map.bilinear_taps(w, grid[1]))
  py, px = pos // grid[1], pos % grid[1]
  wy = fy[py].astype(jnp.float32)[..., None]
  wx = fx[px].astype(jnp.float32)[..., None]
  top = (1 - wx) * feats[image, y0[py], x0[px]] + wx * feats[image, y0[py], x1[px]]
  bottom = (1 - wx) * feats[image, y1[py], x0[px]] + wx * feats[image, y1[py], x1[px]]
  return (1 - wy) * top + wy * bottom


def uses_bank_kernel(metric: distances.Metric, bank: Array) -> bool:
  """Whether CPU lowerings search the K images in place (cpu_kernel.search_bank)."""
  return neighbors._cpu_kernel_enabled("auto") and cpu_kernel.can_search_bank(  # pylint: disable=protected-access
      metric, bank)


def _stream_images(queries: Array, nbrs: Array, rows_of, rows_at, positions: int,
                   images_per_chunk: int, kappa: int, metric: distances.Metric,
                   query_block: int | None = None, bank: Array | None = None) -> Array:
  """Mean distance of each query to its kappa nearest rows of the K-image gallery.

  Args:
    queries: [Q, D] raw query features.
    nbrs: [K] int32 training-image ids; gallery row r is position r % positions of
      image nbrs[r // positions].
    rows_of: images [B] -> [B * positions, D] raw gallery rows of those images.
    rows_at: (images [...], positions [...]) -> [..., D] raw rows, for the exact recompute.
    positions: gallery rows per image.
    images_per_chunk: B.
    kappa: neighbours averaged.
    metric: the Metric.
    query_block: queries per proxy block.
    bank: optional [N, positions, D] with rows_of(ids) == bank[ids].reshape(-1, D);
      on CPU the kernel then reads the K images' rows in place (no gathered chunks).

  Returns:
    [Q] float32 scores.
  """
  q = metric.prepare(queries.astype(jnp.float32))
  center = neighbors.search_center(metric, q)
  q_emb = neighbors.embed_queries(metric, q, center)
  num_images = nbrs.shape[0]
  b = min(images_per_chunk, num_images)
  num_full, tail = divmod(num_images, b)

  def chunk(start, count):
    ids = lax.dynamic_slice_in_dim(nbrs, start, count)
    return metric.prepare(rows_of(ids).astype(jnp.float32)), None

  def chunked():
    proxies, idx = neighbors.stream_topk(q_emb, lambda j: chunk(j * b, b), num_full,
                                         b * positions, kappa, metric,
                                         query_block=query_block, center=center)
    if tail:
      start = num_full * b
      proxies, idx = neighbors.stream_topk(q_emb, lambda j: chunk(start, tail), 1,
                                           tail * positions, kappa, metric,
                                           carry=(proxies, idx),
                                           first_index=start * positions,
                                           query_block=query_block, center=center)
    return proxies, idx

  proxies, idx = neighbors.cpu_or_xla(
      bank is not None and uses_bank_kernel(metric, bank),
      lambda: cpu_kernel.search_bank(q_emb, bank, nbrs, kappa, metric, center=center),
      chunked)

  def gather_rows(i):
    return metric.prepare(rows_at(nbrs[i // positions], i % positions).astype(jnp.float32))

  dist, _ = neighbors.exact_recompute(q, proxies, idx, gather_rows, metric)
  return jnp.mean(dist, axis=1)


def pyramid_scores(test: dict[str, Array], train: dict[str, Array], nbrs: Array, *,
                   levels: tuple[str, ...], grid: tuple[int, int], combine: str,
                   images_per_chunk: tuple[int, ...], query_blocks: tuple[int, ...],
                   stream: Callable[..., Array]) -> Array:
  """Score map [H0, W0] of one test image (test[level]: [h, w, C]; nbrs: [K]).

  The combine logic of SPADE, shared by the single-device and the sharded paths;
  `stream(queries [P, C], nbrs, *, rows_of, rows_at, positions, images_per_chunk,
  query_block, bank) -> [P]` is the search of the positions of the K images (the sharded
  one searches only the images a device holds and merges over the mesh); `bank` is the
  level's [N, positions, C] features when rows_of gathers whole images from it ("ensemble")
  and None otherwise ("cat" builds its rows).
  """
  if combine == "ensemble":
    maps = []
    for level, b, qb in zip(levels, images_per_chunk, query_blocks):
      h, w, c = test[level].shape
      feats = train[level]
      flat = feats.reshape(feats.shape[0], h * w, c)
      scores = stream(
          test[level].reshape(h * w, c), nbrs,
          rows_of=lambda ids, flat=flat, c=c: flat[ids].reshape(-1, c),
          rows_at=lambda img, pos, flat=flat: flat[img, pos],
          positions=h * w, images_per_chunk=b, query_block=qb, bank=flat)
      maps.append(_resize_rows(scores.reshape(1, h, w, 1), grid)[0, ..., 0])
    return jnp.mean(jnp.stack(maps), axis=0)

  # combine == "cat": one gallery of concatenated, upsampled levels.
  positions = grid[0] * grid[1]
  queries = jnp.concatenate(
      [_resize_rows(test[level][None].astype(jnp.float32), grid)[0] for level in levels],
      axis=-1).reshape(positions, -1)

  def rows_of(ids):
    parts = [_resize_rows(train[level][ids].astype(jnp.float32), grid) for level in levels]
    return jnp.concatenate(parts, axis=-1).reshape(ids.shape[0] * positions, -1)

  def rows_at(img, pos):
    return jnp.concatenate([_resize_at(train[level], img, pos, grid) for level in levels],
                           axis=-1)

  scores = stream(queries, nbrs, rows_of=rows_of, rows_at=rows_at, positions=positions,
                  images_per_chunk=images_per_chunk[0], query_block=query_blocks[0],
                  bank=None)
  return scores.reshape(grid)


def _pixel_scores_one(test: dict[str, Array], train: dict[str, Array], nbrs: Array, *,
                      levels: tuple[str, ...], grid: tuple[int, int], kappa: int,
                      combine: str, metric: distances.Metric,
                      images_per_chunk: tuple[int, ...],
                      query_blocks: tuple[int, ...]) -> Array:
  """Score map [H0, W0] of one test image, all K images on this device."""

  def stream(queries, nbrs, *, rows_of, rows_at, positions, images_per_chunk, query_block,
             bank):
    return _stream_images(queries, nbrs, rows_of, rows_at, positions, images_per_chunk,
                          kappa, metric, query_block, bank)

  return pyramid_scores(test, train, nbrs, levels=levels, grid=grid, combine=combine,
                        images_per_chunk=images_per_chunk, query_blocks=query_blocks,
                        stream=stream)


@functools.partial(jax.jit, static_argnames=("levels", "grid", "kappa", "combine", "metric",
                                             "images_per_chunk", "query_blocks",
                                             "test_batch_size"))
def _pixel_scores_jit(test, train, nbrs, *, levels, grid, kappa, combine, metric,
                      images_per_chunk, query_blocks, test_batch_size):
  one = functools.partial(_pixel_scores_one, levels=levels, grid=grid, kappa=kappa,
                          combine=combine, metric=metric, images_per_chunk=images_per_chunk,
                          query_blocks=query_blocks)
  return lax.map(lambda xs: one(xs[0], train, xs[1]), (test, nbrs),
                 batch_size=test_batch_size)


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
  if combine not in COMBINE_MODES:
    raise ValueError(f"combine must be one of {COMBINE_MODES}, got {combine!r}")
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
                 metric: str | distances.Metric = "l2", *,
                 images_per_chunk: int | None = None, test_batch_size: int = 1,
                 check_finite_inputs: bool = True) -> Array:
  """SPADE pixel scores on the finest pyramid grid.

  Args:
    test_features: level -> [N, h_l, w_l, C_l] float pyramid features of test images.
    train_features: level -> [M, h_l, w_l, C_l] float, the same levels; or every level
      a sharded gallery on one mesh (spade_jax.shard_gallery(dict)): each device then
      scores against the neighbours it holds, the gallery never moves (see
      sharded_scoring.py); same results, replicated on the mesh.
    neighbor_indices: [N, K] int, the K nearest training images of each test image
      (from image_scores(..., num_neighbors=K)).
    kappa: nearest gallery features averaged per position (paper: 1).
    combine: "ensemble" or "cat" (see module docstring).
    metric: name or Metric.
    images_per_chunk: training images per streamed gallery chunk; None targets ~8M
      proxy entries per chunk.
    test_batch_size: test images vmapped together (lax.map batch); 1 is fastest on CPU.
    check_finite_inputs: reject NaN/Inf features (one device reduction per array).

  Returns:
    [N, H0, W0] float32 score maps, (H0, W0) = the finest level's grid.
  """
  sharded = (sharding.resolve_levels(train_features, "train_features")
             if isinstance(train_features, Mapping) and train_features else None)
  if sharded is not None:
    train_features = sharded
  levels, grid, n, _, k = _validate_pixel_args(test_features, train_features,
                                               neighbor_indices, kappa, combine)
  m = distances.get_metric(metric)
  if not _is_int(test_batch_size) or test_batch_size < 1:
    raise ValueError(f"test_batch_size must be a positive int, got {test_batch_size!r}")
  if images_per_chunk is not None and (not _is_int(images_per_chunk) or images_per_chunk < 1):
    raise ValueError(f"images_per_chunk must be a positive int, got {images_per_chunk!r}")
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
  if sharded is not None:
    from spade_jax import sharded_scoring  # pylint: disable=import-outside-toplevel
    return sharded_scoring.pixel_scores(
        test_features, sharded, neighbor_indices, levels=levels, grid=grid,
        kappa=int(kappa), combine=combine, metric=m, images_per_chunk=tuple(chunks),
        query_blocks=tuple(query_blocks), test_batch_size=int(min(test_batch_size, n)))
  return _pixel_scores_jit(
      {level: test_features[level] for level in levels},
      {level: train_features[level] for level in levels},
      jnp.asarray(neighbor_indices, jnp.int32), levels=levels, grid=grid,
      kappa=int(kappa), combine=combine, metric=m, images_per_chunk=tuple(chunks),
      query_blocks=tuple(query_blocks), test_batch_size=int(min(test_batch_size, n)))
