"""SPADE scores on one device: image-level kNN (DN2), pixel-level pyramid correspondence.

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

The distances to the k (kappa) nearest become a score by aggregate.py: SPADE's mean,
or a soft minimum / truncated kernel density with a bandwidth. The metric of each
search is a jit argument: a Metric, or a kernel whose parameters are traced (one per
level in "ensemble", since levels differ in size). A kernel that transforms rows
(Mahalanobis, explicit feature maps) transforms the training features once per call
("ensemble"), not once per test image (`prepare_levels`).

These are the jit-compiled kernels; the public functions (validation, and the choice
between this module and the sharded one, sharded.py) are in api.py.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp

from spade_jax.scoring import aggregate as aggregate_lib
from spade_jax.scoring import anomaly_map
from spade_jax.search import cpu_kernel, distances, neighbors
from spade_jax.search.kernels import base

Array = jax.Array
COMBINE_MODES = ("ensemble", "cat")


# ----------------------------------------------------------------------------------
# Image-level scores.


@functools.partial(jax.jit, static_argnames=("k", "num_neighbors", "aggregate", "chunk_size",
                                             "query_block"))
def image_scores_jit(test_pool, train_pool, metric, bandwidth, *, k, num_neighbors,
                      aggregate, chunk_size, query_block):
  dist, idx = neighbors.local_knn(test_pool, train_pool, max(k, num_neighbors), metric,
                                  chunk_size, query_block=query_block)
  return aggregate_lib.aggregate(dist[:, :k], aggregate, bandwidth), idx[:, :num_neighbors]


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
  return neighbors._cpu_kernel_enabled("auto", metric) and cpu_kernel.can_search_bank(  # pylint: disable=protected-access
      metric, bank)


def _stream_images(queries: Array, nbrs: Array, rows_of, rows_at, positions: int,
                   images_per_chunk: int, kappa: int, metric: distances.Metric,
                   reduce: Callable[[Array], Array], query_block: int | None = None,
                   bank: Array | None = None, blocking: str = "cpu",
                   fixed_chunks: bool = True) -> Array:
  """Score of each query from its kappa nearest rows of the K-image gallery.

  Args:
    queries: [Q, D] raw query features.
    nbrs: [K] int32 training-image ids; gallery row r is position r % positions of
      image nbrs[r // positions].
    rows_of: images [B] -> [B * positions, D] raw gallery rows of those images.
    rows_at: (images [...], positions [...]) -> [..., D] raw rows, for the exact recompute.
    positions: gallery rows per image.
    images_per_chunk: B.
    kappa: neighbours per query.
    metric: the Metric or kernel.
    reduce: [Q, kappa] distances -> [Q] scores (aggregate.py).
    query_block: queries per proxy block.
    bank: optional [N, positions, D] with rows_of(ids) == bank[ids].reshape(-1, D);
      on CPU the kernel then reads the K images' rows in place (no gathered chunks).
    blocking: "cpu" (images_per_chunk and query_block as given, the grouped selection;
      the CPU kernel on CPU lowerings), "auto" (neighbors.BLOCKINGS' entry of the
      platform lowered for; "cpu" on CPUs) or "gpu" / "tpu" on every platform.
    fixed_chunks: with an accelerator blocking, keep images_per_chunk and query_block
      (the caller chose them) rather than the blocking's own sizes for these shapes.

  Returns:
    [Q] float32 scores; differentiable (the search selects under stop_gradient, the
    selected distances are recomputed from the live rows).
  """
  search = base.frozen(metric)
  q = search.prepare(lax.stop_gradient(queries).astype(jnp.float32))
  center = neighbors.search_center(search, q)
  q_emb = neighbors.embed_queries(search, q, center)
  num_images = nbrs.shape[0]
  b = min(images_per_chunk, num_images)

  def chunk(start, count):
    ids = lax.dynamic_slice_in_dim(nbrs, start, count)
    return search.prepare(lax.stop_gradient(rows_of(ids)).astype(jnp.float32)), None

  def chunked_with(b, query_block, selection):
    num_full, tail = divmod(num_images, b)
    options = {"query_block": query_block, "center": center, "selection": selection}

    def chunked():
      proxies, idx = neighbors.stream_topk(q_emb, lambda j: chunk(j * b, b), num_full,
                                           b * positions, kappa, search, **options)
      if tail:
        start = num_full * b
        proxies, idx = neighbors.stream_topk(q_emb, lambda j: chunk(start, tail), 1,
                                             tail * positions, kappa, search,
                                             carry=(proxies, idx),
                                             first_index=start * positions, **options)
      return proxies, idx

    return chunked

  def on_cpu():
    return neighbors.cpu_or_xla(
        bank is not None and uses_bank_kernel(metric, bank),
        lambda: cpu_kernel.search_bank(q_emb, lax.stop_gradient(bank), nbrs, kappa, search,
                                       center=center),
        chunked_with(b, query_block, "groups"))

  def accelerator(name):
    blocks = neighbors.BLOCKINGS[name]
    if fixed_chunks:
      return chunked_with(b, query_block, blocks.selection)
    rows, q_block = blocks.blocks(q.shape[0], num_images * positions)
    return chunked_with(min(num_images, max(1, round(rows / positions))), q_block,
                        blocks.selection)

  if blocking == "cpu":
    proxies, idx = on_cpu()
  elif blocking == "auto":
    on_gpu = accelerator("gpu")
    proxies, idx = lax.platform_dependent(cpu=on_cpu, cuda=on_gpu, rocm=on_gpu,
                                          tpu=accelerator("tpu"), default=on_cpu)
  else:
    proxies, idx = accelerator(blocking)()

  def gather_rows(i):
    return neighbors.prepare_rows(metric, rows_at(nbrs[i // positions], i % positions))

  live_q = metric.prepare(queries.astype(jnp.float32))
  dist, _ = neighbors.exact_recompute(live_q, proxies, idx, gather_rows, metric)
  return reduce(dist)


def pyramid_scores(test: dict[str, Array], train: dict[str, Array], nbrs: Array, *,
                   levels: tuple[str, ...], grid: tuple[int, int], combine: str,
                   images_per_chunk: tuple[int, ...], query_blocks: tuple[int, ...],
                   stream: Callable[..., Array]) -> Array:
  """Score map [H0, W0] of one test image (test[level]: [h, w, C]; nbrs: [K]).

  The combine logic of SPADE, shared by the single-device and the sharded paths;
  `stream(queries [P, C], nbrs, *, rows_of, rows_at, positions, images_per_chunk,
  query_block, bank, part) -> [P]` is the search of the positions of the K images (the
  sharded one searches only the images a device holds and merges over the mesh); `bank`
  is the level's [N, positions, C] features when rows_of gathers whole images from it
  ("ensemble") and None otherwise ("cat" builds its rows); `part` is the index of the
  level ("ensemble") or 0 ("cat"), which selects its metric and bandwidth.
  """
  if combine == "ensemble":
    maps = []
    for part, (level, b, qb) in enumerate(zip(levels, images_per_chunk, query_blocks)):
      h, w, c = test[level].shape
      feats = train[level]
      flat = feats.reshape(feats.shape[0], h * w, c)
      scores = stream(
          test[level].reshape(h * w, c), nbrs,
          rows_of=lambda ids, flat=flat, c=c: flat[ids].reshape(-1, c),
          rows_at=lambda img, pos, flat=flat: flat[img, pos],
          positions=h * w, images_per_chunk=b, query_block=qb, bank=flat, part=part)
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
                  bank=None, part=0)
  return scores.reshape(grid)


def prepare_levels(test: dict[str, Array], train: dict[str, Array], metrics: tuple[Any, ...],
                   levels: tuple[str, ...], combine: str
                   ) -> tuple[dict[str, Array], dict[str, Array], tuple[Any, ...]]:
  """("ensemble") Each level's rows transformed once by its kernel's `prepare`, and the
  kernel's PreparedView in its place, for kernels that transform rows (Mahalanobis,
  explicit feature maps): the K-image galleries of every test image are then rows of
  one transformed bank, read in place on CPU. Metrics (cosine) and "cat" (whose rows
  are built per chunk) are unchanged."""
  if combine != "ensemble":
    return test, train, metrics
  test, train, out = dict(test), dict(train), []
  for level, metric in zip(levels, metrics):
    if base.is_kernel(metric) and not metric.prepare_is_identity:
      test[level] = neighbors.prepare_rows(metric, test[level])
      train[level] = neighbors.prepare_rows(metric, train[level])
      metric = base.PreparedView(metric)
    out.append(metric)
  return test, train, tuple(out)


def reducer(aggregate: str, bandwidth: Array) -> Callable[[Array], Array]:
  """[Q, kappa] distances -> [Q] scores (aggregate.py)."""
  return functools.partial(aggregate_lib.aggregate, mode=aggregate, bandwidth=bandwidth)


def _pixel_scores_one(test: dict[str, Array], train: dict[str, Array], nbrs: Array,
                      metrics: tuple[Any, ...], bandwidths: tuple[Array, ...], *,
                      levels: tuple[str, ...], grid: tuple[int, int], kappa: int,
                      combine: str, aggregate: str, images_per_chunk: tuple[int, ...],
                      query_blocks: tuple[int, ...], blocking: str = "cpu",
                      fixed_chunks: bool = True) -> Array:
  """Score map [H0, W0] of one test image, all K images on this device."""

  def stream(queries, nbrs, *, rows_of, rows_at, positions, images_per_chunk, query_block,
             bank, part):
    return _stream_images(queries, nbrs, rows_of, rows_at, positions, images_per_chunk,
                          kappa, metrics[part], reducer(aggregate, bandwidths[part]),
                          query_block, bank, blocking, fixed_chunks)

  return pyramid_scores(test, train, nbrs, levels=levels, grid=grid, combine=combine,
                        images_per_chunk=images_per_chunk, query_blocks=query_blocks,
                        stream=stream)


@functools.partial(jax.jit, static_argnames=("levels", "grid", "kappa", "combine",
                                             "aggregate", "images_per_chunk", "query_blocks",
                                             "test_batch_size", "blocking", "fixed_chunks"))
def pixel_scores_jit(test, train, nbrs, metrics, bandwidths, *, levels, grid, kappa, combine,
                      aggregate, images_per_chunk, query_blocks, test_batch_size,
                      blocking="cpu", fixed_chunks=True):
  """metrics / bandwidths: one per level ("ensemble") or one ("cat"), as tuples;
  blocking / fixed_chunks: _stream_images'."""
  test, train, metrics = prepare_levels(test, train, metrics, levels, combine)
  one = functools.partial(_pixel_scores_one, metrics=metrics, bandwidths=bandwidths,
                          levels=levels, grid=grid, kappa=kappa, combine=combine,
                          aggregate=aggregate, images_per_chunk=images_per_chunk,
                          query_blocks=query_blocks, blocking=blocking,
                          fixed_chunks=fixed_chunks)
  return lax.map(lambda xs: one(xs[0], train, xs[1]), (test, nbrs),
                 batch_size=test_batch_size)
