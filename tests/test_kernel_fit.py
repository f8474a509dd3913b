"""Learning kernels with optax (kernels.fit) on synthetic data with known answers, the
objectives' guards, kernels stored as arrays + a JSON spec, memory-bank densities and
the synthetic-anomaly images."""

import json

import jax
import jax.numpy as jnp
import kernel_reference as reference
import numpy as np
import optax
import pytest
from sklearn.metrics import roc_auc_score

import spade_jax
from spade_jax import kernels
from spade_jax.data import synthetic


def _normalised(c):
  return c / np.trace(c)


def test_fit_recovers_the_covariance_of_gaussian_data():
  # Likelihood cross-validation of a full learnable metric |(x - y) P| on Gaussian data:
  # the kernel covariance (P P^T)^-1 it finds is proportional to the data's covariance
  # (the normal-reference bandwidth matrix), up to the estimate's sampling error.
  rng = np.random.default_rng(0)
  mix = np.array([[2.0, 0, 0], [0.8, 1.0, 0], [0.3, -0.4, 0.5]])
  sigma = mix @ mix.T
  x = (rng.standard_normal((400, 3)) @ mix.T).astype(np.float32)
  objective = kernels.LooLogLikelihood(k=None, batch_size=400)  # Exact, every row.
  fitted, losses = kernels.fit(kernels.linear(np.eye(3)), x, objective=objective,
                               optimizer=optax.adam(optax.cosine_decay_schedule(0.1, 150)),
                               steps=150)
  p = np.asarray(fitted.projection, np.float64)
  cov = np.linalg.inv(p @ p.T)
  error = np.linalg.norm(_normalised(cov) - _normalised(sigma)) / np.linalg.norm(
      _normalised(sigma))
  assert error < 0.25, (error, _normalised(cov), _normalised(sigma))
  # Principal axes agree, and the objective went down.
  top = lambda c: np.linalg.eigh(c)[1][:, -1]
  assert abs(top(cov) @ top(sigma)) > 0.97
  assert losses[-1] < losses[0] - 0.3


def test_fit_finds_the_bandwidth_a_grid_search_of_the_same_objective_finds():
  rng = np.random.default_rng(1)
  x = np.concatenate([rng.standard_normal((150, 2)) * 0.5,
                      rng.standard_normal((100, 2)) * 0.2 + 2.0]).astype(np.float32)
  objective = kernels.LooLogLikelihood(k=None, batch_size=1000)
  fitted, _ = kernels.fit(kernels.rbf(1.0), x, objective=objective,
                          optimizer=optax.adam(0.05), steps=150)
  loss_fn, data = objective.setup(kernels.rbf(1.0), x, key=jax.random.key(0))
  loss = jax.jit(loss_fn)
  grid = np.geomspace(0.03, 1.0, 61)
  values = [float(loss(kernels.rbf(h), data, jax.random.key(0))) for h in grid]
  best = grid[int(np.argmin(values))]
  step = np.log(grid[1] / grid[0])
  assert abs(np.log(float(fitted.bandwidth) / best)) <= step, (float(fitted.bandwidth), best)


def test_learned_mahalanobis_shrinkage_with_folds():
  # N < D: the covariance is singular, the statistics must come from the rest (folds).
  rng = np.random.default_rng(2)
  x = (rng.standard_normal((40, 60)) * np.linspace(0.1, 2.0, 60)).astype(np.float32)
  start = kernels.mahalanobis(x)
  with pytest.raises(ValueError, match="statistics of the data"):
    kernels.fit(start, x, objective=kernels.LooLogLikelihood())
  objective = kernels.LooLogLikelihood(k=20, folds=4)
  fitted, losses = kernels.learn(start, x, objective=objective, steps=60, learning_rate=0.1)
  assert np.isfinite(np.asarray(losses)).all()
  assert 0 < float(fitted.shrinkage) < 1
  before = kernels.evaluate(start, x, objective=objective, key=jax.random.key(5))
  after = kernels.evaluate(fitted, x, objective=objective, key=jax.random.key(5))
  assert after < before
  # The spectrum (a statistic of all the data) is unchanged: only lambda and h moved.
  np.testing.assert_array_equal(fitted.eigvecs, start.eigvecs)


def test_synthetic_auroc_objective_learns_the_informative_direction():
  # Normal features vary little along the first feature, and synthetic anomalies differ
  # from their source images along it only; L2 drowns it in the others. The learned
  # metric |(x - y) P| weights it up, and the AUROC of held-out scores rises.
  rng = np.random.default_rng(3)
  normal = (rng.standard_normal((60, 4)) * [0.2, 1, 1, 1]).astype(np.float32)
  sources = np.arange(60)
  anomalies = normal + np.array([0.8, 0, 0, 0], np.float32) * rng.choice([-1, 1], (60, 1))

  def auroc(kernel):
    d_n, _ = spade_jax.knn(normal, normal, 4, kernel)
    d_a, i_a = spade_jax.knn(anomalies, normal, 4, kernel)
    s_n = np.asarray(d_n)[:, 1:].mean(1)  # Without the row itself.
    d_a, i_a = np.asarray(d_a), np.asarray(i_a)
    s_a = np.array([d_a[r][i_a[r] != sources[r]][:3].mean() for r in range(60)])
    return roc_auc_score(np.r_[np.zeros(60), np.ones(60)], np.r_[s_n, s_a])

  start = kernels.linear(np.eye(4))
  objective = kernels.SyntheticAUROC(anomalies=anomalies, sources=sources, k=3)
  fitted, losses = kernels.fit(start, normal, objective=objective, steps=80,
                               optimizer=optax.adam(0.05))
  assert losses[-1] < losses[0]
  assert auroc(fitted) > auroc(start) + 0.05
  weights = np.linalg.norm(np.asarray(fitted.projection), axis=1)  # Started all equal.
  assert weights[0] > 1.5 * weights[1:].max(), weights


def test_objective_guards():
  rng = np.random.default_rng(4)
  x = rng.standard_normal((30, 3)).astype(np.float32)
  with pytest.raises(ValueError, match="normalised density"):
    kernels.fit(kernels.polynomial(2), x)
  with pytest.raises(ValueError, match="trainable must name"):
    kernels.fit(kernels.rbf(1.0), x, trainable=("nope",))
  with pytest.raises(ValueError, match="hold out whole images"):
    kernels.fit(kernels.rbf(1.0), x.reshape(10, 3, 3), objective=kernels.LooLogLikelihood())
  with pytest.raises(ValueError, match="anomalies must be"):
    kernels.fit(kernels.rbf(1.0), x, objective=kernels.SyntheticAUROC(anomalies=x[:, :2]))
  with pytest.raises(ValueError, match="needs the anomalies' sources"):
    kernels.fit(kernels.rbf(1.0), x, objective=kernels.SyntheticAUROC(anomalies=x, folds=3))


def test_learn_and_for_levels_on_pyramid_features():
  # [N, h, w, C] level features: rows grouped by image, whole images held out.
  rng = np.random.default_rng(5)
  feats = {"pool": rng.standard_normal((20, 8)).astype(np.float32),
           "layer1": rng.standard_normal((20, 3, 3, 4)).astype(np.float32)}
  learned = kernels.for_levels("mahalanobis", feats, learned=True, steps=5,
                               objective=kernels.LooLogLikelihood(k=10, folds=4,
                                                                  batch_size=16))
  assert set(learned) == {"pool", "layer1"}
  assert learned["layer1"].input_dim == 4 and learned["pool"].input_dim == 8
  fixed = kernels.for_levels("rff", feats, num_features=32)
  assert fixed["layer1"].omega.shape == (4, 32)


@pytest.mark.parametrize("name", sorted(reference.DISTANCES))
def test_kernels_round_trip_through_arrays_and_json(name):
  rng = np.random.default_rng(6)
  x = rng.standard_normal((50, 5)).astype(np.float32)
  kernel = kernels.from_features(name, x, key=jax.random.key(2))
  arrays, spec = kernels.kernel_to_arrays({"pool": kernel, "layer1": "l2"})
  assert all(isinstance(v, np.ndarray) for v in arrays.values())
  assert all(key.startswith("pool/") for key in arrays)
  back = kernels.kernel_from_arrays(dict(arrays), json.loads(json.dumps(spec)))
  assert back["layer1"] is spade_jax.METRICS["l2"]
  assert type(back["pool"]) is type(kernel) and back["pool"].static() == kernel.static()
  jax.tree.map(np.testing.assert_array_equal, back["pool"], kernel)
  np.testing.assert_array_equal(spade_jax.knn(x[:4], x, 3, back["pool"])[0],
                                spade_jax.knn(x[:4], x, 3, kernel)[0])
  single, single_spec = kernels.kernel_to_arrays(kernel)
  jax.tree.map(np.testing.assert_array_equal,
               kernels.kernel_from_arrays(single, single_spec), kernel)
  with pytest.raises(ValueError, match="missing"):
    kernels.kernel_from_arrays({}, single_spec)


def test_memory_density_is_one_dot_product_per_query():
  rng = np.random.default_rng(7)
  bank = rng.standard_normal((80, 3)).astype(np.float32)
  queries = rng.standard_normal((6, 3)).astype(np.float32)
  h = 1.2
  exact = np.exp(-reference.l2_squared(queries, bank) / (2 * h * h)).mean(1)
  # Nystrom with the bank as landmarks reproduces the kernel exactly (up to jitter).
  nys = kernels.nystrom(bank, h, jitter=1e-6)
  np.testing.assert_allclose(kernels.memory_density(nys, queries, bank), exact, atol=3e-3)
  # Random Fourier features approximate it (Monte Carlo error ~ 1 / sqrt(E)).
  rff = kernels.random_fourier(3, 20000, h, jax.random.key(0))
  mean = kernels.mean_features(rff, bank)
  np.testing.assert_allclose(kernels.memory_density(rff, queries, mean=mean), exact,
                             atol=0.02)
  grad = jax.grad(lambda q: jnp.sum(kernels.memory_density(nys, q, bank)))(queries)
  assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).max() > 0
  with pytest.raises(ValueError, match="explicit features"):
    kernels.memory_density(kernels.rbf(1.0), queries, bank)


def test_synthetic_anomalies_change_only_their_masks():
  rng = np.random.default_rng(8)
  images = rng.integers(0, 256, (4, 48, 40, 3), dtype=np.uint8)
  box = (4, 4, 44, 36)
  out, sources, masks = synthetic.synthetic_anomalies(images, seed=3, per_image=2, box=box)
  assert out.shape == (8, 48, 40, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(sources, np.repeat(np.arange(4), 2))
  for anomaly, source, mask in zip(out, sources, masks):
    changed = (anomaly != images[source]).any(-1)
    assert changed.any() and not (changed & ~mask).any()
    assert not mask[:4].any() and not mask[:, :4].any() and not mask[44:].any()
    assert 0.01 < mask[4:44, 4:36].mean() < 0.3
  again, _, _ = synthetic.synthetic_anomalies(images, seed=3, per_image=2, box=box)
  np.testing.assert_array_equal(again, out)
  with pytest.raises(ValueError, match="kinds must be from"):
    synthetic.synthetic_anomalies(images, kinds=("scratch",))
