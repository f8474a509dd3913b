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

* Pruning (squared L2 search spaces only): a row keeps its minimum without a distance
  when a lower bound of its distance to the new point proves that it cannot drop; the
  selection is the plain greedy's, bit for bit. prune="pca" (the default, "auto",
  where it applies) bounds from the rows' top 31 principal components and the norm of
  the rest (coreset_pca); prune=True (or "triangle") by the triangle inequality from
  the selected row of each minimum (_prune_factors). BENCHMARKS.md, "Coreset pruning".

On a sharded bank (spade_jax.shard_gallery) the loop runs inside one shard_map: each
device keeps the minima of its own rows, finds its best candidate (value, lowest
global index, row), and one all_gather over the mesh axis per step lets every device
pick the global winner: the largest value, and on ties the lowest shard, whose rows
have the lowest indices. Per row the arithmetic is the single-device one, so the
selection is the same. Padding rows start at -inf and are never selected. Pruned, each
device tests and gathers its own rows against the (all-gathered) selected rows; with
prune="pca" every device computes the same basis from the covariance of all rows
(summed over the mesh axis), though any basis would keep the selection exact.
"""

from __future__ import annotations

import functools
import math

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np

from spade_jax.search import coreset_pca, neighbors, rows, sharding
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


_PRUNE_MAX_DIM = 100_000  # g = (d + 2) 2^-24 <= 1e-5 below (_prune_factors).


def _prune_factors(d: int) -> tuple[np.float32, np.float32]:
  """(scale, floor) of the triangle-inequality test of a pruned greedy step on rows of
  d values: a row x, its minimum m = fl|x - a|^2 from the selected row a (`assign`),
  keeps it when the new center c has fl|a - c|^2 >= scale * m + floor.

  Why (fl: float32 as _distances computes it, in any order of its d additions; u =
  2^-24; g = (d + 2) u <= 1e-5 for d <= 100k). A float32 sum of the squares of d float32
  differences is within g S (3 u from each square of a rounded difference, (d - 1) u
  from the additions) plus e = 2 d 2^-126 (results below the smallest normal float32,
  which XLA may flush to 0) of the real sum S: (1 - g) S - e <= fl S <= (1 + g) S + e. Let M, C, D
  be the real |x - a|^2, |a - c|^2, |x - c|^2 and m, C~, D~ their float32 values. If
  C >= 4 M+ with M+ = (m + e) / (1 - g) >= M, the triangle inequality |x - c| >=
  |a - c| - |x - a| gives sqrt(D) >= 2 sqrt(M+) - sqrt(M) >= sqrt(M+), so D~ >=
  (1 - g) D - e >= (1 - g) M+ - e = m: the minimum min(m, D~) stays m, bit for bit, in
  the plain pass too (whatever order it sums in). As C >= (C~ - e) / (1 + g), C~ >= B =
  4 (1 + g) (m + e) / (1 - g) + e suffices. scale = 4 (1 + 8 g) and floor = 2^-100
  (> 300 e for d <= 100k) exceed B by 20 g m + floor / 2 at least, more than the
  rounding of evaluating scale m + floor in float32 (2 roundings, relative u, and 2^-125
  at most below normal numbers), so the float32 test C~ >= fl(scale m + floor) implies
  C~ >= B. Overflow: _prune_open caps C~ at the largest float32 (C~ = inf still means C
  >= (max - e) / (1 + g)), so a row whose m, or scale m, is inf is always open. Rows at
  -inf (selected, padding) are never open: -inf * scale + floor = -inf.
  """
  assert d <= _PRUNE_MAX_DIM, d  # coreset() refuses more.
  gamma = (d + 2) * 2.0 ** -24
  return np.float32(4 * (1 + 8 * gamma)), np.float32(2.0 ** -100)


def _prune_open(between: Array, mins: Array, d: int) -> Array:
  """[R] bool: the rows whose minimum `mins` [R] (from their selected row a) may drop
  at a new center c, between [R] = fl|a - c|^2 of each row's a, on rows of d values
  (_prune_factors: the other rows keep their minimum)."""
  scale, floor = _prune_factors(d)
  return jnp.minimum(between, np.float32(np.finfo(np.float32).max)) < mins * scale + floor


_PCA_BACKOFF = 64  # The most steps prune="pca" skips its bound after a step it did not pay.


def _capacity(num: int) -> int:
  """Rows a pruned or bf16 step gathers at most (else it reads every row)."""
  return min(num, max(256, num // 32))


def _greedy(x: Array, valid: Array | None, start: Array, size: int, first_row: Array,
            axis: str | None, metric=None, precision: str = "float32",
            prune: bool | str = False,
            with_counts: bool = False) -> Array | tuple[Array, Array]:
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
      whose bound does not rule out a new minimum (at most _capacity(R) of them, else
      all rows) get their float32 distance, so the running minima, and the selection,
      are the float32 greedy's.
    prune: (metric None only) triangle-inequality pruning: each row also keeps
      `assign`, the selected row whose distance is its minimum, and the selected rows
      themselves are kept ([size, d], filled step by step). A new center c first gets
      its distances to the selected rows ([size]); a row x can only get a new minimum
      if |a - c| < 2 |x - a| for a = assign(x) (_prune_factors, with float32 rounding
      margins), so only those open rows (at most _capacity(R), gathered; else the
      `precision` pass over every row) get their float32 distance, the same
      _distances expression as the plain pass: the minima and the selection are the
      plain greedy's, bit for bit.
      prune=True is prune="triangle". prune="pca" (metric None only): the rows' bound
      rows w [R, 32] (coreset_pca: top principal components and the norm of the rest)
      are computed once; a step reads them and gets the float32 distance of the rows
      whose bound allows a new minimum (coreset_pca.open_rows, with float32 margins):
      gathered when at most _capacity(R), else the `precision` pass over every row.
      After a step that had too many open rows the next 1, 2, 4, .. _PCA_BACKOFF steps
      (doubling while it repeats, reset by a step that gathers) skip the bound and take
      the plain pass, so on rows the bound cannot prune (isotropic) few steps pay it.
    with_counts: also return the open rows of each step (prune only).

  Returns:
    [size] int32 global indices in selection order (the same on every device); with
    with_counts, also [size] int32: this device's open rows at each step (entry 0 is
    0; at step i, those of the update by the (i - 1)-th selected row; -1: a step of
    prune="pca" that skipped the bound).
  """
  num, dim = x.shape
  iota = lax.iota(jnp.int32, num)
  capacity = _capacity(num)
  prune = {False: None, True: "triangle"}.get(prune, prune)

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
  counts = jnp.zeros((size,), jnp.int32)

  if precision == "bf16":
    low, error = _bf16_rows(x)

  def gathered(mins, open_rows, center):
    """(mins with the float32 distances of the open rows (at most `capacity`) taken in,
    [capacity] those rows (num beyond their count), their distances)."""
    at = jnp.nonzero(open_rows, size=capacity, fill_value=num)[0]
    dist = _distances(x[jnp.minimum(at, num - 1)], center, None)
    return mins.at[at].min(dist, mode="drop"), at, dist

  def update_mins(mins, center):
    if precision != "bf16":
      return jnp.minimum(mins, _distances(x, center, metric))
    # Rows whose lower bound reaches their minimum keep it (d >= bound >= min).
    open_rows = _lower_bounds(low, error, center) < mins
    count = jnp.sum(open_rows.astype(jnp.int32))
    return lax.cond(count <= capacity, lambda m: gathered(m, open_rows, center)[0],
                    lambda m: jnp.minimum(m, _distances(x, center, None)), mins)

  if prune == "triangle":  # state: (the selected rows [size, d], assign [R]).
    # Every row's minimum comes from centers[0].
    state = (jnp.zeros((size, dim), jnp.float32).at[0].set(center),
             jnp.zeros((num,), jnp.int32))
  elif prune == "pca":  # state: (steps left that skip the bound, the next skip).
    space = coreset_pca.basis(x, valid, axis)
    bound_rows = coreset_pca.project(space, x)
    state = (jnp.int32(0), jnp.int32(1))
  else:
    state = None

  def update_pca(mins, state, center):
    """(mins, state, open rows or -1) after taking in center (prune="pca")."""
    def bound(mins, state):
      open_rows = coreset_pca.open_rows(space, bound_rows, center, mins)
      count = jnp.sum(open_rows.astype(jnp.int32))
      few = count <= capacity
      mins = lax.cond(few, lambda m: gathered(m, open_rows, center)[0],
                      lambda m: update_mins(m, center), mins)
      backoff = state[1]
      return mins, (jnp.where(few, 0, backoff),
                    jnp.where(few, 1, jnp.minimum(2 * backoff, _PCA_BACKOFF))), count

    def plain(mins, state):
      return update_mins(mins, center), (state[0] - 1, state[1]), jnp.int32(-1)

    return lax.cond(state[0] > 0, plain, bound, mins, state)

  def update(i, mins, state, center):
    """(mins, state, open rows) after taking in center, the (i - 1)-th selected row."""
    if prune is None:
      return update_mins(mins, center), state, jnp.int32(0)
    if prune == "pca":
      return update_pca(mins, state, center)
    k = i - 1
    centers, assign = state
    # |a - c|^2 for every selected row a (the rows beyond k are zeros, never assigned).
    between = _distances(centers, center, None)
    open_rows = _prune_open(between[assign], mins, dim)
    count = jnp.sum(open_rows.astype(jnp.int32))

    def few(mins, assign):
      new, at, dist = gathered(mins, open_rows, center)
      closer = dist < mins[jnp.minimum(at, num - 1)]
      old = assign[jnp.minimum(at, num - 1)]
      return new, assign.at[at].set(jnp.where(closer, k, old), mode="drop")

    def every(mins, assign):
      new = update_mins(mins, center)
      return new, jnp.where(new < mins, k, assign)

    mins, assign = lax.cond(count <= capacity, few, every, mins, assign)
    return mins, (centers, assign), count

  def step(i, carry):
    mins, state, selected, counts, center = carry
    mins, state, count = update(i, mins, state, center)
    best = jnp.max(mins)
    local = jnp.min(jnp.where(mins == best, iota, num))  # Lowest row holding the max.
    local = jnp.minimum(local, num - 1)
    index, center = local + first_row, x[local]
    if axis is not None:
      bests = lax.all_gather(best, axis)
      indices = lax.all_gather(index, axis)
      centers_all = lax.all_gather(center, axis)
      winner = jnp.argmax(bests)  # First maximum: the lowest shard, so the lowest index.
      index, center = indices[winner], centers_all[winner]
    if prune == "triangle":
      state = (state[0].at[i].set(center), state[1])
    if with_counts:
      counts = counts.at[i].set(count)
    return mark_selected(mins, index), state, selected.at[i].set(index), counts, center

  init = (mins, state, selected, counts if with_counts else None, center)
  out = lax.fori_loop(1, size, step, init)
  return (out[2], out[3]) if with_counts else out[2]


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


_STATIC = ("size", "projection_dim", "impl", "precision", "prune", "with_counts")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _coreset_jit(features: Array, key_data: Array, start: Array, metric=None, *, size: int,
                 projection_dim: int | None, impl: str, precision: str = "float32",
                 prune: bool | str = False, with_counts: bool = False) -> Array:
  x, exact = _search_rows(features, metric)
  projection = _projection(key_data, impl, x.shape[1], projection_dim)
  return _greedy(_project(x, projection), None, start, size, jnp.int32(0), None, exact,
                 precision, prune, with_counts)


@functools.partial(jax.jit, static_argnames=_STATIC[:5])
def _sharded_coreset_jit(gallery: sharding.ShardedGallery, key_data: Array, start: Array,
                         metric=None, *, size: int, projection_dim: int | None,
                         impl: str, precision: str = "float32",
                         prune: bool | str = False) -> Array:
  axis, shard_rows = gallery.axis, gallery.shard_rows
  dim = _search_dim(metric, gallery.data.shape[1])
  projection = _projection(key_data, impl, dim, projection_dim)

  def local(block, valid, metric, proj, first):
    first_row = (lax.axis_index(axis) * shard_rows).astype(jnp.int32)
    x, exact = _search_rows(block, metric)
    return _greedy(_project(x, proj), valid, first, size, first_row, axis, exact, precision,
                   prune)

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
            metric=None, precision: str = "float32", prune: bool | str = "auto") -> Array:
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
    prune: how a greedy step skips rows whose running minimum cannot drop; whichever,
      the selection is the plain greedy's, bit for bit ("Coreset pruning" and "Coreset
      pruning by principal components" in BENCHMARKS.md):
      "auto" (default): "pca" on rows searched as squared L2 (no kernel, or an L2
        kernel) of d <= 1024 values (projected, or prepared) when size >= 4 d (its
        basis costs about 10-15 steps' time), else False.
      "pca": a lower bound of each row's distance to the new point from 32 values per
        row (its top 31 principal components, from the rows' covariance, and the norm
        of the rest; coreset_pca, with float32 rounding margins): a step reads these
        [N, 32] values, a quarter of 128 projected values, and gets the float32
        distance only of the rows whose bound allows a new minimum (at most max(256,
        N / 32) per device, gathered, else every row). After a step with more open
        rows the next 1, 2, 4, .., 64 steps skip the bound. It costs the covariance and
        its eigenvectors once and 32 float32 per row. 2.6-4.6x faster than False on
        the built-in benchmark's PatchCore features (textures and objects), 0.96-1.04x
        on N(0, 1) rows, which it cannot prune.
      True or "triangle": the triangle inequality (_greedy; as in accelerated k-means):
        a row keeps its minimum when the new point is at least twice as far from the
        selected point that gave it (with float32 margins). It costs an int32 per row
        and a [size, d] copy of the selected (projected) rows. 4.5-6x faster on object
        images' patch features, 0.87x on textures and N(0, 1) rows.
      False: every step computes every row's distance.
      Each composes with precision="bf16"; none with a kernel not searched as L2.

  Returns:
    [size] int32 row indices, distinct, in selection order (indices[0] == start); on
    a sharded gallery, rows of its index space, replicated on its mesh.

  Raises:
    ValueError: features not [N, D] real numbers, empty, or holding NaN / Inf; size,
      projection_dim, start, key, metric, precision or prune invalid.
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
  if not (isinstance(prune, (bool, np.bool_)) or prune in ("auto", "pca", "triangle")):
    raise ValueError(f"prune must be 'auto', 'pca', 'triangle', True or False, got "
                     f"{prune!r:.100}")
  auto, asked = isinstance(prune, str) and prune == "auto", prune
  if isinstance(prune, (bool, np.bool_)):
    prune = "triangle" if prune else None
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
      if prune and not auto:
        raise ValueError(f"prune={asked!r} needs squared L2 rows (no kernel, or an L2 "
                         f"kernel): the bounds of L2 distances, got {metric!r:.100}")
      prune, auto = None, False
    dim = _search_dim(metric, dim)
  if projection_dim is not None and projection_dim >= dim:
    projection_dim = None  # Projecting up would not reduce the work.
  projection_dim = None if projection_dim is None else int(projection_dim)
  search_dim = projection_dim or dim
  if auto:  # The basis costs about 10-15 steps: worth it over 4 d steps.
    prune = "pca" if search_dim <= coreset_pca.MAX_DIM and size >= 4 * search_dim else None
  limit = coreset_pca.MAX_DIM if prune == "pca" else _PRUNE_MAX_DIM
  if prune and search_dim > limit:
    raise ValueError(f"prune={asked!r} selects on rows of at most {limit} values (its "
                     f"rounding margins), got {search_dim}: set projection_dim")
  # The key travels as its raw data (a plain uint32 array, placeable on any mesh).
  key_data, impl = jax.random.key_data(key), str(jax.random.key_impl(key))
  static = {"size": int(size), "projection_dim": projection_dim, "impl": impl,
            "precision": precision, "prune": prune or False}
  if sharded is None:
    return _coreset_jit(features, key_data, jnp.int32(start), metric, **static)
  mesh = sharded.mesh
  metric = jax.tree.map(lambda x: sharding.place_replicated(x, mesh), metric)
  return _sharded_coreset_jit(sharded, sharding.place_replicated(key_data, mesh),
                              sharding.place_replicated(np.int32(start), mesh), metric,
                              **static)
