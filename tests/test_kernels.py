"""Kernels as values: each kernel's distances vs a float64 NumPy reference of its formula,
knn with each kernel vs brute force on that distance (both search paths, sharded), no
recompilation for new parameter values, and the checks made before tracing."""

import jax
from jax import export
import jax.numpy as jnp
import kernel_reference as reference
import numpy as np
import pytest
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
