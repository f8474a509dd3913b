"""Rows of a gallery by global index, whether it lies on one device or is sharded.

A sharded gallery (sharding.ShardedGallery) is never gathered whole: inside one
shard_map over its axis, each device writes the requested rows it holds (zeros for
the others) and a psum over the axis assembles them, so only [K, ...] values move.
Indices are rows of the gallery's index space (its padded layout when it was
assembled from process-local parts), as knn and coreset return them.
"""

from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from spade_jax.search import sharding

Array = jax.Array


def local_rows(block: Array, indices: Array, first_row: Array, axis: str) -> Array:
  """Inside shard_map: rows `indices` of the gallery whose block on this device starts
  at global row `first_row`, replicated over `axis` (psum of the holders' rows).

  Args:
    block: [R, ...] this device's rows.
    indices: [K] int32 global rows (the same on every device).
    first_row: the global index of block[0].
    axis: the mesh axis the gallery is split over.

  Returns:
    [K, ...] the rows, the same on every device along `axis`.
  """
  local = indices - first_row
  held = (local >= 0) & (local < block.shape[0])
  rows = block[jnp.clip(local, 0, block.shape[0] - 1)]
  mask = held.reshape(held.shape + (1,) * (block.ndim - 1))
  return lax.psum(jnp.where(mask, rows, jnp.zeros_like(rows)), axis)


def take_rows_impl(gallery: Array | sharding.ShardedGallery, indices: Array) -> Array:
  """Un-jitted take_rows (for use inside jit); indices are not checked."""
  indices = jnp.asarray(indices, jnp.int32)
  if not isinstance(gallery, sharding.ShardedGallery):
    return jnp.asarray(gallery)[indices]
  mesh, axis, rows = gallery.mesh, gallery.axis, gallery.shard_rows
  flat = indices.reshape(-1)

  def gather(block, idx):
    return local_rows(block, idx, lax.axis_index(axis) * rows, axis)

  out = jax.shard_map(gather, mesh=mesh, in_specs=(P(axis), P()), out_specs=P(),
                      check_vma=False)(gallery.data, sharding.constrain(flat, mesh, P()))
  return out.reshape(indices.shape + out.shape[1:])


@jax.jit
def _take_rows_jit(gallery, indices):
  return take_rows_impl(gallery, indices)


def take_rows(gallery: Array | sharding.ShardedGallery, indices) -> Array:
  """gallery[indices] for a plain or a sharded gallery.

  Args:
    gallery: [M, ...] array, or a ShardedGallery (only [K, ...] values move).
    indices: [...] int rows in [0, M) (M: gallery.shape[0], the index space).

  Returns:
    [..., ...] the rows (replicated on the mesh for a sharded gallery).

  Raises:
    ValueError: non-integer indices, or concrete indices outside [0, M).
  """
  sharded = sharding.as_sharded(gallery)
  gallery = gallery if sharded is None else sharded
  dtype = getattr(indices, "dtype", None)
  if dtype is not None and not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f"indices must be integers, got dtype {dtype}")
  if not isinstance(indices, jax.core.Tracer) and jnp.size(indices):
    lo, hi = int(jnp.min(indices)), int(jnp.max(indices))
    if lo < 0 or hi >= gallery.shape[0]:
      raise ValueError(f"indices must be in [0, {gallery.shape[0]}), got values in "
                       f"[{lo}, {hi}]")
  if sharded is not None:
    indices = sharding.place_replicated(jnp.asarray(indices, jnp.int32), sharded.mesh)
  return _take_rows_jit(gallery, indices)
