"""Galleries sharded over a mesh axis: the value knn and the scoring functions accept.

A plain NamedSharding cannot split M rows over A devices when A does not divide M, so
`shard_gallery(gallery [M, ...], mesh, axis)` pads the sample axis (axis 0) to a
multiple of A and keeps a validity mask; the padded rows are never returned. The
result, a `ShardedGallery`, is a pytree (data and mask are leaves; the true size, the
mesh and the axis name are static) that `spade_jax.knn`, `image_scores` and
`pixel_scores` accept wherever they accept a gallery array. A plain jax.Array already
sharded along axis 0 with a NamedSharding (so A divides M) is accepted as well.

Several processes (jax.distributed): with `process_local=True` each process passes only
its own rows; they are padded to a common count per process and assembled with
jax.make_array_from_process_local_data. Row r of the global gallery is then row
r - start of the process whose block holds r, and padding can sit at the end of every
process's block (the mask covers it); indices refer to rows of that global layout.

This module only describes and places galleries; the sharded search itself lives in
sharded_search.py (knn, image scores) and sharded_scoring.py (pixel scores).
"""

from __future__ import annotations

from collections.abc import Mapping
import math
from typing import Any

from flax import struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

Array = jax.Array


@struct.dataclass
class ShardedGallery:
  """Gallery rows padded to a multiple of a mesh axis and sharded over it.

  Attributes:
    data: [R, ...] rows, R a multiple of mesh.shape[axis], NamedSharding(mesh, P(axis)).
    valid: [R] bool, False on padding rows (same sharding).
    size: number of real (valid) rows M (static).
    mesh: the jax.sharding.Mesh (static).
    axis: the mesh axis the rows are split over (static).
    contiguous: the valid rows are rows [0, M) (static; False only for galleries
      assembled from process-local parts, whose padding ends every process's block).
  """
  data: Array
  valid: Array
  size: int = struct.field(pytree_node=False)
  mesh: Mesh = struct.field(pytree_node=False)
  axis: str = struct.field(pytree_node=False)
  contiguous: bool = struct.field(pytree_node=False, default=True)

  @property
  def shape(self) -> tuple[int, ...]:
    """(index space, ...): (M, ...) when contiguous (padding is not part of the
    gallery); otherwise every row of the layout, R, since indices run over it."""
    rows = self.size if self.contiguous else int(self.data.shape[0])
    return (rows,) + tuple(self.data.shape[1:])

  @property
  def ndim(self) -> int:
    return self.data.ndim

  @property
  def dtype(self):
    return self.data.dtype

  @property
  def num_shards(self) -> int:
    return int(self.mesh.shape[self.axis])

  @property
  def shard_rows(self) -> int:
    """Rows (padding included) held by each device along the axis."""
    return int(self.data.shape[0]) // self.num_shards

  def to_numpy(self) -> np.ndarray:
    """[M, ...] the valid rows in index order, on the host (one process only)."""
    data, valid = np.asarray(self.data), np.asarray(self.valid)
    return data[valid]


# ----------------------------------------------------------------------------------
# Meshes.


def resolve_mesh(mesh: Mesh | None, axis: str, what: str = "mesh") -> Mesh:
  """`mesh`, or the one set with jax.set_mesh; checks that it has `axis`.

  Raises:
    ValueError: no mesh given or set, not a Mesh, or no axis named `axis`.
  """
  if mesh is None:
    mesh = jax.sharding.get_mesh()
    if mesh.empty:
      raise ValueError(f"{what} is None and no mesh is set with jax.set_mesh; pass a "
                       f"jax.sharding.Mesh with an axis named {axis!r}")
  if not isinstance(mesh, Mesh):
    raise ValueError(f"{what} must be a jax.sharding.Mesh, got {type(mesh).__name__}")
  if not isinstance(axis, str) or axis not in mesh.axis_names:
    raise ValueError(f"{what} has no axis named {axis!r}; its axes are "
                     f"{tuple(mesh.axis_names)}")
  return mesh


def query_axes(mesh: Mesh, axis: str) -> tuple[str, ...]:
  """Mesh axes other than the gallery axis (size > 1): queries are spread over them."""
  return tuple(a for a in mesh.axis_names if a != axis and mesh.shape[a] > 1)


def constrain(x: Array, mesh: Mesh, spec: P) -> Array:
  """Sharding annotation inside jit, for Explicit (reshard) and Auto meshes alike."""
  if all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    return jax.sharding.reshard(x, NamedSharding(mesh, spec))
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def place_replicated(x: Any, mesh: Mesh) -> Any:
  """A host / single-device value, replicated over `mesh` (every process passes the same).

  Arrays already on the mesh and tracers are returned as they are.
  """
  if isinstance(x, jax.core.Tracer):
    return x
  if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) \
      and x.sharding.mesh == mesh:
    return x
  sharding = NamedSharding(mesh, P())
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_local(x: Array) -> Array:
  """A fully replicated array as a single-device array of this process (no host copy)."""
  if isinstance(x, jax.core.Tracer) or len(x.sharding.device_set) == 1:
    return x
  return x.addressable_shards[0].data


# ----------------------------------------------------------------------------------
# Recognising sharded galleries.


def _sharded_axis(x: Array, name: str) -> str | None:
  """The mesh axis splitting axis 0 of a NamedSharding-ed array (None: not split).

  Raises:
    ValueError: split along another axis than the sample axis, or over several axes.
  """
  sizes = x.sharding.mesh.shape
  spec = tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
  spec = tuple(None if entry is None or all(sizes[n] == 1 for n in (
      entry if isinstance(entry, tuple) else (entry,))) else entry for entry in spec)
  for dim, entry in enumerate(spec[1:], 1):
    if entry is not None:
      raise ValueError(
          f"{name} is sharded along axis {dim} (spec {x.sharding.spec}); a gallery must "
          f"be sharded along its sample axis 0 only, e.g. P({entry!r}) (see "
          "spade_jax.shard_gallery)")
  first = spec[0] if spec else None
  if isinstance(first, tuple):
    if len(first) > 1:
      raise ValueError(f"{name} is sharded over several mesh axes {first}; shard the "
                       "sample axis over one axis (spade_jax.shard_gallery)")
    first = first[0] if first else None
  return first


def as_sharded(x: Any, name: str = "gallery") -> ShardedGallery | None:
  """`x` as a ShardedGallery if it is one or a jax.Array split along axis 0, else None.

  Raises:
    ValueError: a jax.Array sharded along a non-sample axis or several mesh axes.
  """
  if isinstance(x, ShardedGallery):
    return x
  if isinstance(x, jax.core.Tracer) or not isinstance(x, jax.Array):
    return None
  if not isinstance(x.sharding, NamedSharding) or x.ndim == 0:
    return None
  axis = _sharded_axis(x, name)
  if axis is None:
    return None
  mesh = x.sharding.mesh
  if x.shape[0] % mesh.shape[axis]:
    raise ValueError(f"{name} has {x.shape[0]} rows, not a multiple of mesh axis {axis!r} "
                     f"({mesh.shape[axis]}); use spade_jax.shard_gallery, which pads")
  valid = jax.jit(lambda: jnp.ones((x.shape[0],), bool),
                  out_shardings=NamedSharding(mesh, P(axis)))()
  return ShardedGallery(data=x, valid=valid, size=int(x.shape[0]), mesh=mesh, axis=axis)


def is_sharded(x: Any) -> bool:
  """True for a ShardedGallery, a jax.Array split over a mesh, or a dict of them."""
  if isinstance(x, Mapping):
    return any(is_sharded(v) for v in x.values())
  return as_sharded(x) is not None


def num_rows(x: Any) -> int:
  """Rows of a gallery: ShardedGallery.size (padding excluded) or x.shape[0]."""
  return x.size if isinstance(x, ShardedGallery) else int(x.shape[0])


def data_of(x: Any) -> Any:
  """The array behind a gallery: ShardedGallery.data (padding included) or `x` itself."""
  return x.data if isinstance(x, ShardedGallery) else x


def resolve_levels(levels: Mapping[str, Any], name: str) -> dict[str, ShardedGallery] | None:
  """Every level as a ShardedGallery on one mesh / axis / layout, or None if none is sharded.

  Raises:
    ValueError: a level sharded along a non-sample axis, some levels sharded and others
      not, or levels on different meshes, axes or layouts.
  """
  found = {level: as_sharded(x, f"{name}[{level!r}]") for level, x in levels.items()}
  if all(g is None for g in found.values()):
    return None
  for level, g in found.items():
    if g is None:
      raise ValueError(f"{name}[{level!r}] is not sharded but other levels are; shard "
                       "every level the same way (spade_jax.shard_gallery(dict))")
  first = next(iter(found.values()))
  for level, g in found.items():
    if (g.mesh, g.axis, g.size, g.data.shape[0]) != (first.mesh, first.axis, first.size,
                                                    first.data.shape[0]):
      raise ValueError(f"{name}[{level!r}] is sharded differently from the other levels "
                       f"(mesh axes {g.mesh.axis_names}, axis {g.axis!r}, {g.size} rows "
                       f"padded to {g.data.shape[0]}); shard them with one shard_gallery")
  return found


# ----------------------------------------------------------------------------------
# Placing galleries.


def _padded_rows(rows: int, multiple: int) -> int:
  return max(multiple, math.ceil(rows / multiple) * multiple)


def _shard_global(gallery: Any, mesh: Mesh, axis: str) -> ShardedGallery:
  """The whole gallery (the same on every process) -> padded, sharded rows."""
  num = int(mesh.shape[axis])
  rows = int(gallery.shape[0])
  padded = _padded_rows(rows, num)
  sharding = NamedSharding(mesh, P(axis))
  if isinstance(gallery, jax.Array) and isinstance(gallery.sharding, NamedSharding) \
      and gallery.sharding.mesh == mesh:
    # Already on the mesh (e.g. replicated): pad and reshard there.
    pad = [(0, padded - rows)] + [(0, 0)] * (gallery.ndim - 1)
    data = jax.jit(lambda g: jnp.pad(g, pad), out_shardings=sharding)(gallery)
  else:
    # Host rows go straight to their device; no padded copy of the whole gallery.
    host = np.asarray(gallery)

    def rows_of(index):
      start, stop, _ = index[0].indices(padded)
      block = host[start:min(stop, rows)]
      if stop > rows:
        block = np.concatenate([block, np.zeros((stop - max(start, rows),) + host.shape[1:],
                                                host.dtype)])
      return block[(slice(None),) + tuple(index[1:])]

    data = jax.make_array_from_callback((padded,) + host.shape[1:], sharding, rows_of)
  valid = jax.jit(lambda: jnp.arange(padded) < rows, out_shardings=sharding)()
  return ShardedGallery(data=data, valid=valid, size=rows, mesh=mesh, axis=axis)


def _local_blocks(mesh: Mesh, axis: str) -> tuple[int, int, int]:
  """(rows of A this process holds when the axis has A rows, number of process blocks,
  index of this process's block along the axis)."""
  num = int(mesh.shape[axis])
  held = NamedSharding(mesh, P(axis)).addressable_devices_indices_map((num,))
  starts = sorted({index[0].indices(num)[0] for index in held.values()})
  local = len(starts)
  return local, num // local, starts[0] // local


def _shard_process_local(gallery: Any, mesh: Mesh, axis: str) -> ShardedGallery:
  """This process's rows -> its block of a global, padded, sharded gallery."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  host = np.asarray(gallery)
  local, blocks, block = _local_blocks(mesh, axis)
  if blocks != jax.process_count():
    raise ValueError(
        f"process_local=True needs mesh axis {axis!r} to be split between the "
        f"{jax.process_count()} processes (one block each); it has {blocks} process "
        "block(s). Pass the whole gallery with process_local=False instead")
  info = np.asarray(multihost_utils.process_allgather(
      np.array([host.shape[0], block], np.int32)))  # [P, 2]
  counts = info[np.argsort(info[:, 1]), 0]  # Rows per block, in block order.
  if counts.sum() == 0:
    raise ValueError("gallery is empty (0 rows on every process)")
  per_process = _padded_rows(int(counts.max()), local)
  pad = [(0, per_process - host.shape[0])] + [(0, 0)] * (host.ndim - 1)
  sharding = NamedSharding(mesh, P(axis))
  global_rows = per_process * blocks
  data = jax.make_array_from_process_local_data(
      sharding, np.pad(host, pad), (global_rows,) + host.shape[1:])
  valid = jax.make_array_from_process_local_data(
      sharding, np.arange(per_process) < host.shape[0], (global_rows,))
  contiguous = bool((counts[:-1] == per_process).all())
  return ShardedGallery(data=data, valid=valid, size=int(counts.sum()), mesh=mesh, axis=axis,
                        contiguous=contiguous)


def _check_gallery(gallery: Any, name: str, process_local: bool) -> None:
  if isinstance(gallery, ShardedGallery):
    raise ValueError(f"{name} is already a ShardedGallery")
  if np.ndim(gallery) < 2:
    raise ValueError(f"{name} must be [M, ...] with a sample axis and features, got shape "
                     f"{np.shape(gallery)}")
  if np.shape(gallery)[0] == 0 and not process_local:
    raise ValueError(f"{name} is empty (0 rows)")


def shard_gallery(gallery: Any, mesh: Mesh | None = None, axis: str = "data", *,
                  process_local: bool = False) -> ShardedGallery | dict[str, ShardedGallery]:
  """Pads the sample axis to a multiple of the mesh axis and shards it over that axis.

  Args:
    gallery: [M, D] pooled features or [M, h, w, C] level features (NumPy or jax.Array),
      or a dict level -> [M, h, w, C] (each level is sharded alike).
    mesh: a jax.sharding.Mesh; None uses the mesh set with jax.set_mesh.
    axis: the mesh axis that splits the rows. Other mesh axes (if any) spread the
      queries / test images (data parallel).
    process_local: several processes: `gallery` holds only this process's rows (see the
      module docstring). False: every process passes the whole gallery.

  Returns:
    ShardedGallery (or a dict of them): data [R, ...] with R = M rounded up to a multiple
    of mesh.shape[axis], NamedSharding(mesh, P(axis)), and the validity mask.

  Raises:
    ValueError: no mesh, a mesh without `axis`, an empty or rank < 2 gallery, or
      process_local on a mesh whose axis does not split the processes.
  """
  mesh = resolve_mesh(mesh, axis)
  if isinstance(gallery, Mapping):
    if not gallery:
      raise ValueError("gallery dict is empty (no levels)")
    return {level: shard_gallery(g, mesh, axis, process_local=process_local)
            for level, g in gallery.items()}
  _check_gallery(gallery, "gallery", process_local)
  if process_local and jax.process_count() > 1:
    return _shard_process_local(gallery, mesh, axis)
  return _shard_global(gallery, mesh, axis)
