"""Exact kNN and DN2 image scores against a gallery sharded over a mesh axis.

Inside one shard_map over the mesh: each device along the gallery axis runs
neighbors.local_knn on its rows (padding masked, indices offset by the shard's first
global row), the [Q, k] candidate lists are all_gathered over the axis and merged in
(distance, index) order, so the result equals the single-device search. Queries are
spread over the other mesh axes (data parallel), padded to a multiple of their size;
the padding is sliced off. Results come back replicated on the mesh (small: [Q, k]),
so every process of a multi-process run can read them.

Reached through spade_jax.knn / image_scores when the gallery is a ShardedGallery or a
jax.Array sharded along axis 0; the functions here take the already-resolved
ShardedGallery.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from spade_jax.search import distances, neighbors, sharding
from spade_jax.search.sharding import ShardedGallery

Array = jax.Array


def query_spec(mesh: Mesh, axis: str) -> tuple[P, int]:
  """(PartitionSpec of the query / test-image axis, how many ways it is split)."""
  axes = sharding.query_axes(mesh, axis)
  return (P(axes) if axes else P()), math.prod(mesh.shape[a] for a in axes)


def pad_rows(x: Array, multiple: int) -> Array:
  """Pads axis 0 to a multiple of `multiple` by repeating the last row (inside jit).

  Repeating a real row keeps the padded queries among the others, so a translated
  search's center (neighbors.search_center, their mean) stays near the data.
  """
  pad = (-x.shape[0]) % multiple
  if not pad:
    return x
  mode = "edge" if x.shape[0] else "constant"
  return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), mode=mode)


def merge_gathered(dist: Array, idx: Array, axis: str, k: int) -> tuple[Array, Array]:
  """All-gathers per-device candidates [Q, k_local] over `axis`; the k best by
  (distance, index). Invalid candidates are (+inf, -1)."""
  k_local = dist.shape[1]
  dist = lax.all_gather(dist, axis, axis=1, tiled=True)
  idx = lax.all_gather(idx, axis, axis=1, tiled=True)
  return neighbors.merge_topk(dist[:, :k_local], idx[:, :k_local], dist[:, k_local:],
                              idx[:, k_local:], k)


def search_shards(queries: Array, gallery: ShardedGallery, k: int, metric: distances.Metric,
            chunk_size: int | None, query_block: int | None, kernel: str = "auto",
            blocking: str = "cpu", precision: str = "float32") -> tuple[Array, Array]:
  """([Q, k] distances, [Q, k] global indices), replicated on the mesh (traced)."""
  mesh, axis = gallery.mesh, gallery.axis
  spec, ways = query_spec(mesh, axis)
  num_queries = queries.shape[0]
  queries = sharding.constrain(pad_rows(queries, ways), mesh, spec)
  rows = gallery.shard_rows

  def local(q, g, valid, metric):
    offset = lax.axis_index(axis) * rows
    dist, idx = neighbors.local_knn(q, g, min(k, rows), metric, chunk_size, valid=valid,
                                    index_offset=offset, query_block=query_block,
                                    kernel=kernel, blocking=blocking, precision=precision)
    if rows < k:  # Fewer rows than k on a shard: fill with empty candidates.
      dist = jnp.pad(dist, ((0, 0), (0, k - rows)), constant_values=jnp.inf)
      idx = jnp.pad(idx, ((0, 0), (0, k - rows)), constant_values=-1)
    return merge_gathered(dist, idx, axis, k)

  # A kernel's parameters enter replicated (P()), as arguments: shard_map does not
  # take closed-over arrays of a mesh with Explicit axes.
  dist, idx = jax.shard_map(local, mesh=mesh, in_specs=(spec, P(axis), P(axis), P()),
                            out_specs=(spec, spec), check_vma=False)(
                                queries, gallery.data, gallery.valid, metric)
  dist = sharding.constrain(dist, mesh, P())[:num_queries]
  idx = sharding.constrain(idx, mesh, P())[:num_queries]
  return dist, idx


@functools.partial(jax.jit, static_argnames=("k", "chunk_size", "query_block", "kernel",
                                             "blocking", "precision"))
def _knn_jit(queries, gallery, metric, *, k, chunk_size, query_block, kernel, blocking,
             precision):
  return search_shards(queries, gallery, k, metric, chunk_size, query_block, kernel,
                       blocking, precision)


def local_blocks(num_queries: int, gallery: ShardedGallery, chunk_size: int | None,
            query_block: int | None) -> tuple[int, int]:
  """Per-device (chunk_size, query_block) from the local shapes (the CPU blocking)."""
  _, ways = query_spec(gallery.mesh, gallery.axis)
  local_queries = max(1, -(-num_queries // ways))
  default_chunk, _ = neighbors.default_blocks(local_queries, gallery.shard_rows)
  chunk = default_chunk if chunk_size is None else min(int(chunk_size), gallery.shard_rows)
  if query_block is None:
    query_block = neighbors.default_query_block(local_queries, chunk)
  return chunk, max(1, min(int(query_block), local_queries))


def explicit_local_blocks(num_queries: int, gallery: ShardedGallery, chunk_size: int | None,
                          query_block: int | None) -> tuple[int | None, int | None]:
  """local_blocks when the caller gives a size; (None, None) otherwise: each device's
  blocking follows the platform (neighbors.local_knn)."""
  if chunk_size is None and query_block is None:
    return None, None
  return local_blocks(num_queries, gallery, chunk_size, query_block)


def place_metric(metric: Any, mesh: Mesh) -> Any:
  """A kernel's parameters replicated on `mesh` (a Metric has none)."""
  return jax.tree.map(lambda x: sharding.place_replicated(x, mesh), metric)


def check_valid_rows(name: str, value: int, gallery: ShardedGallery) -> None:
  if value > gallery.size:
    raise ValueError(f"{name}={value} is larger than the gallery's {gallery.size} valid rows")


def knn(queries: Array, gallery: ShardedGallery, k: int,
        metric: str | distances.Metric = "l2", *, chunk_size: int | None = None,
        query_block: int | None = None,
        check_finite_inputs: bool = True, kernel: str = "auto", blocking: str = "auto",
        precision: str = "float32") -> tuple[Array, Array]:
  """spade_jax.knn on a sharded gallery (same arguments and results).

  Args:
    queries: [Q, D] float (host or any device; replicated onto the mesh).
    gallery: ShardedGallery of M rows [M, D].
    k, metric, chunk_size, query_block, check_finite_inputs, kernel, blocking,
      precision: as spade_jax.knn; chunk_size / query_block apply per device.

  Returns:
    (distances [Q, k] float32 ascending, indices [Q, k] int32 global rows), replicated
    on the gallery's mesh; equal to the single-device search.
  """
  neighbors.validate_knn_args(queries, gallery, k)
  check_valid_rows("k", k, gallery)
  m = neighbors.resolve_metric(metric, gallery.shape[1],
                               check_finite_inputs=check_finite_inputs)
  neighbors._check_kernel(kernel)  # pylint: disable=protected-access
  neighbors.check_search_options(blocking, precision, m)
  neighbors._positive_int_or_none("chunk_size", chunk_size)  # pylint: disable=protected-access
  neighbors._positive_int_or_none("query_block", query_block)  # pylint: disable=protected-access
  if check_finite_inputs:
    neighbors.check_finite("queries", queries)
    neighbors.check_finite("gallery", gallery.data)
  chunk, block = explicit_local_blocks(queries.shape[0], gallery, chunk_size, query_block)
  queries = sharding.place_replicated(queries, gallery.mesh)
  return _knn_jit(queries, gallery, place_metric(m, gallery.mesh), k=int(k), chunk_size=chunk,
                  query_block=block, kernel=kernel, blocking=blocking, precision=precision)
