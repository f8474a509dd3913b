"""Learning kernels with optax (kernels.fit) on synthetic data with known answers, the
objectives' guards, kernels stored as arrays + a JSON spec, memory-bank densities and
the synthetic-anomaly images."""

import functools
import json
import logging

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
from spade_jax.scoring import variants
from spade_jax.search.kernels import io as kernel_io


def _normalised(c):
  return c / np.trace(c)


def test_fit_recovers_the_covariance_of_gaussian_data():
  # Likelihood cross-validation of a full learnable metric |(x - y) P| on Gaussian data:
  # the kernel covariance (P P^T)^-1 it finds is proportional to the data's covariance
  # (the normal-reference bandwidth matrix), up to the estimate's sampling error.
  # 256 rows, 75 steps: the error below is 0.04-0.08 over seeds 0-2 (400 rows and 150
  # steps gave 0.05-0.19), well inside the bound; the sample covariance's own error is
  # 0.02-0.04 at this size.
  rng = np.random.default_rng(0)
  mix = np.array([[2.0, 0, 0], [0.8, 1.0, 0], [0.3, -0.4, 0.5]])
  sigma = mix @ mix.T
  x = (rng.standard_normal((256, 3)) @ mix.T).astype(np.float32)
  objective = kernels.LooLogLikelihood(k=None, batch_size=256)  # Exact, every row.
  fitted, losses = kernels.fit(kernels.linear(np.eye(3)), x, objective=objective,
                               optimizer=optax.adam(optax.cosine_decay_schedule(0.1, 75)),
                               steps=75)
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


def _kernel_values(a, b, h):
  """The three shift-invariant kernels of the rff spectra, float64 [Q, M]."""
  diff = np.asarray(a, np.float64)[:, None, :] - np.asarray(b, np.float64)[None, :, :]
  return {"gaussian": np.exp(-np.sum(diff**2, -1) / (2 * h * h)),
          "laplacian": np.exp(-np.sqrt(np.sum(diff**2, -1)) / h),
          "laplacian_l1": np.exp(-np.sum(np.abs(diff), -1) / h)}


@pytest.mark.parametrize("spectrum", ["gaussian", "laplacian", "laplacian_l1"])
def test_random_fourier_spectra_approximate_their_kernels(spectrum):
  # z(a) . z(b) = (1/E) sum_j t_j, t_j = 2 cos(w_j a / h + b_j) cos(w_j b / h + b_j)
  #   = cos(w_j (a - b) / h) + cos(w_j (a + b) / h + 2 b_j): mean k(a - b) when w_j is
  # drawn from k's spectral density (the second term has mean 0 over b_j), variance
  # <= E[cos^2] + 1/2 <= 3/2. So the Monte-Carlo error is <= sqrt(1.5 / E) per pair (one
  # standard deviation); 5 of them bound all 120 pairs (each |t_j| <= 2).
  rng = np.random.default_rng(9)
  a = rng.standard_normal((6, 3)) * 0.8
  b = rng.standard_normal((20, 3)) * 0.8
  h, num = 1.3, 50_000
  rff = kernels.random_fourier(3, num, h, jax.random.key(1), spectrum=spectrum)
  assert rff.spectrum == spectrum
  exact = _kernel_values(a, b, h)
  w, phase = np.asarray(rff.omega, np.float64), np.asarray(rff.phase, np.float64)
  z = lambda x: np.sqrt(2.0 / num) * np.cos(x @ w / h + phase)
  tol = 5.0 * np.sqrt(1.5 / num)
  np.testing.assert_allclose(z(a) @ z(b).T, exact[spectrum], atol=tol)
  # The library's float32 features give the same kernel (float32 cosines of arguments
  # up to |w| |x| / h: a few 1e-3 at most on the heavy-tailed frequencies, averaged).
  zl = lambda x: np.asarray(rff.features(jnp.asarray(x, jnp.float32)), np.float64)
  np.testing.assert_allclose(zl(a) @ zl(b).T, exact[spectrum], atol=tol + 1e-3)
  # The three kernels differ by far more than the tolerance on these pairs: the test
  # tells which kernel a spectrum approximates.
  for other, values in exact.items():
    if other != spectrum:
      assert np.abs(values - exact[spectrum]).max() > 4 * tol, other


def test_old_cauchy_spectrum_is_refused_with_its_new_name():
  key = jax.random.key(1)
  with pytest.raises(ValueError, match="'cauchy' was renamed 'laplacian_l1'.*L1 norm"):
    kernels.random_fourier(3, 8, 1.0, key, spectrum="cauchy")
  with pytest.raises(ValueError, match="renamed 'laplacian_l1'"):
    kernels.from_features("rff", np.eye(4, 3), spectrum="cauchy")
  with pytest.raises(ValueError, match="spectrum must be one of"):
    kernels.random_fourier(3, 8, 1.0, key, spectrum="student")
  # laplacian_l1 draws what "cauchy" drew: i.i.d. standard Cauchy frequencies.
  l1 = kernels.random_fourier(3, 8, 1.0, key, spectrum="laplacian_l1")
  np.testing.assert_array_equal(
      l1.omega, jax.random.cauchy(jax.random.split(key)[0], (3, 8)).astype(jnp.float32))
  # A stored spec with the old name (an index file's JSON) is refused by the strict
  # check of files and when built, with the same message (no KeyError, nothing built).
  arrays, spec = kernels.kernel_to_arrays({"pool": l1})
  spec = json.loads(json.dumps(spec).replace('"laplacian_l1"', '"cauchy"'))
  with pytest.raises(ValueError, match="kernel spec 'pool': kernel 'rff': spectrum 'cauchy' "
                     "was renamed 'laplacian_l1'"):
    kernel_io.check_spec(spec)
  with pytest.raises(ValueError, match="renamed 'laplacian_l1'"):
    kernels.kernel_from_arrays(arrays, spec)
  with pytest.raises(ValueError, match="renamed 'laplacian_l1'"):
    l1.replace(spectrum="cauchy")


def test_learned_variant_with_fewer_images_than_folds(caplog):
  # Cross-fitting over min(5, M) folds of images: M = 3 and 4 give exactly what an
  # explicit LooLogLikelihood(folds=M) gives; fewer than 3 images are refused up front.
  # (The pooled features alone: every part gets the same objective.)
  assert [variants.learned_folds(m) for m in (3, 4, 5, 6, 50)] == [3, 4, 5, 5, 5]
  for m in (0, 1, 2):
    with pytest.raises(ValueError, match="metric='learned' needs at least 3 training images, "
                       f"got {m}"):
      variants.learned_folds(m)
  with pytest.raises(ValueError, match="metric='learned' needs at least 3"):
    variants.fit_variant("learned", np.eye(1, 6, dtype=np.float32), {}, steps=2)
  rng = np.random.default_rng(11)
  key = jax.random.key(4)
  for m in (3, 4):
    pool = rng.standard_normal((m, 6)).astype(np.float32)
    with caplog.at_level(logging.INFO):
      fitted = variants.fit_variant("learned", pool, {}, steps=3, key=key)
    assert f"{m} training images, so {m} folds instead of 5" in caplog.text
    want, losses = kernels.learn(
        "mahalanobis", pool, objective=kernels.LooLogLikelihood(k=50, folds=m, batch_size=512),
        steps=3, learning_rate=0.05, key=jax.random.fold_in(key, 0))
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6),
                 fitted.pool_metric, want)
    np.testing.assert_allclose(fitted.losses["pool"], losses, rtol=1e-6)
    assert np.isfinite(np.asarray(losses)).all() and 0 < float(want.shrinkage) < 1
  # The synthetic objective too (its k nearest normal images: at most the rest's 3).
  anomalies = (rng.standard_normal((4, 6)).astype(np.float32), np.arange(4))
  fitted = variants.fit_variant("learned", pool, {}, steps=2, objective="synthetic",
                                anomalies=anomalies)
  assert np.isfinite(fitted.losses["pool"]).all()


def test_learned_kernel_of_constant_features_is_finite():
  # Identical training images (all black): the Mahalanobis kernel is L2 / (h sqrt(lambda))
  # (whitening.py), so learning it neither crashes nor leaves the finite numbers.
  row = np.random.default_rng(12).standard_normal(6).astype(np.float32)
  pool = np.tile(row, (6, 1))
  levels = {"a": np.tile(np.random.default_rng(13).standard_normal((1, 3, 3, 4)),
                         (6, 1, 1, 1)).astype(np.float32)}
  fitted = variants.fit_variant("learned", pool, levels, steps=3)
  test = np.random.default_rng(14).standard_normal((3, 6)).astype(np.float32)
  scores, nbrs = spade_jax.image_scores(test, pool, 2, num_neighbors=3,
                                        **fitted.image_kwargs())
  kernel = fitted.pool_metric
  lam, h = float(kernel.shrinkage), float(kernel.bandwidth)
  assert np.isfinite(fitted.losses["pool"]).all() and 0 < lam <= 1 and 0 < h
  # Every training row is the same: the score is the distance to it.
  np.testing.assert_allclose(scores, np.linalg.norm(test.astype(np.float64) - row, axis=1)
                             / (h * np.sqrt(lam)), rtol=1e-5)
  maps = spade_jax.pixel_scores({"a": levels["a"][:3] + 1.0}, levels, nbrs,
                                **fitted.pixel_kwargs())
  assert np.isfinite(np.asarray(maps)).all()


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
