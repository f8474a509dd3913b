"""PatchCore's greedy coreset: k-center greedy selection of memory-bank rows.

Given N features x_i, the coreset starts from x_start and then repeatedly adds the
point farthest from the points selected so far (PatchCore, Alg. 1):

  m_i = min over selected c of |x_i - c|^2,  next = argmax_i m_i,

which keeps one running minimum m_i per point: each step costs one pass over the
features (O(N D) time) and the memory is the features plus O(N), never the N x N
distance matrix the exact variant of the reference code builds (patchcore-inspection
#38). The whole selection is one jit-compiled lax.fori_loop.

* Projection: as in PatchCore, the distances are taken between random projections of
  the features to projection_dim dimensions (entries +-1 / sqrt(projection_dim) with
  random signs drawn from `key`, Achlioptas' variant of a Gaussian projection), which
  preserves distances approximately (Johnson-Lindenstrauss) and cuts the cost per
  step. projection_dim=None, or >= D,
  selects on the raw features: the exact greedy.
* Ties go to the lowest index (the max is found first, then the lowest row holding
  it). A selected point's minimum is set to -inf, so no row is selected twice, also
  when the remaining points duplicate selected ones (all their minima are then 0 and
  the lowest unselected index comes next).
* Distances are the direct form sum_d (x_id - c_d)^2 in float32, which does not
  cancel (|x|^2 - 2 x.c + |c|^2 would), and is exact on features with small integer
  values; every step's cost is reading the features once, either way.
* A kernel (`metric`, spade_jax.kernels) moves the selection into its own search
  space. A kernel searched as L2 on transformed rows (kernels.L2Kernel: Mahalanobis,
  linear, random Fourier, Nystrom; RBF and Laplacian, whose transform is the identity
  and whose distance is monotone in L2) selects on z = kernel.prepare(x), projected
  as above from z's dimension: the k-center greedy only compares distances, so any
  monotone function of |z - c| selects the same rows. Another kernel (a dot-product
  kernel such as the polynomial, whose distance is not L2 of any rows it computes)
  selects on its exact kernel-induced distance d_k(x_i, c), without projection.

On a sharded bank (spade_jax.shard_gallery) the loop runs inside one shard_map: each
device keeps the minima of its own rows, finds its best candidate (value, lowest
global index, row), and one all_gather over the mesh axis per step lets every device
pick the global winner: the largest value, and on ties the lowest shard, whose rows
have the lowest indices. Per row the arithmetic is the single-device one, so the
selection is the same. Padding rows start at -inf and are never selected.
"""

from __future__ import annotations

import functools
import math

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np

from spade_jax.search import neighbors, rows, sharding
from spade_jax.search.kernels import base

Array = jax.Array


def _in_l2_space(metric) -> bool:
  """Whether the greedy runs on squared L2 of (transformed) rows: no kernel, or one
  searched as L2 on its prepared rows."""
  return metric is None or isinstance(metric, base.L2Kernel)


def _distances(x: Array, center: Array, metric) -> Array:
  """[R] distances of rows x [R, d] to center [d], as the greedy compares them: the
  direct squared L2 form, or a kernel's exact distance (module docstring)."""
  if _in_l2_space(metric):
    return jnp.sum(jnp.square(x - center[None, :]), axis=1)
  return jax.vmap(metric.exact, (0, None))(x, center)


def _bf16_rows(x: Array) -> tuple[Array, Array]:
  """(x rounded to bfloat16 [R, d], the rounding's norm per row |x - bf16(x)| [R],
  rounded up): the rows a precision="bf16" step reads, and their error bound."""
  low = x.astype(jnp.bfloat16)
  error = jnp.sqrt(jnp.sum(jnp.square(x - low.astype(jnp.float32)), axis=1))
  return low, error * np.float32(1 + 2.0 ** -10) + np.float32(np.finfo(np.float32).tiny)


def _lower_bounds(low: Array, error: Array, center: Array) -> Array:
  """[R] lower bounds of the float32 squared distances |x_i - center|^2 (as _distances
  computes them) from the bfloat16 rows: |x - c| >= |bf16(x) - c| - |x - bf16(x)|, and
  float32 sums of d squares are within (d + 2) 2^-24 of the real ones (a 4x margin is
  taken)."""
  d = low.shape[1]
  slack = np.float32((d + 2) * 2.0 ** -22)
  # The barrier keeps the row sums a reduction of their own: fused into the bound's
  # elementwise tail, XLA:CPU runs them about 1.5x slower.
  approx = lax.optimization_barrier(
      jnp.sum(jnp.square(low.astype(jnp.float32) - center[None, :]), axis=1))
  root = jnp.sqrt(approx * (1 - slack)) * (1 - slack) - error
  return jnp.square(jnp.maximum(root, 0.0)) * (1 - slack)


def _greedy(x: Array, valid: Array | None, start: Array, size: int, first_row: Array,
            axis: str | None, metric=None, precision: str = "float32") -> Array:
  """The selection loop on one device's rows (traced; inside shard_map when `axis`).

  Args:
    x: [R, d] float32 features (projected, or prepared by an L2 kernel) of this device.
    valid: [R] bool, False on padding rows, or None (all valid).
    start: int32 global index of the first selected row.
    size: how many rows to select.
    first_row: int32 global index of x[0].
    axis: the mesh axis the rows are split over, or None (one device).
    metric: None (squared L2) or a kernel whose exact distance is compared (not an
      L2 kernel: those come as prepared rows x with metric None).
    precision: "float32", or "bf16" (metric None only): each step reads bfloat16 copies
      of the rows, which bound every row's float32 distance from below; only the rows
      whose bound does not rule out a new minimum (at most max(256, R / 32) of them,
      else all rows) get their float32 distance, so the running minima, and the
      selection, are the float32 greedy's.

  Returns:
    [size] int32 global indices in selection order (the same on every device).
  """
  num = x.shape[0]
  iota = lax.iota(jnp.int32, num)

  def mark_selected(mins, index):
    """mins with the (global) row `index` set to -inf where this device holds it."""
    local = index - first_row
    held = (local >= 0) & (local < num)
    at = jnp.clip(local, 0, num - 1)
    return mins.at[at].set(jnp.where(held, -jnp.inf, mins[at]))

  if valid is None:
    mins = jnp.full((num,), jnp.inf, jnp.float32)
  else:
    mins = jnp.where(valid, jnp.inf, -jnp.inf).astype(jnp.float32)
  if axis is None:
    center = x[start]
  else:
    center = rows.local_rows(x, start[None], first_row, axis)[0]
  mins = mark_selected(mins, start)
  selected = jnp.zeros((size,), jnp.int32).at[0].set(start)

  if precision == "bf16":
    low, error = _bf16_rows(x)
    capacity = min(num, max(256, num // 32))

  def update_mins(mins, center):
    if precision != "bf16":
      return jnp.minimum(mins, _distances(x, center, metric))
    # Rows whose lower bound reaches their minimum keep it (d >= bound >= min).
    open_rows = _lower_bounds(low, error, center) < mins
    count = jnp.sum(open_rows.astype(jnp.int32))

    def few(mins):
      rows = jnp.nonzero(open_rows, size=capacity, fill_value=num)[0]
      dist = _distances(x[jnp.minimum(rows, num - 1)], center, None)
      return mins.at[rows].min(dist, mode="drop")

    def every(mins):
      return jnp.minimum(mins, _distances(x, center, None))

    return lax.cond(count <= capacity, few, every, mins)

  def step(i, carry):
    mins, selected, center = carry
    mins = update_mins(mins, center)
    best = jnp.max(mins)
    local = jnp.min(jnp.where(mins == best, iota, num))  # Lowest row holding the max.
    local = jnp.minimum(local, num - 1)
    index, center = local + first_row, x[local]
    if axis is not None:
      bests = lax.all_gather(best, axis)
      indices = lax.all_gather(index, axis)
      centers = lax.all_gather(center, axis)
      winner = jnp.argmax(bests)  # First maximum: the lowest shard, so the lowest index.
      index, center = indices[winner], centers[winner]
    return mark_selected(mins, index), selected.at[i].set(index), center

  return lax.fori_loop(1, size, step, (mins, selected, center))[1]


def projection_matrix(key: Array, dim_in: int, dim_out: int) -> Array:
  """[dim_in, dim_out] float32 random sign projection, entries +-1 / sqrt(dim_out).

  Signs rather than Gaussian entries: the values are exact whatever program draws
  them (XLA may round a Gaussian sample's arithmetic differently when it fuses it
  differently), so a single-device and a sharded selection project alike.
  """
  signs = jax.random.rademacher(key, (dim_in, dim_out), jnp.float32)
  return signs * np.float32(1.0 / math.sqrt(dim_out))


def _project(x: Array, projection: Array | None) -> Array:
  x = x.astype(jnp.float32)
  if projection is None:
    return x
  return jnp.dot(x, projection, precision=lax.Precision.HIGHEST)


def _search_rows(x: Array, metric) -> tuple[Array, object]:
  """(rows the greedy selects on, the kernel whose exact distance it compares or None):
  an L2 kernel's prepared rows, else the rows themselves."""
  if metric is None:
    return x, None
  if isinstance(metric, base.L2Kernel):
    return neighbors.prepare_rows(metric, x), None
  return x.astype(jnp.float32), metric


def _search_dim(metric, dim: int) -> int:
  """The dimension of the rows the greedy selects on (an L2 kernel's transform's)."""
  if not isinstance(metric, base.L2Kernel):
    return dim
  shape = jax.eval_shape(lambda m, x: neighbors.prepare_rows(m, x), metric,
                         jax.ShapeDtypeStruct((1, dim), jnp.float32))
  return int(shape.shape[-1])


def _projection(key_data: Array, impl: str, dim: int,
                projection_dim: int | None) -> Array | None:
  if projection_dim is None:
    return None
  return projection_matrix(jax.random.wrap_key_data(key_data, impl=impl), dim, projection_dim)


@functools.partial(jax.jit, static_argnames=("size", "projection_dim", "impl", "precision"))
def _coreset_jit(features: Array, key_data: Array, start: Array, metric=None, *, size: int,
                 projection_dim: int | None, impl: str, precision: str = "float32") -> Array:
  x, exact = _search_rows(features, metric)
  projection = _projection(key_data, impl, x.shape[1], projection_dim)
  return _greedy(_project(x, projection), None, start, size, jnp.int32(0), None, exact,
                 precision)


@functools.partial(jax.jit, static_argnames=("size", "projection_dim", "impl", "precision"))
def _sharded_coreset_jit(gallery: sharding.ShardedGallery, key_data: Array, start: Array,
                         metric=None, *, size: int, projection_dim: int | None,
                         impl: str, precision: str = "float32") -> Array:
  axis, shard_rows = gallery.axis, gallery.shard_rows
  dim = _search_dim(metric, gallery.data.shape[1])
  projection = _projection(key_data, impl, dim, projection_dim)

  def local(block, valid, metric, proj, first):
    first_row = (lax.axis_index(axis) * shard_rows).astype(jnp.int32)
    x, exact = _search_rows(block, metric)
    return _greedy(_project(x, proj), valid, first, size, first_row, axis, exact, precision)

  # A kernel's parameters enter replicated (P()), as arguments (not closed over).
  return jax.shard_map(local, mesh=gallery.mesh, in_specs=(P(axis), P(axis), P(), P(), P()),
                       out_specs=P(), check_vma=False)(gallery.data, gallery.valid, metric,
                                                       projection, start)


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _as_key(key) -> Array:
  """None -> key 0; an int seed; a typed PRNG key; or a raw uint32[2] key."""
  if key is None:
    return jax.random.key(0)
  if _is_int(key):
    return jax.random.key(int(key))
  dtype = getattr(key, "dtype", None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    if np.shape(key) != ():
      raise ValueError(f"key must be a single PRNG key, got shape {np.shape(key)}")
    return key
  if dtype is not None and np.dtype(dtype) == np.uint32 and np.shape(key) == (2,):
    return jax.random.wrap_key_data(key)
  raise ValueError(f"key must be None, an int seed or a jax.random key, got {key!r:.100}")


def _check_start(start, gallery: sharding.ShardedGallery | None, num_rows: int) -> None:
  if not _is_int(start):
    raise ValueError(f"start must be an int row index, got {start!r}")
  if not 0 <= start < num_rows:
    raise ValueError(f"start must be in [0, {num_rows}) (the rows of features), got {start}")
  if gallery is not None and not gallery.contiguous:
    valid = gallery.valid
    if not isinstance(valid, jax.core.Tracer) and valid.is_fully_addressable \
        and not bool(np.asarray(valid)[start]):
      raise ValueError(f"start={start} is a padding row of the sharded features")


def coreset(features: Array | sharding.ShardedGallery, size: int, *,
            projection_dim: int | None = 128, start: int = 0, key=None,
            metric=None, precision: str = "float32") -> Array:
  """PatchCore's greedy coreset: `size` rows of `features` that cover them (k-center).

  Args:
    features: [N, D] float (one device), or a sharded gallery of N rows
      (spade_jax.shard_gallery / a jax.Array split along axis 0).
    size: rows to select, 1 <= size <= N.
    projection_dim: select on a random sign projection to this many dimensions
      (PatchCore: 128); None, or >= D: on the raw features (exact greedy).
    start: the first selected row.
    key: the projection's jax.random key (or an int seed); None: key 0.
    metric: None (L2 on the rows), or a kernel of spade_jax.kernels taking [D] rows:
      the selection runs in its search space (module docstring); projection_dim then
      applies to an L2 kernel's transformed rows, and not to other kernels (their
      exact distances are compared).
    precision: "float32" (the default) or "bf16": each greedy step reads bfloat16 copies
      of the (projected) rows, half the bytes, and computes the float32 distance only
      of the rows whose bound from the bfloat16 rows allows a new minimum (_greedy), so
      the selection is the float32 one; it costs a bfloat16 copy of the rows (2 bytes
      per value) besides them. Not with a kernel that is not searched as L2.

  Returns:
    [size] int32 row indices, distinct, in selection order (indices[0] == start); on
    a sharded gallery, rows of its index space, replicated on its mesh.

  Raises:
    ValueError: features not [N, D] real numbers, empty, or holding NaN / Inf; size,
      projection_dim, start, key or metric invalid.
  """
  sharded = sharding.as_sharded(features, "features")
  if np.ndim(features) != 2:
    raise ValueError(f"features must be [N, D], got shape {np.shape(features)}")
  neighbors.check_real("features", features)
  num_rows, dim = (int(d) for d in features.shape)
  valid_rows = num_rows if sharded is None else sharded.size
  if num_rows == 0 or dim == 0:
    raise ValueError(f"features is empty (shape {tuple(features.shape)})")
  if not _is_int(size) or not 1 <= size <= valid_rows:
    raise ValueError(f"size must be an int in [1, {valid_rows}] (the rows of features), "
                     f"got {size!r}")
  if projection_dim is not None and (not _is_int(projection_dim) or projection_dim < 1):
    raise ValueError(f"projection_dim must be a positive int or None, got {projection_dim!r}")
  _check_start(start, sharded, num_rows)
  if precision not in ("float32", "bf16"):
    raise ValueError(f"precision must be 'float32' or 'bf16', got {precision!r}")
  key = _as_key(key)
  neighbors.check_finite("features", features if sharded is None else sharded.data)
  if metric is not None:
    if not base.is_kernel(metric):
      raise ValueError(f"metric must be None or a kernel (spade_jax.kernels), got "
                       f"{metric!r:.100}")
    metric = neighbors.resolve_metric(metric, dim)
    if not _in_l2_space(metric):
      projection_dim = None  # The kernel's exact distances: no rows to project.
      if precision == "bf16":
        raise ValueError(f"precision='bf16' needs squared L2 rows (no kernel, or an L2 "
                         f"kernel), got {metric!r:.100}")
    dim = _search_dim(metric, dim)
  if projection_dim is not None and projection_dim >= dim:
    projection_dim = None  # Projecting up would not reduce the work.
  projection_dim = None if projection_dim is None else int(projection_dim)
  # The key travels as its raw data (a plain uint32 array, placeable on any mesh).
  key_data, impl = jax.random.key_data(key), str(jax.random.key_impl(key))
  static = {"size": int(size), "projection_dim": projection_dim, "impl": impl,
            "precision": precision}
  if sharded is None:
    return _coreset_jit(features, key_data, jnp.int32(start), metric, **static)
  mesh = sharded.mesh
  metric = jax.tree.map(lambda x: sharding.place_replicated(x, mesh), metric)
  return _sharded_coreset_jit(sharded, sharding.place_replicated(key_data, mesh),
                              sharding.place_replicated(np.int32(start), mesh), metric,
                              **static)
