"""SPADE scores against training features sharded over a mesh axis.

The gallery of a test image is every position of its K nearest training images. Those
images live on the devices that hold their rows, and the features never move: each
device along the gallery axis

1. keeps the neighbours it holds (a stable compaction of the K-list, so their order is
   kept) and streams only those, a few images per chunk, for as many chunks as it
   needs (a dynamic trip count: a device holding none of them does no search);
2. gives each candidate the index it has in the single-device gallery
   (rank in the K-list * positions + position) and recomputes its exact distance;
3. all_gathers its [positions, kappa] candidates over the axis; every device merges
   them in (distance, index) order and averages the kappa best.

So the result equals scoring.pixel_scores on one device. Test images are spread over
the other mesh axes (padded to a multiple, sliced off). Both combine modes ("ensemble",
"cat") are local.pyramid_scores itself, with this module's search plugged in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import functools
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np

from spade_jax.scoring import aggregate as aggregate_lib
from spade_jax.scoring import local
from spade_jax.search import cpu_kernel, distances, neighbors, sharded_neighbors, sharding
from spade_jax.search.kernels import base
from spade_jax.search.sharding import ShardedGallery

Array = jax.Array


def _held_stream(queries: Array, nbrs: Array, offset: Array, shard_rows: int,
                 rows_of: Callable[[Array], Array], rows_at: Callable[[Array, Array], Array],
                 positions: int, images_per_chunk: int, kappa: int, axis: str,
                 metric: distances.Metric, reduce: Callable[[Array], Array],
                 query_block: int | None, bank: Array | None = None) -> Array:
  """Scores [Q] of queries against the K-image gallery, of which this device holds some.

  Args:
    queries: [Q, D] raw query features of one test image.
    nbrs: [K] int32 global training-image ids (single-device gallery row r is position
      r % positions of image nbrs[r // positions]).
    offset: this shard's first global row.
    shard_rows: rows per shard.
    rows_of: local image ids [B] -> [B * positions, D] raw rows.
    rows_at: (local images [...], positions [...]) -> [..., D] raw rows.
    positions: rows per image.
    images_per_chunk: B.
    kappa: neighbours averaged.
    axis: the gallery mesh axis (candidates are merged over it).
    metric: the Metric or kernel.
    reduce: [Q, kappa] distances -> [Q] scores (aggregate.py).
    query_block: queries per proxy block.
    bank: optional [R/A, positions, D] local features with rows_of(ids) ==
      bank[ids].reshape(-1, D); on CPU the kernel then reads the held images in place
      (slots past the held ones are masked out and skipped).

  Returns:
    [Q] float32 scores of the kappa nearest rows (same on every device); the search
    selects under stop_gradient, the distances are recomputed from the live rows.
  """
  num_images = nbrs.shape[0]
  b = min(images_per_chunk, num_images)
  held_ids = nbrs - offset
  held = (held_ids >= 0) & (held_ids < shard_rows)
  # Held neighbours first, in K-list order: slot order is then rank order, so the
  # streaming's tie-break on slots equals the single-device tie-break on rows.
  order = jnp.argsort(~held, stable=True).astype(jnp.int32)
  slots = -(-num_images // b) * b
  order = jnp.pad(order, (0, slots - num_images))
  slot_ids = jnp.clip(held_ids[order], 0, shard_rows - 1)
  count = jnp.sum(held.astype(jnp.int32))
  slot_ok = jnp.arange(slots) < count

  search = base.frozen(metric)
  q = search.prepare(lax.stop_gradient(queries).astype(jnp.float32))
  center = neighbors.search_center(search, q)
  q_emb = neighbors.embed_queries(search, q, center)
  init = (jnp.full((q.shape[0], kappa), jnp.inf, jnp.float32),
          jnp.full((q.shape[0], kappa), -1, jnp.int32))

  def body(j, carry):
    start = j * b

    def chunk(_):
      ids = lax.dynamic_slice_in_dim(slot_ids, start, b)
      ok = jnp.repeat(lax.dynamic_slice_in_dim(slot_ok, start, b), positions)
      return search.prepare(lax.stop_gradient(rows_of(ids)).astype(jnp.float32)), ok

    return neighbors.stream_topk(q_emb, chunk, 1, b * positions, kappa, search, carry=carry,
                                 first_index=start * positions, query_block=query_block,
                                 center=center)

  def chunked():
    return lax.fori_loop(0, (count + b - 1) // b, body, init)

  def in_place():
    valid = jnp.broadcast_to(slot_ok[:, None], (slots, positions))
    return cpu_kernel.search_bank(q_emb, lax.stop_gradient(bank), slot_ids, kappa, search,
                                  valid, center)

  proxies, slot_rows = neighbors.cpu_or_xla(
      bank is not None and local.uses_bank_kernel(metric, bank), in_place, chunked)

  def gather_rows(i):
    return neighbors.prepare_rows(metric, rows_at(slot_ids[i // positions], i % positions))

  live_q = metric.prepare(queries.astype(jnp.float32))
  dist, slot_rows = neighbors.exact_recompute(live_q, proxies, slot_rows, gather_rows, metric)
  s = jnp.maximum(slot_rows, 0)
  rows = jnp.where(slot_rows >= 0, order[s // positions] * positions + s % positions, -1)
  dist, _ = sharded_neighbors.merge_gathered(dist, rows, axis, kappa)
  return reduce(dist)


def _pixel_scores_one(test: dict[str, Array], train: dict[str, Array], nbrs: Array,
                      offset: Array, metrics: tuple[Any, ...], bandwidths: tuple[Array, ...],
                      *, shard_rows: int, axis: str, levels: tuple[str, ...],
                      grid: tuple[int, int], kappa: int, combine: str, aggregate: str,
                      images_per_chunk: tuple[int, ...],
                      query_blocks: tuple[int, ...]) -> Array:
  """Score map [H0, W0] of one test image; train[level]: this device's [R/A, h, w, C]."""

  def stream(queries, nbrs, *, part, **kwargs):
    return _held_stream(queries, nbrs, offset=offset, shard_rows=shard_rows, kappa=kappa,
                        axis=axis, metric=metrics[part],
                        reduce=local.reducer(aggregate, bandwidths[part]), **kwargs)

  return local.pyramid_scores(test, train, nbrs, levels=levels, grid=grid, combine=combine,
                                images_per_chunk=images_per_chunk, query_blocks=query_blocks,
                                stream=stream)


@functools.partial(jax.jit, static_argnames=("levels", "grid", "kappa", "combine",
                                             "aggregate", "images_per_chunk", "query_blocks",
                                             "test_batch_size"))
def _pixel_scores_jit(test, train, nbrs, metrics, bandwidths, *, levels, grid, kappa,
                      combine, aggregate, images_per_chunk, query_blocks, test_batch_size):
  first = train[levels[0]]
  mesh, axis, shard_rows = first.mesh, first.axis, first.shard_rows
  spec, ways = sharded_neighbors.query_spec(mesh, axis)
  num_test = nbrs.shape[0]
  test = {l: sharding.constrain(sharded_neighbors.pad_rows(test[l], ways), mesh, spec)
          for l in levels}
  nbrs = sharding.constrain(sharded_neighbors.pad_rows(nbrs.astype(jnp.int32), ways), mesh, spec)

  def per_device(test, train, nbrs, metrics, bandwidths):
    offset = lax.axis_index(axis) * shard_rows
    test, train, level_metrics = local.prepare_levels(test, train, metrics, levels,
                                                          combine)
    one = functools.partial(_pixel_scores_one, offset=offset, metrics=level_metrics,
                            bandwidths=bandwidths, shard_rows=shard_rows, axis=axis,
                            levels=levels, grid=grid, kappa=kappa, combine=combine,
                            aggregate=aggregate, images_per_chunk=images_per_chunk,
                            query_blocks=query_blocks)
    return lax.map(lambda xs: one(xs[0], train, xs[1]), (test, nbrs),
                   batch_size=min(test_batch_size, nbrs.shape[0]))

  maps = jax.shard_map(per_device, mesh=mesh, in_specs=(spec, P(axis), spec, P(), P()),
                       out_specs=spec, check_vma=False)(
                           test, {l: train[l].data for l in levels}, nbrs, metrics, bandwidths)
  return sharding.constrain(maps, mesh, P())[:num_test]


def pixel_scores(test_features: Mapping[str, Array],
                 train_features: Mapping[str, ShardedGallery], neighbor_indices: Array, *,
                 levels: tuple[str, ...], grid: tuple[int, int], kappa: int, combine: str,
                 metrics: tuple[Any, ...], aggregate: str, bandwidths: tuple[Array, ...],
                 images_per_chunk: tuple[int, ...], query_blocks: tuple[int, ...],
                 test_batch_size: int) -> Array:
  """api.pixel_scores on sharded train features (arguments validated by the caller).

  Args:
    test_features: level -> [N, h, w, C] (host or any device; replicated onto the mesh).
    train_features: level -> ShardedGallery [M, h, w, C], all on one mesh / axis / layout.
    neighbor_indices: [N, K] int global training-image rows.
    levels, grid, kappa, combine, metrics, aggregate, bandwidths, images_per_chunk,
      query_blocks, test_batch_size: as resolved by api.pixel_scores.

  Returns:
    [N, H0, W0] float32 score maps, replicated on the mesh.
  """
  mesh = next(iter(train_features.values())).mesh
  test = {l: sharding.place_replicated(test_features[l], mesh) for l in levels}
  if not isinstance(neighbor_indices, jax.Array):
    neighbor_indices = np.asarray(neighbor_indices, np.int32)
  nbrs = sharding.place_replicated(neighbor_indices, mesh)
  metrics = sharded_neighbors.place_metric(metrics, mesh)
  bandwidths = sharded_neighbors.place_metric(bandwidths, mesh)
  return _pixel_scores_jit(test, {l: train_features[l] for l in levels}, nbrs, metrics,
                           bandwidths, levels=levels, grid=grid, kappa=kappa, combine=combine,
                           aggregate=aggregate, images_per_chunk=images_per_chunk,
                           query_blocks=query_blocks, test_batch_size=test_batch_size)


# ----------------------------------------------------------------------------------
# Image-level scores.


@functools.partial(jax.jit, static_argnames=("k", "num_neighbors", "aggregate", "chunk_size",
                                             "query_block"))
def _image_scores_jit(test_pool, train_pool, metric, bandwidth, *, k, num_neighbors,
                      aggregate, chunk_size, query_block):
  dist, idx = sharded_neighbors.search_shards(test_pool, train_pool, max(k, num_neighbors),
                                              metric, chunk_size, query_block)
  return aggregate_lib.aggregate(dist[:, :k], aggregate, bandwidth), idx[:, :num_neighbors]


def image_scores(test_pool: Array, train_pool: sharding.ShardedGallery, k: int,
                 metric: str | distances.Metric = "l2", *, num_neighbors: int | None = None,
                 aggregate: str = "mean", bandwidth: Any = None,
                 check_finite_inputs: bool = True) -> tuple[Array, Array]:
  """api.image_scores on a sharded train_pool (validated by the caller).

  Returns:
    (scores [N] float32, neighbor indices [N, num_neighbors] int32), replicated.
  """
  m = neighbors.resolve_metric(metric, train_pool.shape[1],
                               check_finite_inputs=check_finite_inputs)
  num_neighbors = k if num_neighbors is None else num_neighbors
  sharded_neighbors.check_valid_rows("k", k, train_pool)
  sharded_neighbors.check_valid_rows("num_neighbors", num_neighbors, train_pool)
  if check_finite_inputs:
    neighbors.check_finite("test_pool", test_pool)
    neighbors.check_finite("train_pool", train_pool.data)
  chunk, block = sharded_neighbors.local_blocks(test_pool.shape[0], train_pool, None,
                                                None)
  test_pool = sharding.place_replicated(test_pool, train_pool.mesh)
  mesh = train_pool.mesh
  h = jnp.asarray(1.0 if bandwidth is None else bandwidth, jnp.float32)
  return _image_scores_jit(test_pool, train_pool, sharded_neighbors.place_metric(m, mesh),
                           sharded_neighbors.place_metric(h, mesh),
                           k=int(k), num_neighbors=int(num_neighbors), aggregate=aggregate,
                           chunk_size=chunk, query_block=block)

