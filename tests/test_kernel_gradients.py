"""Gradients of knn distances and of image / pixel scores with respect to queries,
gallery and kernel parameters: finite differences (jax.test_util.check_grads) and
analytic forms, on the CPU-kernel path, the XLA path and sharded galleries.

The neighbour indices are constants: where the selection could change under a
perturbation (finite differences), every row is selected (k = M, kappa = all
positions) so the function is smooth; the analytic tests use k < M and check that
only the selected neighbours receive gradient.
"""

import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

import spade_jax
from spade_jax import kernels

NAMES = ["l2", "mahalanobis", "linear", "rbf", "laplacian", "polynomial", "rff", "nystrom"]
FD = {"order": 1, "modes": ("fwd", "rev"), "eps": 1e-2, "atol": 2e-2, "rtol": 2e-2}


def _data(seed=0, m=10, q=4, d=3):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(1.5 * rng.standard_normal((q, d)), jnp.float32),
          jnp.asarray(1.5 * rng.standard_normal((m, d)), jnp.float32))


def _kernel(name, gallery):
  if name == "l2":
    return None
  options = {"rff": {"num_features": 64}, "nystrom": {"num_landmarks": 6}}.get(name, {})
  return kernels.from_features(name, np.asarray(gallery), key=jax.random.key(1), **options)


@pytest.mark.parametrize("name", NAMES)
def test_knn_gradients_match_finite_differences(name, search_path):
  del search_path  # CPU kernel and XLA paths.
  queries, gallery = _data()
  kernel = _kernel(name, gallery)

  if kernel is None:
    f = lambda q, g: jnp.sum(spade_jax.knn(q, g, 10, "l2")[0] ** 2)
    check_grads(f, (queries, gallery), **FD)
  else:
    f = lambda q, g, k: jnp.sum(spade_jax.knn(q, g, 10, k)[0] ** 2)
    check_grads(f, (queries, gallery, kernel), **FD)


def _selected_grads(queries, gallery, k, metric):
  """jax.grad of the sum of the k nearest distances w.r.t. queries and gallery."""
  return jax.grad(lambda q, g: jnp.sum(spade_jax.knn(q, g, k, metric)[0]),
                  argnums=(0, 1))(queries, gallery)


def test_knn_gradient_is_the_analytic_one(search_path):
  # sum of the k nearest distances: d/dq = sum_j Sigma^-1 (q - g_j) / (h^2 d_j) over the
  # selected j only, d/dg_j = -the same term; Sigma = I, h = 1 for L2.
  del search_path
  queries, gallery = _data(1, m=30)
  mahalanobis = kernels.mahalanobis(np.asarray(gallery), bandwidth=1.7)
  for metric, precision in (("l2", np.eye(3)),
                            (mahalanobis, np.linalg.inv(np.asarray(mahalanobis.covariance(),
                                                                   np.float64)))):
    dist, idx = spade_jax.knn(queries, gallery, 4, metric)
    g_q, g_g = _selected_grads(queries, gallery, 4, metric)
    want_q = np.zeros(queries.shape)
    want_g = np.zeros(gallery.shape)
    q64, g64 = np.asarray(queries, np.float64), np.asarray(gallery, np.float64)
    for r in range(queries.shape[0]):
      for j, d in zip(np.asarray(idx[r]), np.asarray(dist[r], np.float64)):
        term = precision @ (q64[r] - g64[j]) / d
        want_q[r] += term
        want_g[j] -= term
    np.testing.assert_allclose(g_q, want_q, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(g_g, want_g, rtol=1e-3, atol=1e-5)
    unselected = np.setdiff1d(np.arange(30), np.asarray(idx).ravel())
    assert np.all(np.asarray(g_g)[unselected] == 0)


def test_bandwidth_gradient_is_the_analytic_one(search_path):
  # RBF: d_k = sqrt(2 - 2 exp(-u)), u = r^2 / (2 h^2): d d_k / d log h = -2 u exp(-u) / d_k.
  del search_path
  queries, gallery = _data(2, m=25)
  kernel = kernels.rbf(1.3)
  dist, idx = spade_jax.knn(queries, gallery, 3, kernel)
  grad = jax.grad(lambda k: jnp.sum(spade_jax.knn(queries, gallery, 3, k)[0]))(kernel)
  q64, g64 = np.asarray(queries, np.float64), np.asarray(gallery, np.float64)
  r2 = ((q64[:, None] - g64[np.asarray(idx)]) ** 2).sum(-1)
  u = r2 / (2 * 1.3**2)
  want = np.sum(-2 * u * np.exp(-u) / np.asarray(dist, np.float64))
  np.testing.assert_allclose(grad.log_bandwidth, want, rtol=1e-4)


@pytest.mark.parametrize("name", ["l2", "mahalanobis", "polynomial", "nystrom"])
def test_sharded_knn_gradients_equal_single_device(name):
  queries, gallery = _data(3, m=13)
  kernel = _kernel(name, gallery) if name != "l2" else "l2"
  mesh = jax.make_mesh((8,), ("data",))

  def f(q, g, k):
    return jnp.sum(spade_jax.knn(q, g, 5, k, check_finite_inputs=False)[0] ** 2)

  argnums = (0, 1) if name == "l2" else (0, 1, 2)
  single = jax.grad(f, argnums=argnums)(queries, gallery, kernel)
  sharded_gallery = spade_jax.shard_gallery(gallery, mesh)
  with jax.set_mesh(mesh):
    sharded = jax.grad(f, argnums=argnums, allow_int=True)(queries, sharded_gallery, kernel)
  np.testing.assert_allclose(sharded[0], single[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(sharded[1].data)[:13], single[1], rtol=1e-5,
                             atol=1e-6)
  if name != "l2":  # (Mahalanobis' center has gradient 0, up to rounding.)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5),
                 sharded[2], single[2])


@pytest.mark.parametrize("mode", ["mean", "softmin", "kde"])
def test_image_score_gradients(mode, search_path):
  del search_path
  test, train = _data(4, m=8, q=3, d=4)
  kernel = kernels.mahalanobis(np.asarray(train), shrinkage=0.3)
  h = None if mode == "mean" else 0.7

  def f(t, g, k, bandwidth):
    scores, _ = spade_jax.image_scores(t, g, 8, k, aggregate=mode,
                                       bandwidth=None if h is None else bandwidth)
    return jnp.sum(scores)

  check_grads(lambda t, g, k: f(t, g, k, h), (test, train, kernel), **FD)
  if h is not None:
    check_grads(lambda b: f(test, train, kernel, b), (jnp.float32(h),), **FD)


def _pyramid(seed, n):
  rng = np.random.default_rng(seed)
  return {"a": jnp.asarray(rng.standard_normal((n, 2, 2, 3)), jnp.float32),
          "b": jnp.asarray(rng.standard_normal((n, 1, 1, 2)), jnp.float32)}


@pytest.mark.parametrize("combine", ["ensemble", "cat"])
def test_pixel_score_gradients(combine, search_path):
  del search_path
  test, train = _pyramid(5, 2), _pyramid(6, 4)
  nbrs = np.array([[0, 2], [3, 1]], np.int32)
  if combine == "ensemble":  # kappa = 2 = every position of the 1x1 level's gallery.
    metric = {"a": kernels.mahalanobis(np.asarray(train["a"]), shrinkage=0.4),
              "b": kernels.rbf(1.5)}
  else:
    metric = kernels.polynomial(2, gamma=0.3)

  def f(t, g, k):
    maps = spade_jax.pixel_scores(t, g, nbrs, kappa=2, combine=combine, metric=k,
                                  aggregate="softmin", bandwidth=0.5,
                                  check_finite_inputs=False)
    return jnp.sum(maps * jnp.arange(1.0, 5.0).reshape(2, 2))

  check_grads(f, (test, train, metric), **FD)


def test_sharded_pixel_score_gradients_equal_single_device():
  test, train = _pyramid(7, 3), _pyramid(8, 11)
  nbrs = np.array([[0, 5, 9], [10, 2, 4], [7, 8, 1]], np.int32)
  metric = {"a": kernels.mahalanobis(np.asarray(train["a"])), "b": kernels.rbf(1.0)}
  mesh = jax.make_mesh((4, 2), ("data", "batch"))

  def f(t, g, k):
    return jnp.sum(spade_jax.pixel_scores(t, g, nbrs, kappa=2, metric=k,
                                          check_finite_inputs=False) ** 2)

  single = jax.grad(f, argnums=(0, 1, 2))(test, train, metric)
  with jax.set_mesh(mesh):
    sharded = jax.grad(f, argnums=(0, 1, 2), allow_int=True)(
        test, spade_jax.shard_gallery(train, mesh), metric)
  for level in train:
    np.testing.assert_allclose(sharded[0][level], single[0][level], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(sharded[1][level].data)[:11], single[1][level],
                               rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               sharded[2], single[2])
  assert float(jnp.abs(single[2]["a"].shrinkage_logit)) > 0  # A real gradient.
