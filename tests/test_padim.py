"""PaDiM with a tiny fake backbone: embedding, Gaussians, distances, maps, mesh, checks.

References are float64 NumPy of the paper's formulas (Defard et al., ICPR 2020):
mu_ij, Sigma_ij = sample covariance + eps I (or sklearn's Ledoit-Wolf), the Mahalanobis
distance sqrt((x - mu)^T Sigma^-1 (x - mu)), then the maps as the other detectors make
them (bilinear upsampling, SciPy's Gaussian blur) and the image score as their maximum.
"""

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest
from scipy import ndimage
from sklearn import covariance as sk_covariance
from spade_fake_backbone import CHANNELS, FakeBackbone
from stripe_images import stripe_images
from test_anomaly_map import _bilinear_ref

import spade_jax
from spade_jax.features import embedding
from spade_jax.features.preprocessing import preprocess
from spade_jax.scoring import gaussian

SIZE = 32  # Images, resize and crop: layer1 8 x 8, layer2 4 x 4, layer3 2 x 2.
CONFIG = spade_jax.PadimConfig(resize=SIZE, crop=SIZE, batch_size=4, num_features=16,
                               feature_seed=3)
NUM_CHANNELS = CHANNELS["layer1"] + CHANNELS["layer2"] + CHANNELS["layer3"]  # C = 24.
NUM_TRAIN = 12
SQUARE = (slice(12, 22), slice(14, 24))  # The planted anomaly of the last test image.


def _images(rng, n, defect=False):
  """Smooth stripes with noise; a defect is a bright 10 x 10 square."""
  return stripe_images(rng, n, SIZE, SQUARE if defect else None)


@pytest.fixture(scope="module")
def fitted():
  rng = np.random.default_rng(0)
  padim = spade_jax.Padim(FakeBackbone(), CONFIG)
  train = _images(rng, NUM_TRAIN)
  test = np.concatenate([_images(rng, 3), _images(rng, 1, defect=True)])
  return padim, padim.fit(train), train, test


def _pyramid(images):
  return {k: np.asarray(v) for k, v in
          FakeBackbone()(preprocess(images, resize=SIZE, crop=SIZE)).items()}


def _reference_embedding(images, channels, feats=None):
  """float64 NumPy: the levels repeated over layer1's grid, concatenated, subset."""
  feats = _pyramid(images) if feats is None else feats
  levels = [np.asarray(feats[l], np.float64) for l in CONFIG.layers]
  h = levels[0].shape[1]
  up = [np.repeat(np.repeat(x, h // x.shape[1], axis=1), h // x.shape[2], axis=2)
        for x in levels]
  return np.concatenate(up, axis=-1)[..., list(channels)]


def _reference_fit(emb, regularization="paper", epsilon=0.01):
  """[N, h, w, d] -> float64 (mean [P, d], covariance [P, d, d], precision [P, d, d])."""
  n, h, w, d = emb.shape
  x = np.asarray(emb, np.float64).reshape(n, h * w, d).transpose(1, 0, 2)
  mean = x.mean(axis=1)
  if regularization == "paper":
    cov = np.stack([np.cov(p, rowvar=False) + epsilon * np.eye(d) for p in x])
  else:
    cov = np.stack([sk_covariance.ledoit_wolf(p)[0] for p in x])
  return mean, cov, np.linalg.inv(cov)


def _reference_distances(emb, mean, precision):
  """[N, h, w, d] -> [N, h, w] float64 sqrt((x - mu)^T Sigma^-1 (x - mu))."""
  n, h, w, d = emb.shape
  y = np.asarray(emb, np.float64).reshape(n, h * w, d) - mean
  return np.sqrt(np.einsum("npd,pde,npe->np", y, precision, y)).reshape(n, h, w)


def _reference_maps(score_maps):
  return np.stack([ndimage.gaussian_filter(m, 4.0, mode="reflect", truncate=4.0)
                   for m in _bilinear_ref(score_maps, SIZE, SIZE)])


# ----------------------------------------------------------------------------------
# (a) Embedding and channel subset.


def test_random_channels_follow_the_documented_draw():
  for seed in (0, 3):
    keys = np.random.default_rng(seed).bit_generator.random_raw(NUM_CHANNELS)
    expected = np.sort(np.argsort(keys, kind="stable")[:16])
    got = embedding.random_channels(NUM_CHANNELS, 16, seed)
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == np.int32 and len(set(got.tolist())) == 16
    assert np.all(np.diff(got) > 0) and 0 <= got.min() and got.max() < NUM_CHANNELS
  assert not np.array_equal(embedding.random_channels(1792, 550, 0),
                            embedding.random_channels(1792, 550, 1))
  np.testing.assert_array_equal(embedding.random_channels(24, 24, 5), np.arange(24))
  assert CONFIG.channels(NUM_CHANNELS) == tuple(embedding.random_channels(24, 16, 3))
  # num_features None: min(100, C).
  assert spade_jax.PadimConfig().channels(24) == tuple(range(24))
  assert len(spade_jax.PadimConfig().channels(1792)) == 100


def test_extract_matches_numpy_reference(fitted):
  padim, index, train, _ = fitted
  emb = padim.extract(train)
  channels = CONFIG.channels(NUM_CHANNELS)
  assert emb.shape == (NUM_TRAIN, 8, 8, 16) and emb.dtype == np.float32
  # (The backbone's float32 rounding depends on the batch shape.)
  np.testing.assert_allclose(emb, _reference_embedding(train, channels), rtol=1e-5,
                             atol=1e-6)
  # The embedding itself only gathers: exact copies of the backbone's values.
  feats = _pyramid(train)
  np.testing.assert_array_equal(spade_jax.padim_embedding(feats, CONFIG.layers, channels),
                                _reference_embedding(train, channels, feats))
  assert index.channels == channels and index.num_channels == NUM_CHANNELS


def test_embedding_nearest_resize_is_torchs():
  # Non-integer ratios: torch's nearest reads floor(o * in / out) (float32 scale).
  rng = np.random.default_rng(1)
  levels = {"a": rng.standard_normal((2, 7, 6, 3)).astype(np.float32),
            "b": rng.standard_normal((2, 3, 4, 2)).astype(np.float32)}
  got = np.asarray(spade_jax.padim_embedding(levels, ("a", "b"), channels=[4, 0, 2]))
  rows = np.minimum(np.floor(np.arange(7) * np.float32(3 / 7)).astype(int), 2)
  cols = np.minimum(np.floor(np.arange(6) * np.float32(4 / 6)).astype(int), 3)
  b = levels["b"][:, rows][:, :, cols]
  expected = np.concatenate([levels["a"], b], axis=-1)[..., [0, 2, 4]]  # Ascending.
  np.testing.assert_array_equal(got, expected)
  np.testing.assert_array_equal(embedding.nearest_indices(28, 56), np.arange(56) // 2)
  with pytest.raises(ValueError, match="distinct ints in \\[0, 5\\)"):
    spade_jax.padim_embedding(levels, ("a", "b"), channels=[0, 5])


# ----------------------------------------------------------------------------------
# (b) The Gaussians and the distance maps against float64.


def test_index_layout(fitted):
  padim, index, _, _ = fitted
  assert isinstance(index, spade_jax.PadimIndex)
  assert index.mean.shape == (64, 16) and index.precision.shape == (64, 16, 16)
  assert index.grid == (8, 8) and index.num_positions == 64 and index.num_features == 16
  assert not index.is_sharded and index.backbone_name == "fake_pyramid"
  assert index.feature_config == CONFIG.feature_config("fake_pyramid")
  assert index.weights_id == padim.backbone.weights_id and len(index.fingerprint) == 16
  assert (index.regularization, index.epsilon) == ("paper", 0.01)
  assert len(jax.tree_util.tree_leaves(index)) == 2  # mean, precision; the rest is static.


def test_fit_matches_float64_reference(fitted):
  padim, index, train, _ = fitted
  emb = _reference_embedding(train, index.channels)
  mean, _, precision = _reference_fit(emb)
  np.testing.assert_allclose(index.mean, mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(index.precision, precision, rtol=1e-4,
                             atol=1e-4 * np.abs(precision).max())


def test_distance_maps_and_scores_match_float64_reference(fitted):
  padim, index, train, test = fitted
  mean, _, precision = _reference_fit(_reference_embedding(train, index.channels))
  test_emb = _reference_embedding(test, index.channels)
  ref = _reference_distances(test_emb, mean, precision)
  dist = gaussian.mahalanobis_distances(test_emb.reshape(4, 64, 16).astype(np.float32),
                                        index.mean, index.precision)
  np.testing.assert_allclose(np.asarray(dist).reshape(4, 8, 8), ref, rtol=1e-4)
  scores, maps = padim.score(index, test)
  ref_maps = _reference_maps(ref)
  np.testing.assert_allclose(maps, ref_maps, rtol=1e-4)
  np.testing.assert_allclose(scores, ref_maps.max(axis=(1, 2)), rtol=1e-4)


def test_ill_conditioned_fit_stays_accurate_in_float32():
  # CNN-like features: 12 latent factors of varied scales in 96 ReLU channels, N < d, so
  # Sigma + eps I has cond ~ 5e4. Inverting the float32 Sigma moves distances by ~3e-4;
  # the QR factor of the stacked samples (scoring/gaussian.py) keeps float32 rounding.
  rng = np.random.default_rng(5)
  mixing = rng.standard_normal((96, 12)) * rng.uniform(0.1, 4, (96, 1))
  x = np.maximum(rng.standard_normal((4, 45, 12)) @ mixing.T
                 + 0.05 * rng.standard_normal((4, 45, 96)) + 0.5, 0).astype(np.float32)
  train, test = x[:, :40], x[:, 40:].transpose(1, 0, 2)
  mean, cov, precision = _reference_fit(train.transpose(1, 0, 2)[:, :, None])
  assert np.linalg.cond(cov).max() > 1e4
  ref = _reference_distances(test[:, :, None], mean, precision)[:, :, 0]
  dist = spade_jax.mahalanobis_distances(test, *spade_jax.fit_gaussians(train))
  np.testing.assert_allclose(dist, ref, rtol=1e-5)


# ----------------------------------------------------------------------------------
# (c) Ledoit-Wolf.


@pytest.mark.parametrize("n,d", [(5, 12), (40, 6), (3, 1)])  # N < d, N > d, d = 1.
def test_ledoit_wolf_matches_sklearn(n, d):
  rng = np.random.default_rng(n)
  scale = rng.uniform(0.2, 3.0, (7, 1, d))
  samples = (rng.standard_normal((7, n, d)) @ rng.standard_normal((d, d)) * scale
             + rng.standard_normal((7, 1, d)))
  mean, cov = gaussian.gaussian_covariances(samples.astype(np.float32),
                                            regularization="ledoit_wolf")
  for p in range(7):
    expected = sk_covariance.ledoit_wolf(samples[p])[0]
    np.testing.assert_allclose(cov[p], expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    np.testing.assert_allclose(mean[p], samples[p].mean(0), rtol=1e-5, atol=1e-5)


def test_ledoit_wolf_detector_matches_sklearn(fitted):
  padim, _, train, test = fitted
  config = spade_jax.PadimConfig(**{**CONFIG.__dict__, "regularization": "ledoit_wolf"})
  lw = spade_jax.Padim(padim.backbone, config)
  index = lw.fit(train)
  assert (index.regularization, index.epsilon) == ("ledoit_wolf", None)
  mean, _, precision = _reference_fit(_reference_embedding(train, index.channels),
                                      "ledoit_wolf")
  np.testing.assert_allclose(index.precision, precision, rtol=1e-3,
                             atol=1e-4 * np.abs(precision).max())
  ref = _reference_distances(_reference_embedding(test, index.channels), mean, precision)
  scores, maps = lw.score(index, test)
  np.testing.assert_allclose(maps, _reference_maps(ref), rtol=1e-3)
  # An index of other fit settings is refused, both ways.
  with pytest.raises(ValueError, match="fitted with.*ledoit_wolf.*refit"):
    padim.score(index, test[:1])


# ----------------------------------------------------------------------------------
# (d) Image scores and maps.


def test_scores_are_the_maxima_of_the_maps(fitted):
  padim, index, _, test = fitted
  scores, maps = padim.score(index, test)
  assert scores.shape == (4,) and maps.shape == (4, SIZE, SIZE)
  assert scores.dtype == np.float32 and maps.dtype == np.float32
  np.testing.assert_array_equal(scores, maps.max(axis=(1, 2)))
  s2, m2 = padim.score_features(index, padim.extract(test))
  np.testing.assert_allclose(s2, scores, rtol=1e-6)
  np.testing.assert_allclose(m2, maps, rtol=1e-6)


# ----------------------------------------------------------------------------------
# (e) Sharded == single device.


def test_sharded_fit_and_score_equal_single_device(fitted):
  padim, index, train, test = fitted
  mesh = jax.make_mesh((len(jax.devices()),), ("data",))
  sharded = padim.fit(train, mesh=mesh)
  assert sharded.is_sharded and sharded.num_positions == 64
  assert sharded.precision.data.sharding.spec[0] == "data"
  assert len(sharded.precision.data.addressable_shards) == 8
  np.testing.assert_allclose(sharded.mean.to_numpy(), index.mean, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(sharded.precision.to_numpy(), index.precision, rtol=1e-5,
                             atol=1e-5 * np.abs(np.asarray(index.precision)).max())
  scores, maps = padim.score(sharded, test)
  ref_scores, ref_maps = padim.score(index, test)
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-5)
  np.testing.assert_allclose(maps, ref_maps, rtol=1e-5)
  # An unsharded index is sharded for scoring by `mesh`.
  np.testing.assert_allclose(padim.score(index, test[:2], mesh=mesh)[0], ref_scores[:2],
                             rtol=1e-5)


@pytest.mark.parametrize("mesh_shape,regularization,chunk_size", [
    ((8,), "paper", None), ((8,), "ledoit_wolf", 2), ((4, 2), "paper", None)])
def test_sharded_gaussians_with_padding(mesh_shape, regularization, chunk_size):
  # 37 positions: padded to 40 over the "data" axis; the padding never shows. (A 2-D
  # mesh: the other axis holds copies.)
  rng = np.random.default_rng(2)
  samples = rng.standard_normal((37, 6, 5)).astype(np.float32)
  test = rng.standard_normal((3, 37, 5)).astype(np.float32)
  mesh = jax.make_mesh(mesh_shape, ("data", "batch")[:len(mesh_shape)])
  mean, precision = spade_jax.fit_gaussians(samples, regularization=regularization)
  gallery = spade_jax.shard_gallery(samples, mesh, "data")
  s_mean, s_precision = spade_jax.fit_gaussians(gallery, regularization=regularization,
                                                chunk_size=chunk_size)
  assert s_precision.data.shape == (40, 5, 5) and s_precision.size == 37
  np.testing.assert_allclose(s_mean.to_numpy(), mean, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(s_precision.to_numpy(), precision, rtol=1e-5, atol=1e-5)
  dist = spade_jax.mahalanobis_distances(test, mean, precision)
  s_dist = spade_jax.mahalanobis_distances(test, s_mean, s_precision)
  assert s_dist.shape == (3, 37) and s_dist.sharding.is_fully_replicated
  np.testing.assert_allclose(s_dist, dist, rtol=1e-5)
  if mesh_shape == (8,):
    # Statistics sharded with NamedSharding directly (P a multiple of the axis) too.
    put = lambda x: jax.device_put(x[:32], NamedSharding(mesh, P("data")))
    np.testing.assert_allclose(
        spade_jax.mahalanobis_distances(test[:, :32], put(mean), put(precision)),
        dist[:, :32], rtol=1e-5)


def test_fit_gaussians_chunked_and_jitted():
  samples = np.random.default_rng(3).standard_normal((9, 4, 3)).astype(np.float32)
  assert [gaussian.chunk_positions(9, c) for c in (2, 4, 5, 9, 20)] == [1, 3, 3, 9, 9]
  whole = spade_jax.fit_gaussians(samples)
  chunked = jax.jit(lambda x: spade_jax.fit_gaussians(x, chunk_size=4))(samples)
  for a, b in zip(whole, chunked):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  dist = jax.jit(spade_jax.mahalanobis_distances)(samples.transpose(1, 0, 2), *whole)
  assert dist.shape == (4, 9)


# ----------------------------------------------------------------------------------
# (f) Validation.


@pytest.mark.parametrize("field,value,message", [
    ("epsilon", 0.0, "PadimConfig.epsilon must be finite and > 0"),
    ("epsilon", -1.0, "PadimConfig.epsilon must be finite and > 0"),
    ("epsilon", float("nan"), "PadimConfig.epsilon"),
    ("regularization", "oas", "PadimConfig.regularization must be one of"),
    ("num_features", 0, "PadimConfig.num_features must be a positive int"),
    ("feature_seed", -1, "PadimConfig.feature_seed"),
    ("layers", (), "PadimConfig.layers"),
    ("layers", ("layer1", "layer1"), "duplicates"),
    ("chunk_size", 0, "PadimConfig.chunk_size"),
    ("sigma", -1.0, "PadimConfig.sigma"),
    ("crop", 300, "PadimConfig.crop=300 is larger than resize=256"),
    ("batch_size", 0, "PadimConfig.batch_size"),
])
def test_config_validation(field, value, message):
  with pytest.raises(ValueError, match=message):
    spade_jax.PadimConfig(**{field: value})


def test_too_many_features_names_the_channel_count():
  config = spade_jax.PadimConfig(resize=SIZE, crop=SIZE, num_features=25)
  with pytest.raises(ValueError, match="num_features=25 is larger than the 24 channels"):
    spade_jax.Padim(FakeBackbone(), config)  # Declared channels: refused at once.
  with pytest.raises(ValueError, match="num_features=1000 is larger than the 24 channels"):
    config.__class__(num_features=1000).channels(24)


def test_fewer_than_two_training_images(fitted):
  padim, _, train, _ = fitted
  with pytest.raises(ValueError, match="at least 2 training images.*got 1"):
    padim.fit(train[:1])
  with pytest.raises(ValueError, match="at least 2 training images.*got 1"):
    padim.fit_features(np.zeros((1, 8, 8, 16), np.float32))
  with pytest.raises(ValueError, match="at least 2"):
    spade_jax.fit_gaussians(np.zeros((4, 1, 3), np.float32))


def test_scoring_refuses_mismatches(fitted):
  padim, index, _, test = fitted
  with pytest.raises(ValueError, match="must be a PadimIndex"):
    padim.score(spade_jax.PatchCoreIndex(bank=index.mean, backbone_name="fake_pyramid",
                                         feature_config="{}"), test)
  other = spade_jax.Padim(FakeBackbone(), spade_jax.PadimConfig(
      **{**CONFIG.__dict__, "feature_seed": 4}))
  with pytest.raises(ValueError, match="refit"):
    other.score(index, test[:1])
  eps = spade_jax.Padim(FakeBackbone(), spade_jax.PadimConfig(
      **{**CONFIG.__dict__, "epsilon": 0.1}))
  with pytest.raises(ValueError, match="epsilon.*refit"):
    eps.score(index, test[:1])
  with pytest.raises(ValueError, match="other fake_pyramid weights"):
    spade_jax.Padim(FakeBackbone(seed=1), CONFIG).score(index, test[:1])
  with pytest.raises(ValueError, match="do not match the index's grid"):
    padim.score_features(index, np.zeros((1, 4, 4, 16), np.float32))
  # Scoring knobs that leave the statistics alone are accepted.
  spade_jax.Padim(FakeBackbone(), spade_jax.PadimConfig(
      **{**CONFIG.__dict__, "sigma": 2.0, "batch_size": 1})).score(index, test[:1])
  assert CONFIG.score_settings() == {"regularization": "paper", "epsilon": 0.01,
                                     "sigma": 4.0}


# ----------------------------------------------------------------------------------
# (g) A planted anomaly.


def test_planted_anomaly_scores_higher_and_peaks_in_the_square(fitted):
  padim, index, _, test = fitted
  scores, maps = padim.score(index, test)
  assert scores[3] > scores[:3].max()
  peak = np.unravel_index(np.argmax(maps[3]), maps[3].shape)
  assert SQUARE[0].start <= peak[0] < SQUARE[0].stop
  assert SQUARE[1].start <= peak[1] < SQUARE[1].stop
