"""Kernel-density scores (softmin, truncated KDE) and SPADE's scores with kernels:
formulas and limits vs float64 NumPy, image and pixel scores vs brute force on both
search paths, sharded == single device, and the checks made before tracing."""

import functools

import jax
import jax.numpy as jnp
import kernel_reference as reference
import numpy as np
import pytest

import spade_jax
from spade_jax import kernels, scoring
from spade_jax.scoring import aggregate

RTOL, ATOL = 2e-4, 2e-5


def test_soft_scores_match_reference():
  rng = np.random.default_rng(0)
  d = np.sort(rng.uniform(0.5, 3.0, (7, 5)), axis=1).astype(np.float32)
  for h in (0.05, 0.3, 1.0, 10.0):
    np.testing.assert_allclose(aggregate.softmin(d, h), reference.softmin(d, h), rtol=1e-5)
    np.testing.assert_allclose(aggregate.truncated_kde(d, h), reference.truncated_kde(d, h),
                               rtol=1e-5)


def test_soft_scores_tend_to_the_nearest_neighbour_distance():
  # h -> 0: SPADE's kappa = 1 score, the nearest distance; h -> inf: the mean (softmin)
  # and the root mean square (kde) of the distances.
  d = np.array([[0.7, 0.9, 1.5, 2.0], [1.0, 1.0, 1.2, 4.0]], np.float32)
  for h in (1e-2, 1e-3, 1e-4):
    np.testing.assert_allclose(aggregate.softmin(d, h), d[:, 0], atol=2 * h * np.log(4))
    np.testing.assert_allclose(aggregate.truncated_kde(d, h), d[:, 0], atol=2 * h * 1.2)
  np.testing.assert_allclose(aggregate.softmin(d, 1e5), d.mean(1), rtol=1e-4)
  np.testing.assert_allclose(aggregate.truncated_kde(d, 1e5), np.sqrt((d**2).mean(1)),
                             rtol=1e-4)
  # Monotone in h between the two limits, and never below the nearest distance.
  hs = np.geomspace(1e-3, 1e3, 25)
  soft = np.stack([aggregate.softmin(d, h) for h in hs])
  assert (np.diff(soft, axis=0) >= -1e-6).all() and (soft >= d[:, 0] - 1e-6).all()


def _kernel_distance(kernel):
  return functools.partial(reference.DISTANCES[kernel.name], kernel)


@pytest.mark.parametrize("mode,h", [("mean", None), ("softmin", 0.4), ("kde", 0.7)])
@pytest.mark.parametrize("name", ["mahalanobis", "rbf", "polynomial", "nystrom"])
def test_image_scores_with_kernels(name, mode, h, search_path):
  del search_path
  rng = np.random.default_rng(1)
  train = rng.standard_normal((40, 6)).astype(np.float32)
  test = rng.standard_normal((9, 6)).astype(np.float32)
  kernel = kernels.from_features(name, train, key=jax.random.key(0))
  scores, idx = spade_jax.image_scores(test, train, 4, kernel, num_neighbors=6,
                                       aggregate=mode, bandwidth=h)
  ref = _kernel_distance(kernel)(test, train)
  order = np.argsort(ref, axis=1, kind="stable")
  np.testing.assert_array_equal(idx, order[:, :6])
  np.testing.assert_allclose(
      scores, reference.aggregate(np.take_along_axis(ref, order[:, :4], 1), mode, h),
      rtol=RTOL, atol=ATOL)


def _pyramid(rng, n):
  return {"layer1": rng.standard_normal((n, 6, 6, 4)).astype(np.float32),
          "layer2": (2 * rng.standard_normal((n, 3, 3, 5))).astype(np.float32)}


@pytest.mark.parametrize("combine", ["ensemble", "cat"])
@pytest.mark.parametrize("mode", ["mean", "softmin", "kde"])
def test_pixel_scores_with_kernels(combine, mode, search_path):
  del search_path
  rng = np.random.default_rng(2)
  train, test = _pyramid(rng, 8), _pyramid(rng, 3)
  nbrs = np.stack([rng.permutation(8)[:4] for _ in range(3)]).astype(np.int32)
  if combine == "ensemble":  # One fitted kernel per level, and a bandwidth per level.
    metric = {"layer1": kernels.mahalanobis(train["layer1"]),
              "layer2": kernels.from_features("laplacian", train["layer2"])}
    h = {"layer1": 0.5, "layer2": 0.3} if mode != "mean" else None
    parts = list(metric.values())
    hs = [None, None] if h is None else list(h.values())
  else:  # One kernel of the concatenated levels.
    metric = kernels.polynomial(2, gamma=0.05)
    h = None if mode == "mean" else 0.5
    parts, hs = [metric], [h]
  got = scoring.pixel_scores(test, train, nbrs, kappa=3, combine=combine, metric=metric,
                             aggregate=mode, bandwidth=h, images_per_chunk=3)
  ref = reference.pixel_scores(
      test, train, nbrs, 3, combine, [_kernel_distance(k) for k in parts],
      [functools.partial(reference.aggregate, mode=mode, h=hh) for hh in hs])
  np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)


def test_sharded_scores_with_kernels_equal_single_device():
  rng = np.random.default_rng(3)
  train, test = _pyramid(rng, 13), _pyramid(rng, 3)
  pool_train = rng.standard_normal((13, 7)).astype(np.float32)
  pool_test = rng.standard_normal((3, 7)).astype(np.float32)
  fitted = kernels.for_levels("mahalanobis", {"pool": pool_train, **train})
  levels = {l: fitted[l] for l in train}
  mesh = jax.make_mesh((4, 2), ("data", "batch"))
  sharded_pool = spade_jax.shard_gallery(pool_train, mesh)
  sharded_levels = spade_jax.shard_gallery(train, mesh)
  s1, n1 = spade_jax.image_scores(pool_test, pool_train, 3, fitted["pool"], num_neighbors=5,
                                  aggregate="softmin", bandwidth=0.5)
  s2, n2 = spade_jax.image_scores(pool_test, sharded_pool, 3, fitted["pool"],
                                  num_neighbors=5, aggregate="softmin", bandwidth=0.5)
  np.testing.assert_allclose(s2, s1, rtol=1e-5)
  np.testing.assert_array_equal(n2, n1)
  for combine, metric in (("ensemble", levels), ("cat", kernels.rbf(3.0))):
    m1 = spade_jax.pixel_scores(test, train, n1, kappa=2, combine=combine, metric=metric,
                                aggregate="kde", bandwidth=0.8)
    m2 = spade_jax.pixel_scores(test, sharded_levels, n1, kappa=2, combine=combine,
                                metric=metric, aggregate="kde", bandwidth=0.8)
    np.testing.assert_allclose(m2, m1, rtol=1e-5, atol=1e-6)


def test_score_arguments_are_checked():
  rng = np.random.default_rng(4)
  train, test = _pyramid(rng, 4), _pyramid(rng, 2)
  nbrs = np.array([[0, 1], [2, 3]], np.int32)
  pool = rng.standard_normal((4, 3)).astype(np.float32)
  with pytest.raises(ValueError, match="aggregate must be one of"):
    spade_jax.image_scores(pool, pool, 2, aggregate="max")
  with pytest.raises(ValueError, match="needs a bandwidth"):
    spade_jax.image_scores(pool, pool, 2, aggregate="softmin")
  with pytest.raises(ValueError, match="only used by"):
    spade_jax.image_scores(pool, pool, 2, bandwidth=1.0)
  with pytest.raises(ValueError, match="bandwidth must be a finite number > 0"):
    spade_jax.image_scores(pool, pool, 2, aggregate="kde", bandwidth=-1.0)
  with pytest.raises(ValueError, match="pass one metric"):
    spade_jax.pixel_scores(test, train, nbrs, combine="cat",
                           metric={"layer1": "l2", "layer2": "l2"})
  with pytest.raises(ValueError, match="metric has levels"):
    spade_jax.pixel_scores(test, train, nbrs, metric={"layer1": "l2"})
  with pytest.raises(ValueError, match=r"metric\['layer2'\].*takes 4-d features, got 5-d"):
    spade_jax.pixel_scores(test, train, nbrs,
                           metric={l: kernels.mahalanobis(train["layer1"]) for l in train})


def test_bandwidth_must_be_one_positive_number():
  # A bandwidth that is not a real number > 0 is a ValueError naming it, before any
  # tracing (a dict passed to image_scores used to end in a TypeError in jnp.asarray).
  rng = np.random.default_rng(6)
  train, test = _pyramid(rng, 4), _pyramid(rng, 2)
  nbrs = np.array([[0, 1], [2, 3]], np.int32)
  pool = rng.standard_normal((4, 3)).astype(np.float32)
  for bad in ({"pool": 1.0}, {}):
    with pytest.raises(ValueError, match="bandwidth must be None or a finite number > 0"):
      spade_jax.image_scores(pool, pool, 2, aggregate="softmin", bandwidth=bad)
  for bad in ("1.0", True, [0.5], np.ones(2), 1 + 0j, object(), float("inf"), 0, None):
    match = "needs a bandwidth" if bad is None else "bandwidth must be a finite number > 0"
    with pytest.raises(ValueError, match=match):
      spade_jax.image_scores(pool, pool, 2, aggregate="kde", bandwidth=bad)
    with pytest.raises(ValueError, match=match):
      spade_jax.pixel_scores(test, train, nbrs, aggregate="kde", bandwidth=bad)
  with pytest.raises(ValueError, match=r"bandwidth\['layer2'\] must be a finite number > 0"):
    spade_jax.pixel_scores(test, train, nbrs, aggregate="kde",
                           bandwidth={"layer1": 0.5, "layer2": "0.5"})
  with pytest.raises(ValueError, match="or a dict level -> h"):
    spade_jax.pixel_scores(test, train, nbrs, aggregate="kde", bandwidth={})
  with pytest.raises(ValueError, match="bandwidth has levels"):
    spade_jax.pixel_scores(test, train, nbrs, aggregate="kde", bandwidth={"layer1": 0.5})
  with pytest.raises(ValueError, match="pass one bandwidth"):
    spade_jax.pixel_scores(test, train, nbrs, aggregate="kde", combine="cat",
                           bandwidth={"layer1": 0.5, "layer2": 0.5})
  with pytest.raises(ValueError, match=r"bandwidth must be a finite number > 0.*traced float32 "
                     r"of shape \(2,\)"):
    jax.jit(lambda h: spade_jax.image_scores(pool, pool, 2, aggregate="kde", bandwidth=h)[0])(
        jnp.ones(2))
  # The kernels' bandwidths too.
  with pytest.raises(ValueError, match="bandwidth must be a real number"):
    kernels.rbf({"pool": 1.0})
  # Every form of one number gives the reference's scores.
  dist = np.sort(np.sqrt(reference.l2_squared(pool, pool)), axis=1)[:, :2]
  for h in (0.5, np.float32(0.5), np.asarray(0.5), jnp.asarray(0.5), 1, np.int64(1)):
    scores, _ = spade_jax.image_scores(pool, pool, 2, aggregate="kde", bandwidth=h)
    np.testing.assert_allclose(scores, reference.truncated_kde(dist, float(h)), rtol=RTOL,
                               atol=ATOL)
  jitted = jax.jit(lambda h: spade_jax.image_scores(pool, pool, 2, aggregate="kde",
                                                    bandwidth=h)[0])
  np.testing.assert_allclose(jitted(0.5), reference.truncated_kde(dist, 0.5), rtol=RTOL,
                             atol=ATOL)


def test_traced_bandwidth_is_differentiable():
  # A learnable bandwidth: d score / d h of softmin = (score - weighted mean d) / h.
  rng = np.random.default_rng(5)
  train = rng.standard_normal((30, 4)).astype(np.float32)
  test = rng.standard_normal((5, 4)).astype(np.float32)
  dist, _ = spade_jax.knn(test, train, 4)
  grad = jax.grad(lambda h: jnp.sum(spade_jax.image_scores(test, train, 4, aggregate="softmin",
                                                           bandwidth=h)[0]))(0.5)
  d = np.asarray(dist, np.float64)
  w = np.exp(-(d - d[:, :1]) / 0.5)
  w /= w.sum(1, keepdims=True)
  s = reference.softmin(d, 0.5)
  np.testing.assert_allclose(grad, np.sum((s - (w * d).sum(1)) / 0.5), rtol=1e-4)
