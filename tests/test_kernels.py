"""Kernels as values: each kernel's distances vs a float64 NumPy reference of its formula,
knn with each kernel vs brute force on that distance (both search paths, sharded), no
recompilation for new parameter values, and the checks made before tracing."""

import jax
from jax import export
import jax.numpy as jnp
import kernel_reference as reference
import numpy as np
import pytest
from sklearn.covariance import LedoitWolf
import tolerances

import spade_jax
from spade_jax import kernels
from spade_jax.search import cpu_kernel, distances, neighbors

NAMES = sorted(reference.DISTANCES)


def _data(seed=0, n=120, q=9, d=6):
  rng = np.random.default_rng(seed)
  mix = rng.standard_normal((d, d)) * 0.5 + np.eye(d)
  train = (rng.standard_normal((n, d)) @ mix + 3.0).astype(np.float32)
  queries = (rng.standard_normal((q, d)) @ mix + 3.0).astype(np.float32)
  return train, queries


def _kernel(name, train):
  options = {"rff": {"num_features": 256}, "nystrom": {"num_landmarks": 40}}.get(name, {})
  return kernels.from_features(name, train, key=jax.random.key(3), **options)


def _exact(kernel, a, b):
  qa, qb = kernel.prepare(jnp.asarray(a)), kernel.prepare(jnp.asarray(b))
  return np.asarray(jax.vmap(jax.vmap(kernel.exact, (None, 0)), (0, None))(qa, qb))


@pytest.mark.parametrize("name", NAMES)
def test_distances_match_reference(name):
  train, queries = _data()
  kernel = _kernel(name, train)
  ref = reference.DISTANCES[name](kernel, queries, train)
  scale = np.max(ref)
  # Exact form (what knn reports): transformed rows in float32, then a difference.
  np.testing.assert_allclose(_exact(kernel, queries, train), ref, rtol=2e-4, atol=2e-5 * scale)
  # Matmul form (proxy -> finalize): float32 matmul accuracy.
  np.testing.assert_allclose(distances.pairwise_distances(queries, train, kernel), ref,
                             rtol=1e-3, atol=1e-3 * scale)


def test_mahalanobis_is_ledoit_wolf():
  # kernels.mahalanobis(features) with shrinkage=None is the Mahalanobis distance of
  # scikit-learn's Ledoit-Wolf covariance, for N > D and for N < D.
  for n, d in ((200, 5), (12, 30)):
    rng = np.random.default_rng(n)
    train = (rng.standard_normal((n, d)) * np.linspace(0.2, 3.0, d)).astype(np.float32)
    queries = rng.standard_normal((4, d)).astype(np.float32)
    kernel = kernels.mahalanobis(train)
    ref = reference.mahalanobis_ledoit_wolf(queries, train, train)
    np.testing.assert_allclose(_exact(kernel, queries, train), ref, rtol=5e-4)
    assert kernels.ledoit_wolf_shrinkage(train) == pytest.approx(
        float(jax.nn.sigmoid(kernel.shrinkage_logit)), rel=1e-5)


def test_mahalanobis_shrinkage_extremes():
  train, queries = _data(1, d=4)
  # shrinkage 1: the isotropic covariance mu I, i.e. L2 / sqrt(mu).
  iso = kernels.mahalanobis(train, shrinkage=1.0)
  mu = np.trace(np.cov(train.T, bias=True)) / 4
  np.testing.assert_allclose(_exact(iso, queries, train),
                             np.sqrt(reference.l2_squared(queries, train) / mu), rtol=1e-4)
  # shrinkage 0: the sample (MLE) covariance itself.
  plain = kernels.mahalanobis(train, shrinkage=0.0)
  precision = np.linalg.inv(np.cov(train.T, bias=True))
  diff = queries[:, None].astype(np.float64) - train[None]
  np.testing.assert_allclose(_exact(plain, queries, train),
                             np.sqrt(np.einsum("qmd,de,qme->qm", diff, precision, diff)),
                             rtol=2e-4)


def _shrunk_mahalanobis(queries, gallery, train, lam, h=1.0):
  """float64 reference of whitening.py's formula from the raw training rows:
  |x - y|_{Sigma^-1} / h, Sigma = (1 - lam) S + lam mu I, S the MLE covariance,
  mu = tr(S) / D, or mu = 1 when S = 0 (all training rows equal)."""
  train = np.asarray(train, np.float64)
  dim = train.shape[1]
  cov = np.cov(train.T, bias=True).reshape(dim, dim)
  mu = np.trace(cov) / dim if np.trace(cov) > 0 else 1.0
  sigma = (1 - lam) * cov + lam * mu * np.eye(dim)
  diff = np.asarray(queries, np.float64)[:, None] - np.asarray(gallery, np.float64)[None]
  return np.sqrt(np.einsum("qmd,qmd->qm", diff, np.linalg.solve(sigma, diff[..., None])[
      ..., 0])) / h


@pytest.mark.parametrize("n,d", [(5, 8), (20, 4)])  # N <= D (Gram path) and N > D.
def test_mahalanobis_of_constant_features_is_scaled_l2(n, d):
  # All training rows equal (S = 0, e.g. all-black images): Sigma = lambda I with mu = 1,
  # lambda = 1 by default, so d = |x - y| / (h sqrt(lambda)): L2's / h. Rows equal up to
  # a float32 ulp count as equal (a spread float32 cannot resolve).
  rng = np.random.default_rng(d)
  row = rng.standard_normal(d).astype(np.float32)
  queries = rng.standard_normal((4, d)).astype(np.float32)
  ulp = np.tile(row, (n, 1))
  ulp[1] = np.nextafter(ulp[1], np.float32(np.inf))
  for train in (np.zeros((n, d), np.float32), np.tile(row, (n, 1)), ulp):
    l2 = np.linalg.norm(queries[:, None].astype(np.float64) - train[None], axis=-1)
    kernel = kernels.mahalanobis(train)
    assert kernel.eigvecs.shape == (d, 0) and float(kernel.shrinkage) == 1.0
    equal = train[:1].repeat(2, 0)  # What the formula sees: S = 0 (ulps included).
    np.testing.assert_allclose(_exact(kernel, queries, train),
                               _shrunk_mahalanobis(queries, train, equal, 1.0), rtol=1e-5)
    np.testing.assert_allclose(_exact(kernel, queries, train), l2, rtol=1e-5)
    dist, _ = spade_jax.knn(queries, train, 2, kernel)
    np.testing.assert_allclose(dist, np.sort(l2, axis=1)[:, :2], rtol=1e-5)
    scores, _ = spade_jax.image_scores(queries, train, 2, kernel)
    np.testing.assert_allclose(scores, l2.mean(1), rtol=1e-5)
    # An explicit shrinkage and bandwidth: |x - y| / (h sqrt(lambda)).
    scaled = kernels.mahalanobis(train, shrinkage=0.25, bandwidth=2.0)
    np.testing.assert_allclose(_exact(scaled, queries, train), l2 / (2.0 * 0.5), rtol=1e-5)
    np.testing.assert_allclose(
        _exact(scaled, queries, train),
        _shrunk_mahalanobis(queries, train, equal, 0.25, h=2.0), rtol=1e-5)
    with pytest.raises(ValueError, match="shrinkage=0 needs a covariance of full rank"):
      kernels.mahalanobis(train, shrinkage=0.0)
  assert kernels.ledoit_wolf_shrinkage(np.tile(row, (n, 1))) == 0.0


def test_mahalanobis_of_rank_deficient_features_matches_its_formula():
  rng = np.random.default_rng(3)
  queries = rng.standard_normal((5, 6)).astype(np.float32)
  wide = rng.standard_normal((4, 6))  # N < D: rank 3.
  tall = rng.standard_normal((40, 6))  # N > D, a dead channel, a constant one, a copy.
  tall[:, 1], tall[:, 2], tall[:, 4] = 0.0, 3.0, tall[:, 0]
  for train in (wide.astype(np.float32), tall.astype(np.float32)):
    for shrinkage in (None, 0.3):
      kernel = kernels.mahalanobis(train, shrinkage=shrinkage)
      assert not kernel.complete
      lam = LedoitWolf().fit(train.astype(np.float64)).shrinkage_ if shrinkage is None \
          else shrinkage
      assert float(kernel.shrinkage) == pytest.approx(lam, rel=1e-5)
      got = _exact(kernel, queries, train)
      assert np.isfinite(got).all()
      np.testing.assert_allclose(got, _shrunk_mahalanobis(queries, train, train, lam),
                                 rtol=5e-4)
  # 2 rows: Ledoit-Wolf's estimate is 0 (the centred outer products are equal) and S has
  # rank 1: lambda is the smallest logit's, sigmoid(-30), not an error. S = u u^T with
  # u = (x_1 - x_2) / 2, so Sigma = lam mu I + (1 - lam) u u^T has the eigenvalue
  # lam mu + (1 - lam) |u|^2 along u and lam mu across it (a float64 solve would not
  # resolve lam mu ~ 1e-13 |u|^2 against S's rounding errors).
  two = rng.standard_normal((2, 6)).astype(np.float32)
  kernel = kernels.mahalanobis(two)
  lam = float(jax.nn.sigmoid(jnp.float32(-30.0)))
  assert float(kernel.shrinkage) == pytest.approx(lam, rel=1e-6)
  got = _exact(kernel, queries, two)
  assert np.isfinite(got).all()
  u = (two[0].astype(np.float64) - two[1]) / 2
  mu = u @ u / 6
  diff = queries[:, None].astype(np.float64) - two[None]
  along = diff @ (u / np.linalg.norm(u))
  across = np.sum(diff**2, -1) - along**2
  want = np.sqrt(across / (lam * mu) + along**2 / (lam * mu + (1 - lam) * (u @ u)))
  np.testing.assert_allclose(got, want, rtol=1e-4)


def test_polynomial_exact_form_keeps_near_duplicates():
  # k(x,x) + k(y,y) - 2 k(x,y) cancels catastrophically for y = x + tiny; the factored
  # exact form keeps the distance to float32 relative precision.
  kernel = kernels.polynomial(3, gamma=0.5, offset=1.0)
  rng = np.random.default_rng(2)
  x = rng.standard_normal((5, 8))
  y = x + 1e-4 * rng.standard_normal((5, 8))
  ref = np.diag(reference.polynomial(kernel, x, y))
  got = jax.vmap(kernel.exact)(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
  np.testing.assert_allclose(got, ref, rtol=2e-3)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("k", [1, 5])
def test_knn_equals_brute_force(name, k, search_path):
  del search_path  # Runs on the CPU-kernel path and on the pure-XLA path.
  train, queries = _data(4, n=300, q=23)
  kernel = _kernel(name, train)
  ref = reference.DISTANCES[name](kernel, queries, train)
  order = np.argsort(ref, axis=1, kind="stable")[:, :k]
  dist, idx = spade_jax.knn(queries, train, k, kernel, chunk_size=64)
  assert dist.dtype == np.float32 and idx.shape == (23, k)
  tolerances.assert_same_neighbours(dist, idx, np.take_along_axis(ref, order, 1), order,
                                    rtol=2e-3, atol=2e-4 * np.max(ref))


@pytest.mark.parametrize("name", ["mahalanobis", "polynomial", "rff"])
def test_sharded_knn_equals_single_device(name):
  train, queries = _data(5, n=37, q=5)
  kernel = _kernel(name, train)
  mesh = jax.make_mesh((8,), ("data",))
  d1, i1 = spade_jax.knn(queries, train, 4, kernel)
  d2, i2 = spade_jax.knn(queries, spade_jax.shard_gallery(train, mesh), 4, kernel)
  tolerances.assert_same_neighbours(d2, i2, d1, i1, rtol=1e-4, atol=1e-6)


@kernels.register_kernel(overwrite=True)
class Counted(kernels.L2Kernel):
  """L2 on x * scale, counting how often jax traces its features."""
  scale: jax.Array
  name = "counted"
  traces = 0

  def features(self, x):
    type(self).traces += 1
    return x * self.scale


def test_new_parameter_values_do_not_recompile():
  train, queries = _data(6)
  spade_jax.knn(queries, train, 3, Counted(scale=jnp.ones(6, jnp.float32)))
  spade_jax.image_scores(queries, train, 3, Counted(scale=jnp.ones(6, jnp.float32)))
  traced = Counted.traces
  assert traced > 0
  for value in (0.5, 2.0, 3.0):
    spade_jax.knn(queries, train, 3, Counted(scale=jnp.full(6, value, jnp.float32)))
    spade_jax.image_scores(queries, train, 3, Counted(scale=jnp.full(6, value, jnp.float32)))
  assert Counted.traces == traced
  # And a built-in kernel: the jit cache does not grow with new bandwidths.
  spade_jax.knn(queries, train, 3, kernels.rbf(1.0))
  size = neighbors._knn_jit._cache_size()  # pylint: disable=protected-access
  for h in (0.5, 2.0, 7.0):
    spade_jax.knn(queries, train, 3, kernels.rbf(h))
  assert neighbors._knn_jit._cache_size() == size  # pylint: disable=protected-access


def test_monotone_kernels_have_l2_neighbours():
  # RBF / Laplacian distances are monotone in L2: the same neighbours, transformed.
  train, queries = _data(7)
  _, i_l2 = spade_jax.knn(queries, train, 6, "l2")
  for name in ("rbf", "laplacian"):
    _, idx = spade_jax.knn(queries, train, 6, _kernel(name, train))
    np.testing.assert_array_equal(idx, i_l2)


def test_polynomial_search_takes_the_xla_path():
  # The CPU kernel computes plain matmuls: a kernel with an elementwise proxy transform
  # must never reach it, even in a CPU lowering (the L2-type kernels do, as a control).
  if not cpu_kernel.available():
    pytest.skip(cpu_kernel.unavailable_reason())
  train, queries = _data(8)

  def cpu_text(kernel):
    fn = jax.jit(lambda q, g: spade_jax.knn(q, g, 3, kernel))
    return export.export(fn, platforms=("cpu",), disabled_checks=[
        export.DisabledSafetyCheck.custom_call(cpu_kernel.TARGET)])(queries, train).mlir_module()

  assert cpu_kernel.TARGET not in cpu_text(_kernel("polynomial", train))
  assert cpu_kernel.TARGET in cpu_text(_kernel("mahalanobis", train))


def test_checks_before_tracing():
  train, queries = _data(9)
  kernel = kernels.mahalanobis(train)
  with pytest.raises(ValueError, match="takes 6-d features, got 4-d"):
    spade_jax.knn(queries[:, :4], train[:, :4], 2, kernel)
  with pytest.raises(ValueError, match="NaN or Inf parameters"):
    spade_jax.knn(queries, train, 2, kernel.replace(log_bandwidth=jnp.float32(jnp.nan)))
  with pytest.raises(ValueError, match="is a kernel with parameters"):
    spade_jax.knn(queries, train, 2, "mahalanobis")
  with pytest.raises(ValueError, match="shrinkage must be in"):
    kernels.mahalanobis(train, shrinkage=1.5)
  with pytest.raises(ValueError, match="full rank"):
    kernels.mahalanobis(train[:4], shrinkage=0.0)
  with pytest.raises(ValueError, match="bandwidth must be > 0"):
    kernels.rbf(0.0)
  with pytest.raises(ValueError, match="degree must be a positive int"):
    kernels.polynomial(0)
  with pytest.raises(ValueError, match="unknown kernel"):
    kernels.from_features("nope", train)
  with pytest.raises(ValueError, match="already registered"):
    kernels.register_kernel(type(kernels.rbf(1.0)))


def test_kernel_searches_inside_a_callers_jit():
  # The parameter checks run on concrete kernels even inside a caller's trace.
  train, queries = _data(10)
  kernel = kernels.mahalanobis(train)
  d1, i1 = spade_jax.knn(queries, train, 3, kernel)
  d2, i2 = jax.jit(lambda q, g: spade_jax.knn(q, g, 3, kernel))(queries, train)
  np.testing.assert_allclose(d2, d1, rtol=1e-6)
  np.testing.assert_array_equal(i2, i1)
