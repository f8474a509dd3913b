"""PatchCore scoring (spade_jax.patchcore_scores) against float64 brute force, and the
reweighting against its formula on a hand-made case."""

import jax
import numpy as np
import numpy_reference as reference
import pytest

import spade_jax
from spade_jax.search import distances

MESH_AXIS = "data"


def _mesh():
  return jax.make_mesh((len(jax.devices()),), (MESH_AXIS,))


def _data(seed=0, n=3, h=4, w=5, d=6, bank=37):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, h, w, d)).astype(np.float32),
          rng.normal(size=(bank, d)).astype(np.float32))


def reference_scores(test, bank, k, metric, b=None, topk=None):
  """Float64 patch scores and image scores, from the definitions (topk: the mean of
  each image's topk largest patch scores)."""
  n, h, w, d = test.shape
  dist = reference.distances(test.reshape(-1, d), bank, metric)  # [N h w, B]
  order = np.argsort(dist, axis=1, kind="stable")
  patch = np.take_along_axis(dist, order[:, :k], 1).mean(1).reshape(n, h * w)
  if topk is not None:
    return np.sort(patch, axis=1)[:, ::-1][:, :topk].mean(1), patch.reshape(n, h, w)
  if b is None:
    return patch.max(1), patch.reshape(n, h, w)
  images = []
  for i in range(n):
    top = int(np.argmax(patch[i]))
    m_test = test.reshape(n, h * w, d)[i, top]
    m_star = order[i * h * w + top, 0]
    support = np.argsort(reference.distances(bank[m_star][None], bank, metric)[0],
                         kind="stable")[:b]
    d_star = reference.distances(m_test[None], bank[m_star][None], metric)[0, 0]
    d_support = reference.distances(m_test[None], bank[support], metric)[0]
    images.append((1 - np.exp(d_star) / np.exp(d_support).sum()) * patch[i, top])
  return np.array(images), patch.reshape(n, h, w)


@pytest.mark.parametrize("metric", ["l2", "sqeuclidean", "cosine"])
@pytest.mark.parametrize("k,b", [(1, None), (3, None), (1, 4), (2, 9)])
def test_matches_reference(metric, k, b):
  test, bank = _data()
  scores, maps = spade_jax.patchcore_scores(test, bank, k=k, metric=metric,
                                            reweight_neighbors=b)
  ref_scores, ref_maps = reference_scores(test, bank, k, metric, b)
  assert scores.shape == (3,) and maps.shape == (3, 4, 5)
  np.testing.assert_allclose(np.asarray(maps), ref_maps, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(scores), ref_scores, rtol=1e-5, atol=1e-5)


def test_reweighting_on_a_hand_made_case():
  # Bank in 2-D; one test image of 1 x 2 patches. Patch (0.1, 0.1) is 0.1414 from
  # (0, 0); patch (2.5, 0) is 1.5 from its nearest entry m* = (1, 0): it is m_test*,
  # s* = 1.5. The b = 3 nearest entries of m* are m* itself (0), (0, 0) (1) and (0, 2)
  # (sqrt 5); (4, 4) is 5 away. Their distances to m_test* are 1.5, 2.5 and
  # sqrt(2.5^2 + 2^2).
  bank = np.array([[0, 0], [1, 0], [0, 2], [4, 4]], np.float32)
  test = np.array([[[[0.1, 0.1], [2.5, 0.0]]]], np.float32)  # [1, 1, 2, 2]
  support = [1.5, 2.5, np.sqrt(2.5**2 + 2**2)]
  expected = (1 - np.exp(1.5) / np.sum(np.exp(support))) * 1.5
  scores, maps = spade_jax.patchcore_scores(test, bank, reweight_neighbors=3)
  np.testing.assert_allclose(np.asarray(maps), [[[np.sqrt(0.02), 1.5]]], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(scores), [expected], rtol=1e-6)
  # b = 4 adds (4, 4), sqrt(1.5^2 + 4^2) from m_test*: a larger sum, a larger weight.
  four = support + [np.sqrt(1.5**2 + 4**2)]
  scores4, _ = spade_jax.patchcore_scores(test, bank, reweight_neighbors=4)
  np.testing.assert_allclose(np.asarray(scores4),
                             [(1 - np.exp(1.5) / np.sum(np.exp(four))) * 1.5], rtol=1e-6)
  # Without reweighting, the image score is s* itself.
  np.testing.assert_allclose(np.asarray(spade_jax.patchcore_scores(test, bank)[0]), [1.5])


def test_reweighting_does_not_overflow_for_large_distances():
  # exp(d) overflows float32 past d ~ 88; the weight is computed as a softmax.
  bank = np.array([[0, 0], [1, 0], [0, 2]], np.float32) * 100
  test = np.array([[[[250.0, 0.0]]]], np.float32)
  scores, _ = spade_jax.patchcore_scores(test, bank, reweight_neighbors=3)
  support = np.array([150.0, 250.0, np.hypot(250, 200)])
  expected = (1 - 1 / np.exp(support - 150.0).sum()) * 150.0
  np.testing.assert_allclose(np.asarray(scores), [expected], rtol=1e-6)


@pytest.mark.parametrize("b", [None, 5])
def test_sharded_bank_equals_single_device(b):
  test, bank = _data(seed=1, bank=43)  # 43 rows: padded to 48 over 8 devices.
  single = spade_jax.patchcore_scores(test, bank, k=2, reweight_neighbors=b)
  sharded_bank = spade_jax.shard_gallery(bank, _mesh(), MESH_AXIS)
  sharded = spade_jax.patchcore_scores(test, sharded_bank, k=2, reweight_neighbors=b)
  for a, c in zip(single, sharded):
    np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=1e-6, atol=1e-6)
  assert sharded[0].sharding.is_fully_replicated


def test_custom_metric_object():
  test, bank = _data(seed=2)
  scores, maps = spade_jax.patchcore_scores(test, bank, metric=distances.COSINE)
  ref_scores, ref_maps = reference_scores(test, bank, 1, "cosine")
  np.testing.assert_allclose(np.asarray(maps), ref_maps, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(scores), ref_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs,message", [
    ({"k": 0}, "k must be"), ({"k": 38}, "k must be"), ({"reweight_neighbors": 1}, "b = 1"),
    ({"reweight_neighbors": 38}, "reweight_neighbors"), ({"metric": "hamming"}, "metric"),
])
def test_validation(kwargs, message):
  test, bank = _data()
  with pytest.raises(ValueError, match=message):
    spade_jax.patchcore_scores(test, bank, **kwargs)


def test_bad_inputs():
  test, bank = _data()
  with pytest.raises(ValueError, match=r"test_patches must be a non-empty \[N, h, w, D\]"):
    spade_jax.patchcore_scores(test[0], bank)
  with pytest.raises(ValueError, match=r"bank must be \[B, D\]"):
    spade_jax.patchcore_scores(test, bank[None])
  with pytest.raises(ValueError, match="feature size mismatch"):
    spade_jax.patchcore_scores(test, bank[:, :5])
  with pytest.raises(ValueError, match="empty"):
    spade_jax.patchcore_scores(test, bank[:0])
  bad = test.copy()
  bad[0, 0, 0, 0] = np.inf
  with pytest.raises(ValueError, match="test_patches contains NaN or Inf"):
    spade_jax.patchcore_scores(bad, bank)


@pytest.mark.parametrize("metric", ["l2", "sqeuclidean", "cosine"])
@pytest.mark.parametrize("k,topk", [(1, 1), (1, 3), (2, 7), (3, 20)])
def test_topk_matches_reference(metric, k, topk):
  test, bank = _data(seed=3)  # 4 x 5 = 20 patches per image: topk=20 is their mean.
  scores, maps = spade_jax.patchcore_scores(test, bank, k=k, metric=metric, topk=topk)
  ref_scores, ref_maps = reference_scores(test, bank, k, metric, topk=topk)
  np.testing.assert_allclose(np.asarray(maps), ref_maps, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(scores), ref_scores, rtol=1e-5, atol=1e-5)


def test_topk_by_hand_and_its_limits():
  test, bank = _data(seed=4)
  _, maps = spade_jax.patchcore_scores(test, bank)
  patch = np.asarray(maps).reshape(3, -1)
  top1, _ = spade_jax.patchcore_scores(test, bank, topk=1)
  np.testing.assert_array_equal(np.asarray(top1), spade_jax.patchcore_scores(test, bank)[0])
  every, _ = spade_jax.patchcore_scores(test, bank, topk=20)
  np.testing.assert_allclose(np.asarray(every), patch.mean(1), rtol=1e-6)
  two, _ = spade_jax.patchcore_scores(test, bank, topk=2)
  np.testing.assert_allclose(np.asarray(two), np.sort(patch, 1)[:, -2:].mean(1), rtol=1e-6)
  # Ties count once each: two equal largest scores average to themselves.
  tied = np.zeros((1, 1, 3, 2), np.float32)
  tied[0, 0, :2] = [3.0, 4.0]  # Distances 5, 5, 0 to the bank's only row (0, 0).
  scores, _ = spade_jax.patchcore_scores(tied, np.zeros((1, 2), np.float32), topk=2)
  np.testing.assert_allclose(np.asarray(scores), [5.0], rtol=1e-6)


def test_topk_on_a_sharded_bank_equals_single_device():
  test, bank = _data(seed=5, bank=43)
  single = spade_jax.patchcore_scores(test, bank, k=2, topk=4)
  sharded = spade_jax.patchcore_scores(test, spade_jax.shard_gallery(bank, _mesh(), MESH_AXIS),
                                       k=2, topk=4)
  for a, c in zip(single, sharded):
    np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs,message", [
    ({"topk": 0}, r"topk must be None or an int in \[1, 20\] \(the patches per image"),
    ({"topk": 21}, r"\[1, 20\]"), ({"topk": 2.0}, "topk must be"), ({"topk": True}, "topk"),
    ({"topk": 2, "reweight_neighbors": 3}, "two image scores"),
])
def test_topk_validation(kwargs, message):
  test, bank = _data()
  with pytest.raises(ValueError, match=message):
    spade_jax.patchcore_scores(test, bank, **kwargs)
