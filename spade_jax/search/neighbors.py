"""Exact k-nearest-neighbour search, streamed over the gallery.

`knn(queries [Q, D], gallery [M, D], k)` never forms the [Q, M] distance matrix: the
gallery is visited in chunks of C rows, each compared with Q_b queries at a time, and a
running top-k is kept, so the working set is O(Q * k + Q_b * C). Per block the kernel
is one matmul whose output is the Metric's proxy (norms folded into the embeddings),
followed by a selection that reads the block once, which keeps the search at matmul
speed:

* per-row minima of groups of 32 columns (the one pass over the block);
* k = 1: the first group holding the row minimum, then an argmin over its 32 entries
  (an argmin over the whole block is a variadic reduce, ~15x slower on CPU);
* k > 1: the k groups with the smallest minima hold the row's k smallest entries, so
  lax.top_k only ranks those k * 32 gathered entries.

Ties are broken by the lower gallery index everywhere (candidates are kept sorted by
(value, index)), so results are deterministic. The selected neighbours' distances are
then recomputed with the Metric's exact direct form and re-sorted, because the matmul
proxy cancels for near-duplicates.

On CPU (kernel="auto", the default) the same search runs in spade_jax's CPU kernel
(cpu_kernel.py): one custom call per gallery (local_knn) or per gathered chunk
(stream_topk) does the blocking, a BLAS sgemm per core and the selection in C++, with
the same tie rule, because XLA:CPU's matmul is about 40% slower than BLAS. Only the
rounding of the proxies differs; the exact recompute below is shared.

Translation-invariant metrics (L2, sqeuclidean) are searched translated by the mean
of the queries when the features share a large common offset (`search_center`):
|g|^2 - 2 q.g then cancels (N(0, 1) + 1e3 in D = 16 returned wrong neighbours), while
(q - c, g - c) keeps the proxies' rounding relative to the data's spread. The
translation costs O((Q + M) D) next to the search's O(Q M D).

On other platforms the blocking and selection follow blocking.BLOCKINGS (larger blocks,
lax.top_k on GPUs); precision="bf16" ranks by bf16 products, re-ranked in float32.

The building blocks are split for the sharded search (one shard = one `local_knn`
with a validity mask and an index offset; shards' candidates are combined with
`merge_topk`).

Gradients: the metric is a jit argument (a Metric has no leaves; a kernel's parameters
are traced), and the search selects under lax.stop_gradient (the neighbour indices are
constants; no tangent reaches the CPU kernel's custom call), while the selected
neighbours' distances are recomputed from the live inputs with the metric's exact form.
So jax.grad of the distances with respect to queries, gallery and kernel parameters is
that of the exact form at the chosen neighbours, on every path.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from spade_jax.search import blocking as blocks_lib
from spade_jax.search import cpu_kernel, distances
from spade_jax.search.kernels import base

Array = jax.Array
# Re-exported: the library reads them as neighbors.*.
BLOCKINGS, BLOCKING_CHOICES = blocks_lib.BLOCKINGS, blocks_lib.BLOCKING_CHOICES
default_blocks, default_query_block = blocks_lib.default_blocks, blocks_lib.default_query_block
check_search_options = blocks_lib.check_search_options
ChunkFn = Callable[[Array], tuple[Array, Array | None]]

_BIG_INDEX = np.iinfo(np.int32).max
# The selection first reduces groups of this many consecutive columns.
_GROUP = 32
# knn / stream_topk `kernel` values: "auto" uses the CPU kernel (cpu_kernel.py) on CPU
# lowerings when it is available and XLA everywhere else; "xla" always uses XLA.
KERNELS = ("auto", "xla")


# ----------------------------------------------------------------------------------
# Per-chunk selection on a proxy block.


def _lowest_index_of(block: Array, value: Array) -> Array:
  """[Q, C], [Q] -> [Q] int32: lowest column j with block[:, j] == value (a plain min
  reduction, vectorised by XLA, unlike an argmin)."""
  cols = lax.broadcasted_iota(jnp.int32, block.shape, 1)
  return jnp.min(jnp.where(block == value[:, None], cols, _BIG_INDEX), axis=1)


def _group_size(columns: int) -> int:
  """Largest power of two <= _GROUP dividing `columns` (1 if odd)."""
  g = _GROUP
  while columns % g:
    g //= 2
  return g


def _chunk_top1(block: Array) -> tuple[Array, Array]:
  """[Q, C] -> ([Q, 1] smallest values, [Q, 1] their lowest columns).

  One pass over the block: the minimum of each group of G consecutive columns
  ([Q, C / G], written once), then the first group holding the row minimum, then an
  argmin over that group's G entries, gathered from the block. A plain min-then-argmin
  would read the whole block twice (an argmin alone is a variadic reduce, slow on CPU).
  Lowest column among equal values: first group, then first entry in it.
  """
  q, c = block.shape
  g = _group_size(c)
  if g < 8:  # Odd chunk sizes: the two-pass form.
    best = jnp.min(block, axis=1)
    return best[:, None], _lowest_index_of(block, best)[:, None]
  # The barrier keeps XLA from folding min(min over groups) back into one full
  # reduction of the block (then the block would be read twice again).
  group_min = lax.optimization_barrier(jnp.min(block.reshape(q, c // g, g), axis=2))
  best = jnp.min(group_min, axis=1)
  group = _lowest_index_of(group_min, best)
  members = jnp.take_along_axis(block.reshape(q, c // g, g), group[:, None, None],
                                axis=1)[:, 0, :]
  # argmin (first occurrence) rather than "== best": exact even if a Metric's proxy
  # were not bit-reproducible between the two reads.
  return best[:, None], (group * g + jnp.argmin(members, axis=1).astype(jnp.int32))[:, None]


def _chunk_topk(block: Array, k: int) -> tuple[Array, Array]:
  """[Q, C] -> ([Q, k'], [Q, k']) smallest entries, k' = min(k, C), sorted by (value, column).

  One pass over the block computes the minima of groups of G consecutive columns. The
  k smallest entries of a row lie in its k groups with the smallest (minimum, group)
  (a group outside those has k entries before it in (value, column) order), so only
  those k * G entries are gathered and ranked.
  """
  q, c = block.shape
  k = min(k, c)
  if k == 1:
    return _chunk_top1(block)
  g = _group_size(c)
  if g < 8:  # Odd chunk sizes: rank the whole block.
    neg, idx = lax.top_k(-block, k)  # Lower index first among equal values.
    return -neg, idx.astype(jnp.int32)
  groups = block.reshape(q, c // g, g)
  group_min = lax.optimization_barrier(jnp.min(groups, axis=2))
  num_groups = min(k, c // g)
  _, chosen = lax.top_k(-group_min, num_groups)
  # Ascending group order makes candidate position order = column order, so top_k's
  # "lower position first" is "lower column first" on ties.
  chosen = jnp.sort(chosen.astype(jnp.int32), axis=1)
  members = jnp.take_along_axis(groups, chosen[:, :, None], axis=1).reshape(q, num_groups * g)
  cols = (chosen[:, :, None] * g + jnp.arange(g, dtype=jnp.int32)).reshape(q, num_groups * g)
  neg, pos = lax.top_k(-members, k)
  return -neg, jnp.take_along_axis(cols, pos, axis=1)


def _block_topk(block: Array, k: int) -> tuple[Array, Array]:
  """[Q, C] -> ([Q, k'], [Q, k']) smallest entries, k' = min(k, C), by (value, column):
  lax.top_k over the whole block (lower index first among equal values)."""
  neg, idx = lax.top_k(-block, min(k, block.shape[1]))
  return -neg, idx.astype(jnp.int32)


def merge_topk(vals_a: Array, idx_a: Array, vals_b: Array, idx_b: Array,
               k: int) -> tuple[Array, Array]:
  """Merges two candidate lists into the k best in (value, index) order.

  Args:
    vals_a, idx_a: [Q, ka] values (smaller is better) and int32 indices.
    vals_b, idx_b: [Q, kb] likewise; invalid candidates carry +inf.
    k: how many to keep, <= ka + kb.

  Returns:
    ([Q, k] values ascending, [Q, k] indices); equal values are ordered by index.
  """
  vals = jnp.concatenate([vals_a, vals_b], axis=1)
  idx = jnp.concatenate([idx_a, idx_b], axis=1)
  vals, idx = lax.sort((vals, idx), dimension=1, num_keys=2)
  return vals[:, :k], idx[:, :k]


# ----------------------------------------------------------------------------------
# Streaming over chunks.


def _pad_depth(x: Array) -> Array:
  """[N, 1] -> [N, 2] with a zero column; other depths unchanged.

  XLA rewrites a depth-1 "matmul" into a multiply fused into each consumer instead of
  materialising it; the selection reads the proxy block more than once and needs the
  same bits every time.
  """
  if x.shape[-1] == 1:
    return jnp.concatenate([x, jnp.zeros_like(x)], axis=-1)
  return x


def _blocked(num: int, block: int, fn: Callable[[Array, int], Any], state: Any) -> Any:
  """state = fn(start, size, state) over [0, num) in blocks; a static-size tail."""
  full, tail = divmod(num, block)
  if full == 1:
    state = fn(jnp.int32(0), block, state)
  elif full > 1:
    state = lax.fori_loop(0, full, lambda a, st: fn(a * block, block, st), state)
  if tail:
    state = fn(jnp.int32(full * block), tail, state)
  return state


def search_center(metric: distances.Metric, prepared_queries: Array) -> Array | None:
  """[Q, D'] -> [D'] the translation of a search, or None when the Metric is not
  translation invariant.

  The proxy |g - c|^2 - 2 (q - c).(g - c) rounds relative to |q - c| |g - c|, so c
  should be near the data, but the origin already is unless the features share a
  large common offset; and a query nearer the origin than to c would lose precision.
  So c is the queries' mean when it lies more than twice the queries' rms radius
  (sqrt of the summed variances) from the origin, and 0 (no translation: the search
  is unchanged) otherwise. The mean is at hand in every search path and the same on
  every shard of a sharded search, whose queries are replicated.

  The mean is rounded to a power-of-two grid s no finer than the queries' spread per
  coordinate, which moves it by at most s / 2 per coordinate, and keeps features that
  lie on a lattice (integers, quantised features) on a dyadic lattice, so their
  proxies stay exact and ties stay ties. A single query is its own center (exact).
  """
  if not metric.translation_invariant:
    return None
  q = prepared_queries.astype(jnp.float32)
  mean = jnp.mean(q, axis=0)
  variance = jnp.mean((q - mean) ** 2)  # Per coordinate.
  spread = jnp.sqrt(variance)
  _, exponent = jnp.frexp(spread)  # spread = m * 2^e, m in [0.5, 1).
  grid = jnp.ldexp(jnp.float32(1.0), exponent - 1)  # 2^(e-1) <= spread.
  rounded = jnp.where(spread > 0, jnp.round(mean / grid) * grid, mean)
  offset_dominates = jnp.sum(mean * mean) > 4.0 * q.shape[-1] * variance
  return jnp.where(offset_dominates, rounded, jnp.zeros_like(mean))


def embed_queries(metric: distances.Metric, prepared_queries: Array,
                  center: Array | None) -> Array:
  """[Q, D'] -> [Q, E] query embeddings of a search translated by `center` (or not)."""
  if center is None:
    return metric.embed_queries(prepared_queries)
  return metric.embed_queries(prepared_queries - center)


def stream_topk(query_embeddings: Array, chunk_fn: ChunkFn, num_chunks: int,
                chunk_size: int, k: int, metric: distances.Metric,
                carry: tuple[Array, Array] | None = None, first_index: int = 0,
                query_block: int | None = None, kernel: str = "auto",
                center: Array | None = None, selection: str = "groups",
                precision: str = "float32") -> tuple[Array, Array]:
  """Running top-k of the Metric proxy over `num_chunks` equal gallery chunks.

  Each gallery chunk is embedded once and compared with the queries `query_block`
  rows at a time, so the [query_block, C] proxy block the matmul writes is still in
  cache when the selection reads it.

  Args:
    query_embeddings: [Q, E] embed_queries(metric, prepared queries, center).
    chunk_fn: j (traced int32) -> (chunk [C, D] prepared rows, valid [C] bool or None).
      Chunk j holds gallery indices first_index + j*C ... + C-1.
    num_chunks: static number of chunks.
    chunk_size: C.
    k: neighbours to keep.
    metric: the Metric.
    carry: running ([Q, k] proxies, [Q, k] indices) from earlier chunks, or None.
    first_index: gallery index of chunk 0's first row.
    query_block: queries per proxy block of the XLA path; None = all.
    kernel: "auto" (the CPU kernel on CPU when available) or "xla" (see KERNELS).
    center: the search's translation [D'] (search_center) or None; chunk rows are
      embedded minus it.
    selection: the XLA path's per-block selection, "groups" or "top_k" (Blocking).
    precision: "float32", or "bf16" (bf16_pairwise; XLA only, the CPU kernel is float32).

  Returns:
    ([Q, k] proxies ascending, [Q, k] int32 gallery indices); slots never filled hold
    (+inf, -1).
  """
  q = query_embeddings.shape[0]
  queries = query_embeddings if precision == "bf16" else _pad_depth(query_embeddings)
  query_block = q if query_block is None else max(1, min(query_block, q))
  if carry is None:
    carry = (jnp.full((q, k), jnp.inf, jnp.float32), jnp.full((q, k), -1, jnp.int32))

  def update(rows, valid, offset, start, size, state, prepared_dim):
    """Merges chunk rows into the running top-k of queries [start, start + size)."""
    all_v, all_i = state
    best_v = lax.dynamic_slice_in_dim(all_v, start, size)
    best_i = lax.dynamic_slice_in_dim(all_i, start, size)
    q_rows = lax.dynamic_slice_in_dim(queries, start, size)
    if precision == "bf16":
      block = blocks_lib.bf16_pairwise(q_rows, rows, prepared_dim)
    else:
      block = metric.pairwise(q_rows, rows)
    if valid is not None:
      block = jnp.where(valid[None, :], block, jnp.inf)
    if selection == "top_k":
      v, i = _block_topk(block, k)
      i = jnp.where(jnp.isinf(v), -1, i + offset)
      best_v, best_i = merge_topk(best_v, best_i, v, i, k)
    elif k == 1:
      v, i = _chunk_top1(block)
      # Strict <: on a tie the earlier chunk (lower index) keeps the slot.
      take = v < best_v
      best_v, best_i = jnp.where(take, v, best_v), jnp.where(take, i + offset, best_i)
    else:
      v, i = _chunk_topk(block, k)
      i = jnp.where(jnp.isinf(v), -1, i + offset)
      best_v, best_i = merge_topk(best_v, best_i, v, i, k)
    return (lax.dynamic_update_slice_in_dim(all_v, best_v, start, 0),
            lax.dynamic_update_slice_in_dim(all_i, best_i, start, 0))

  if selection not in ("groups", "top_k"):
    raise ValueError(f"selection must be 'groups' or 'top_k', got {selection!r}")
  blocks_lib.check_precision(precision, metric)
  use_cpu_kernel = precision == "float32" and _cpu_kernel_enabled(kernel, metric)

  def body(j, state):
    rows, valid = chunk_fn(j)
    offset = first_index + j * chunk_size

    def with_xla(st):
      emb = metric.embed_gallery(rows if center is None else rows - center)
      emb = emb if precision == "bf16" else _pad_depth(emb)
      return _blocked(q, query_block, lambda start, size, s: update(
          emb, valid, offset, start, size, s, rows.shape[-1]), st)

    def with_cpu_kernel(st):
      bank, extra, shift = cpu_kernel.gallery_parts(metric, rows, center)
      return cpu_kernel.topk(query_embeddings, bank[None], extra[None],
                             jnp.zeros((1,), jnp.int32), *st,
                             valid=None if valid is None else valid[None], offset=offset,
                             center=shift)

    return cpu_or_xla(use_cpu_kernel, with_cpu_kernel, with_xla, state)

  if num_chunks == 1:
    return body(jnp.int32(0), carry)
  return lax.fori_loop(0, num_chunks, body, carry)


def _check_kernel(kernel: str) -> str:
  if kernel not in KERNELS:
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
  return kernel


def _cpu_kernel_enabled(kernel: str, metric: Any = None) -> bool:
  """Whether CPU lowerings should use the CPU kernel (see KERNELS) for `metric`: its
  proxy must be the plain matmul of the embeddings (not a kernel's elementwise
  transform of it, base.DotProductKernel)."""
  if metric is not None and not getattr(metric, "matmul_proxy", True):
    return False
  return _check_kernel(kernel) == "auto" and cpu_kernel.available()


def cpu_or_xla(use_cpu_kernel: bool, with_cpu_kernel: Callable[..., Any],
               with_xla: Callable[..., Any], *args) -> Any:
  """with_cpu_kernel(*args) where the caller is lowered for CPU and use_cpu_kernel
  holds, else with_xla(*args). Both must return the same shapes; only the branch for
  the platform being compiled for is lowered (lax.platform_dependent)."""
  if not use_cpu_kernel:
    return with_xla(*args)
  return lax.platform_dependent(*args, cpu=with_cpu_kernel, default=with_xla)


def exact_recompute(queries: Array, proxies: Array, idx: Array,
                     gather_rows: Callable[[Array], Array],
                     metric: distances.Metric) -> tuple[Array, Array]:
  """Replaces the selected proxies by exact distances and re-sorts by (distance, index).

  `queries` and `gather_rows` should be the live (differentiable) prepared rows: the
  distances returned are differentiable, the indices are constants.
  """
  proxies, idx = lax.stop_gradient((proxies, idx))
  rows = gather_rows(jnp.maximum(idx, 0))  # [Q, k, D]
  exact = jax.vmap(jax.vmap(metric.exact, (None, 0)), (0, 0))(queries, rows)
  exact = jnp.where(jnp.isinf(proxies), jnp.inf, exact.astype(jnp.float32))
  return lax.sort((exact, idx), dimension=1, num_keys=2)


def prepare_rows(metric: Any, rows: Array) -> Array:
  """metric.prepare of rows [..., D] (applied to them as [N, D] rows)."""
  return base.map_rows(metric.prepare, rows.astype(jnp.float32))


def local_knn(queries: Array, gallery: Array, k: int, metric: distances.Metric,
              chunk_size: int | None, valid: Array | None = None,
              index_offset: int | Array = 0, query_block: int | None = None,
              kernel: str = "auto", blocking: str = "cpu",
              precision: str = "float32") -> tuple[Array, Array]:
  """Exact kNN of one gallery block (not jitted; the caller's jit/vmap/shard_map wraps it).

  Args:
    queries: [Q, D] float.
    gallery: [M, D] float (one shard for a sharded search).
    k: neighbours, 1 <= k; if fewer than k valid rows exist, trailing slots are
      (+inf, -1).
    metric: the Metric.
    chunk_size: gallery rows per chunk (a last partial chunk is handled separately), or
      None: the blocking's own (chunk, query block) for these shapes (Blocking.blocks).
    valid: optional [M] bool; False rows (padding) are never returned.
    index_offset: added to the returned indices (a shard's first global row).
    query_block: queries per proxy block of the XLA path (None = all at once; ignored
      when chunk_size is None).
    kernel: "auto" or "xla" (see KERNELS).
    blocking: "auto" (BLOCKINGS' entry of the platform lowered for: lax.platform_dependent)
      or a key of BLOCKINGS for every platform; "cpu" (the default here) is the search
      before per-platform blocking. The CPU kernel (kernel="auto") is used on CPU
      lowerings by "auto" and "cpu" only.
    precision: "float32" or "bf16" (blocking.PRECISIONS): bf16 proxies pick
      blocking.bf16_shortlist(k, M) candidates, re-ranked by the exact distance.

  Returns:
    (distances [Q, k] float32 ascending, indices [Q, k] int32), ties by lower index;
    the distances are differentiable (module docstring), the indices constants.
  """
  check_search_options(blocking, precision, metric)
  m_rows = gallery.shape[0]
  search = base.frozen(metric)  # The selection: constants for differentiation.
  q = search.prepare(lax.stop_gradient(queries).astype(jnp.float32))
  g = search.prepare(lax.stop_gradient(gallery).astype(jnp.float32))
  center = search_center(search, q)
  q_emb = embed_queries(search, q, center)
  k_search = blocks_lib.bf16_shortlist(k, m_rows) if precision == "bf16" else k

  def xla_search(blocks: blocks_lib.Blocking) -> Callable[[], tuple[Array, Array]]:
    if chunk_size is None:
      chunk, q_block = blocks.blocks(q.shape[0], m_rows)
    else:
      chunk, q_block = min(chunk_size, m_rows), query_block
    num_full, tail = divmod(m_rows, chunk)
    options = {"query_block": q_block, "kernel": "xla", "center": center,
               "selection": blocks.selection, "precision": precision}

    def with_xla():
      def full_chunk(j):
        start = j * chunk
        rows = lax.dynamic_slice_in_dim(g, start, chunk)
        ok = None if valid is None else lax.dynamic_slice_in_dim(valid, start, chunk)
        return rows, ok

      proxies, idx = stream_topk(q_emb, full_chunk, num_full, chunk, k_search, search,
                                 **options)
      if tail:
        # The tail is one more (smaller, static-shape) chunk: nothing is dropped and no
        # padded copy of the gallery is made.
        start = num_full * chunk
        tail_valid = None if valid is None else valid[start:]
        proxies, idx = stream_topk(q_emb, lambda j: (g[start:], tail_valid), 1, tail,
                                   k_search, search, carry=(proxies, idx),
                                   first_index=start, **options)
      return proxies, idx

    return with_xla

  def with_cpu_kernel():
    # One call for the whole gallery, read in place (the kernel blocks it itself).
    bank, extra, shift = cpu_kernel.gallery_parts(search, g, center)
    empty = (jnp.full((q.shape[0], k), jnp.inf, jnp.float32),
             jnp.full((q.shape[0], k), -1, jnp.int32))
    return cpu_kernel.topk(q_emb, bank[None], extra[None], jnp.zeros((1,), jnp.int32),
                           *empty, valid=None if valid is None else valid[None],
                           center=shift)

  use_cpu_kernel = precision == "float32" and _cpu_kernel_enabled(kernel, metric)
  if blocking == "auto":
    on_cpu = with_cpu_kernel if use_cpu_kernel else xla_search(BLOCKINGS["cpu"])
    on_gpu = xla_search(BLOCKINGS["gpu"])
    proxies, idx = lax.platform_dependent(cpu=on_cpu, cuda=on_gpu, rocm=on_gpu,
                                          tpu=xla_search(BLOCKINGS["tpu"]),
                                          default=xla_search(BLOCKINGS["cpu"]))
  elif blocking == "cpu":
    proxies, idx = cpu_or_xla(use_cpu_kernel, with_cpu_kernel, xla_search(BLOCKINGS["cpu"]))
  else:
    proxies, idx = xla_search(BLOCKINGS[blocking])()
  live_queries = metric.prepare(queries.astype(jnp.float32))
  dist, idx = exact_recompute(live_queries, proxies, idx,
                              lambda i: prepare_rows(metric, gallery[i]), metric)
  dist, idx = dist[:, :k], idx[:, :k]
  idx = jnp.where(idx >= 0, idx + index_offset, -1)
  return dist, idx.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("k", "chunk_size", "query_block", "kernel",
                                             "blocking", "precision"))
def _knn_jit(queries: Array, gallery: Array, metric: Any, *, k: int, chunk_size: int | None,
             query_block: int | None, kernel: str, blocking: str,
             precision: str) -> tuple[Array, Array]:
  return local_knn(queries, gallery, k, metric, chunk_size, query_block=query_block,
                   kernel=kernel, blocking=blocking, precision=precision)


@jax.jit
def _max_abs(x: Array) -> Array:
  """max |x| as float32; NaN if x holds a NaN, inf if it holds an inf."""
  return jnp.max(jnp.abs(x.astype(jnp.float32)))


def max_feature_magnitude(dim: int) -> float:
  """Largest |value| for which no float32 distance of D = dim features can overflow:
  sum_d (x_d - y_d)^2 <= dim * (2 * max|x|)^2 must stay below float32's maximum."""
  return float(np.sqrt(np.finfo(np.float32).max / (4.0 * max(int(dim), 1))))


def check_finite(name: str, x) -> None:
  """Raises ValueError if concrete `x` [..., D] holds NaN/Inf, or values so large that
  squared distances overflow float32 (max_feature_magnitude(D)); one device reduction.

  Skipped for tracers (inside the caller's jit/vmap the values are unknown).
  """
  if isinstance(x, jax.core.Tracer) or not x.size:
    return
  if isinstance(x, np.ndarray):
    with np.errstate(invalid="ignore", over="ignore"):
      peak = float(np.max(np.abs(x.astype(np.float32))))
  else:
    peak = float(_max_abs(x))
  if not np.isfinite(peak):
    raise ValueError(f"{name} contains NaN or Inf")
  limit = max_feature_magnitude(x.shape[-1])
  if peak > limit:
    raise ValueError(
        f"{name} holds values up to {peak:.3g}: squared distances of {x.shape[-1]}-d "
        f"features that large overflow float32 (limit {limit:.3g} = "
        f"sqrt(float32 max / (4 D))); rescale the features")


def check_real(name: str, x) -> None:
  """Raises ValueError unless `x` holds real numbers (float, int): a complex array would
  lose its imaginary part in the float32 search, silently."""
  dtype = getattr(x, "dtype", None)
  if dtype is None:
    return
  dtype = np.dtype(dtype)
  if not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)):
    raise ValueError(f"{name} must hold real numbers (float or int), got dtype {dtype}")


def validate_knn_args(queries, gallery, k: int, *, queries_name: str = "queries",
                      gallery_name: str = "gallery") -> None:
  """Shape/k checks shared by knn and the scoring functions (Python, before tracing)."""
  if np.ndim(queries) != 2:
    raise ValueError(f"{queries_name} must be [Q, D], got shape {np.shape(queries)}")
  if np.ndim(gallery) != 2:
    raise ValueError(f"{gallery_name} must be [M, D], got shape {np.shape(gallery)}")
  check_real(queries_name, queries)
  check_real(gallery_name, gallery)
  if gallery.shape[0] == 0:
    raise ValueError(f"{gallery_name} is empty (0 rows); need at least k={k} rows")
  if queries.shape[1] != gallery.shape[1]:
    raise ValueError(f"feature size mismatch: {queries_name} has D={queries.shape[1]}, "
                     f"{gallery_name} has D={gallery.shape[1]}")
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
    raise ValueError(f"k must be an int, got {k!r}")
  if not 1 <= k <= gallery.shape[0]:
    raise ValueError(f"k must be in [1, {gallery.shape[0]}] (the {gallery_name} size), "
                     f"got k={k}")


def resolve_metric(metric: Any, dim: int, *, name: str = "metric",
                   check_finite_inputs: bool = True) -> Any:
  """A name, Metric or kernel -> the Metric or kernel (Python, before tracing).

  Raises:
    ValueError: unknown name; a kernel for features of another size than `dim`, or
      (check_finite_inputs) with NaN/Inf parameters.
  """
  m = distances.get_metric(metric)
  if base.is_kernel(m):
    expected = m.input_dim
    if expected is not None and expected != dim:
      raise ValueError(f"{name} {m!r} takes {expected}-d features, got {dim}-d ones")
    if check_finite_inputs and not base.leaves_finite(m):
      raise ValueError(f"{name} {m!r} has NaN or Inf parameters")
  return m


def _positive_int_or_none(name: str, value) -> None:
  if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                            or value < 1):
    raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def knn(queries: Array, gallery: Array, k: int, metric: str | distances.Metric = "l2", *,
        chunk_size: int | None = None, query_block: int | None = None,
        check_finite_inputs: bool = True, kernel: str = "auto", blocking: str = "auto",
        precision: str = "float32") -> tuple[Array, Array]:
  """spade_jax.knn on a gallery held by one device (validated here); see api.knn."""
  validate_knn_args(queries, gallery, k)
  m = resolve_metric(metric, gallery.shape[1], check_finite_inputs=check_finite_inputs)
  _check_kernel(kernel)
  check_search_options(blocking, precision, m)
  _positive_int_or_none("chunk_size", chunk_size)
  _positive_int_or_none("query_block", query_block)
  chunk_size, query_block = blocks_lib.explicit_blocks(queries.shape[0], gallery.shape[0],
                                                       chunk_size, query_block)
  if check_finite_inputs:
    check_finite("queries", queries)
    check_finite("gallery", gallery)
  return _knn_jit(queries, gallery, m, k=int(k), chunk_size=chunk_size,
                  query_block=query_block, kernel=kernel, blocking=blocking,
                  precision=precision)
