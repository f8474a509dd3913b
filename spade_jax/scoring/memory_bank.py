"""PatchCore scoring against a memory bank of patch features.

With test patch features m_test [N, h, w, D] and a memory bank M [B, D] (a coreset of
the training patches, spade_jax.coreset):

* patch score: the mean distance of each test patch to its k nearest bank entries,
  s(m_test) = mean over the k nearest m in M of d(m_test, m) (PatchCore: k = 1), by
  the exact streamed kNN (spade_jax.knn: any registered metric, a bank on one device
  or sharded over a mesh); the [h, w] map of patch scores is what anomaly_maps
  upsamples and blurs;
* image score, one of three rules over the image's h w patch scores:
  - "max" (PatchCore, Eq. 6; patchcore-inspection): the largest patch score
    s* = s(m_test*), m_test* the most anomalous patch (the first one on ties);
  - "topk": the mean of the t largest patch scores (1 <= t <= h w; t = 1 is "max"),
    less sensitive to one outlying patch;
  - "reweight": s* reweighted as in PatchCore, Eq. 7:

    s = (1 - exp d(m_test*, m*) / sum over m in N_b(m*) of exp d(m_test*, m)) * s*,

  m* the nearest bank entry of m_test* and N_b(m*) its b nearest bank entries (m*
  included, found by the same kNN). The weight is computed as 1 - softmax, with the
  largest exponent subtracted (distances of hundreds would overflow exp), and is in
  [0, 1): small when m* sits among bank entries about as far from m_test* (a dense,
  ordinary region), larger when m* is isolated. This is anomalib's
  compute_anomaly_score (the official PatchCore code does not reweight); as there,
  b = 1 would give weight 0, so b >= 2.

The distances are the metric's: "l2" (anomalib's, which takes the square root),
"sqeuclidean" (patchcore-inspection's faiss IndexFlatL2 returns squared distances, for
its patch scores, image scores and maps alike), or a kernel of spade_jax.kernels (its
kernel-induced distance, e.g. Mahalanobis; a traced argument: a kernel with new
parameters does not recompile).

The distances d of the reweighting are the metric's exact form on its prepared rows
(the kNN reports its distances the same way). Bank rows are fetched with
search.rows.take_rows, so a sharded bank is never gathered whole.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from spade_jax.search import api, distances, neighbors, rows, sharding

Array = jax.Array


def reweight(nearest: Array, test_patch: Array, support: Array,
             metric: distances.Metric) -> Array:
  """PatchCore's weight 1 - exp d(m_test*, m*) / sum_{m in N_b(m*)} exp d(m_test*, m).

  Args:
    nearest: [N, D] m*, the nearest bank entry of each image's most anomalous patch.
    test_patch: [N, D] m_test*, that patch.
    support: [N, b, D] N_b(m*), the b nearest bank entries of m*.
    metric: the Metric of the distances.

  Returns:
    [N] float32 weights in [0, 1].
  """
  q = metric.prepare(test_patch.astype(jnp.float32))
  n, b, d = support.shape
  g = metric.prepare(support.reshape(n * b, d).astype(jnp.float32)).reshape(n, b, -1)
  d_star = jax.vmap(metric.exact)(q, metric.prepare(nearest.astype(jnp.float32)))
  d_support = jax.vmap(jax.vmap(metric.exact, (None, 0)))(q, g)
  peak = jnp.maximum(jnp.max(d_support, axis=1), d_star)
  ratio = jnp.exp(d_star - peak) / jnp.sum(jnp.exp(d_support - peak[:, None]), axis=1)
  return (1.0 - ratio).astype(jnp.float32)


def patchcore_scores_impl(test_patches: Array, bank: Array | sharding.ShardedGallery,
                          k: int, metric: distances.Metric,
                          reweight_neighbors: int | None,
                          topk: int | None = None) -> tuple[Array, Array]:
  """Un-jitted patchcore_scores on validated arguments (traced inside jit)."""
  n, h, w, d = test_patches.shape
  queries = test_patches.reshape(n * h * w, d).astype(jnp.float32)
  dist, idx = api.knn(queries, bank, k, metric)
  patch = jnp.mean(dist, axis=1).reshape(n, h * w)
  score_maps = patch.reshape(n, h, w)
  if topk is not None:  # The mean of the t largest patch scores.
    return jnp.mean(jax.lax.top_k(patch, topk)[0], axis=1), score_maps
  top = jnp.argmax(patch, axis=1)  # m_test*: the first most anomalous patch.
  s_star = jnp.take_along_axis(patch, top[:, None], axis=1)[:, 0]
  if reweight_neighbors is None:
    return s_star, score_maps
  images = jnp.arange(n)
  m_test = queries.reshape(n, h * w, d)[images, top]
  nearest_index = idx.reshape(n, h * w, k)[images, top, 0]
  m_star = rows.take_rows_impl(bank, nearest_index)  # [N, D]
  _, support_index = api.knn(m_star, bank, reweight_neighbors, metric)
  support = rows.take_rows_impl(bank, support_index)  # [N, b, D]
  weights = reweight(m_star, m_test, support, metric)
  return weights * s_star, score_maps


@functools.partial(jax.jit, static_argnames=("k", "reweight_neighbors", "topk"))
def _scores_jit(test_patches, bank, metric, *, k, reweight_neighbors, topk):
  return patchcore_scores_impl(test_patches, bank, k, metric, reweight_neighbors, topk)


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def patchcore_scores(test_patches: Array, bank: Array | sharding.ShardedGallery, *,
                     k: int = 1, metric: str | distances.Metric = "l2",
                     reweight_neighbors: int | None = None, topk: int | None = None,
                     check_finite_inputs: bool = True) -> tuple[Array, Array]:
  """PatchCore's image scores and patch-score maps against a memory bank.

  Args:
    test_patches: [N, h, w, D] float patch features of the test images
      (spade_jax.patch_features).
    bank: [B, D] float memory bank, or a sharded gallery of it (spade_jax.shard_gallery:
      searched where it lies; same results, replicated on its mesh).
    k: bank entries averaged into a patch score, 1 <= k <= B (PatchCore: 1).
    metric: a name in spade_jax.METRICS, a Metric, or a kernel of [D] rows
      (spade_jax.kernels).
    reweight_neighbors: b, the support size of PatchCore's reweighting of the image
      score (module docstring), 2 <= b <= B; None: no reweighting.
    topk: t, the image score is the mean of the image's t largest patch scores,
      1 <= t <= h w; None: not. With neither reweight_neighbors nor topk the image
      score is the largest patch score (at most one of them).
    check_finite_inputs: reject NaN / Inf (one device reduction per input).

  Returns:
    (image scores [N] float32, patch-score maps [N, h, w] float32).

  Raises:
    ValueError: bad shapes, k, reweight_neighbors or topk out of range, both
      reweight_neighbors and topk, unknown metric, a kernel of other rows, NaN / Inf
      inputs (or kernel parameters).
  """
  sharded = sharding.as_sharded(bank, "bank")
  bank = bank if sharded is None else sharded
  if np.ndim(test_patches) != 4 or min(np.shape(test_patches)) < 1:
    raise ValueError(f"test_patches must be a non-empty [N, h, w, D] array, got shape "
                     f"{np.shape(test_patches)}")
  if np.ndim(bank) != 2:
    raise ValueError(f"bank must be [B, D], got shape {np.shape(bank)}")
  neighbors.check_real("test_patches", test_patches)
  neighbors.check_real("bank", bank)
  size = bank.shape[0] if sharded is None else sharded.size
  if size == 0:
    raise ValueError("bank is empty (0 rows)")
  if test_patches.shape[-1] != bank.shape[1]:
    raise ValueError(f"feature size mismatch: test_patches have D={test_patches.shape[-1]}, "
                     f"bank has D={bank.shape[1]}")
  if not _is_int(k) or not 1 <= k <= size:
    raise ValueError(f"k must be an int in [1, {size}] (the bank size), got {k!r}")
  if reweight_neighbors is not None and (not _is_int(reweight_neighbors)
                                         or not 2 <= reweight_neighbors <= size):
    raise ValueError(f"reweight_neighbors must be None or an int in [2, {size}] (the bank "
                     f"size; b = 1 would weight every score by 0), got "
                     f"{reweight_neighbors!r}")
  num_patches = int(test_patches.shape[1] * test_patches.shape[2])
  if topk is not None and (not _is_int(topk) or not 1 <= topk <= num_patches):
    raise ValueError(f"topk must be None or an int in [1, {num_patches}] (the patches per "
                     f"image, h x w = {test_patches.shape[1]} x {test_patches.shape[2]}), got "
                     f"{topk!r}")
  if topk is not None and reweight_neighbors is not None:
    raise ValueError(f"topk={topk} and reweight_neighbors={reweight_neighbors} are two image "
                     "scores (the top-k mean, the reweighted maximum); pass one of them")
  m = neighbors.resolve_metric(metric, int(bank.shape[1]),
                               check_finite_inputs=check_finite_inputs)
  if check_finite_inputs:
    neighbors.check_finite("test_patches", test_patches)
    neighbors.check_finite("bank", sharding.data_of(bank))
  if sharded is not None:
    test_patches = sharding.place_replicated(test_patches, sharded.mesh)
    m = jax.tree.map(lambda x: sharding.place_replicated(x, sharded.mesh), m)
  return _scores_jit(test_patches, bank, m, k=int(k),
                     reweight_neighbors=None if reweight_neighbors is None
                     else int(reweight_neighbors), topk=None if topk is None else int(topk))
