"""Image and pixel scores vs an independent float64 NumPy reference of the equations."""

import numpy as np
import numpy_reference as reference
import pytest

from spade_jax import scoring

# Distances are recomputed exactly (difference form) in float32 from float32 features
# of magnitude ~1; the float64 reference then agrees to a few float32 ulps of the
# distance; bilinear averaging adds a few more roundings.
RTOL, ATOL = 1e-5, 1e-5


def _pyramid(rng, n, sizes=((8, 8, 4), (4, 4, 6), (2, 2, 5))):
  return {f"layer{i + 1}": rng.standard_normal((n,) + s).astype(np.float32)
          for i, s in enumerate(sizes)}


@pytest.mark.parametrize("metric", ["l2", "sqeuclidean", "cosine"])
@pytest.mark.parametrize("k,num_neighbors", [(1, None), (3, None), (2, 5), (7, 7)])
def test_image_scores_match_reference(metric, k, num_neighbors, search_path):
  rng = np.random.default_rng(0)
  test = rng.standard_normal((6, 16)).astype(np.float32)
  train = rng.standard_normal((9, 16)).astype(np.float32)
  scores, idx = scoring.image_scores(test, train, k, metric, num_neighbors=num_neighbors)
  ref = reference.distances(test, train, metric)
  order = np.argsort(ref, axis=1, kind="stable")
  np.testing.assert_allclose(scores, np.sort(ref, 1)[:, :k].mean(1), rtol=RTOL, atol=ATOL)
  np.testing.assert_array_equal(idx, order[:, :num_neighbors or k])


@pytest.mark.parametrize("combine", ["ensemble", "cat"])
@pytest.mark.parametrize("kappa,chunk,batch,metric", [
    (1, None, 1, "l2"), (3, 2, 2, "l2"), (1, 3, 3, "sqeuclidean"), (2, 1, 1, "cosine")])
def test_pixel_scores_match_reference(combine, kappa, chunk, batch, metric, search_path):
  rng = np.random.default_rng(1)
  test, train = _pyramid(rng, 3), _pyramid(rng, 7)
  # K = 5 images, chunk sizes 2 and 3 leave a tail; nbrs need not be sorted.
  nbrs = np.stack([rng.permutation(7)[:5] for _ in range(3)]).astype(np.int32)
  got = scoring.pixel_scores(test, train, nbrs, kappa=kappa, combine=combine,
                             metric=metric, images_per_chunk=chunk, test_batch_size=batch)
  ref = reference.pixel_scores(test, train, nbrs, kappa, combine, metric)
  assert got.shape == (3, 8, 8)
  np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("blocking", ["gpu", "tpu"])
@pytest.mark.parametrize("combine,kappa,chunk", [("ensemble", 1, None), ("ensemble", 3, 2),
                                                 ("cat", 2, None)])
def test_pixel_scores_accelerator_blockings_match_reference(blocking, combine, kappa, chunk):
  # The GPU / TPU blockings (neighbors.BLOCKINGS: all positions per block, lax.top_k on
  # GPUs), forced on this CPU: the same scores as the reference.
  rng = np.random.default_rng(1)
  test, train = _pyramid(rng, 3), _pyramid(rng, 7)
  nbrs = np.stack([rng.permutation(7)[:5] for _ in range(3)]).astype(np.int32)
  got = scoring.pixel_scores(test, train, nbrs, kappa=kappa, combine=combine,
                             images_per_chunk=chunk, blocking=blocking)
  ref = reference.pixel_scores(test, train, nbrs, kappa, combine, "l2")
  np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)
  with pytest.raises(ValueError, match="blocking"):
    scoring.pixel_scores(test, train, nbrs, blocking="fast")


def test_pixel_scores_single_level_non_square():
  rng = np.random.default_rng(2)
  test = {"a": rng.standard_normal((2, 3, 5, 4)).astype(np.float32)}
  train = {"a": rng.standard_normal((4, 3, 5, 4)).astype(np.float32)}
  nbrs = np.array([[0, 1], [3, 2]], np.int32)
  for combine in ("ensemble", "cat"):
    got = scoring.pixel_scores(test, train, nbrs, combine=combine)
    np.testing.assert_allclose(got, reference.pixel_scores(test, train, nbrs, 1, combine, "l2"),
                               rtol=RTOL, atol=ATOL)


def test_pixel_score_of_training_image_is_zero():
  # A test image equal to a training image is at distance 0 from itself everywhere.
  rng = np.random.default_rng(3)
  train = _pyramid(rng, 4)
  test = {l: f[2:3] for l, f in train.items()}
  got = scoring.pixel_scores(test, train, np.array([[2, 0]], np.int32), combine="cat")
  np.testing.assert_allclose(got, 0.0, atol=1e-6)


def _errors_case():
  rng = np.random.default_rng(4)
  return _pyramid(rng, 2), _pyramid(rng, 3), np.array([[0, 1], [2, 1]], np.int32)


@pytest.mark.parametrize("mutate,match", [
    (lambda te, tr, nb: (te, tr, np.zeros((2, 4), np.int32)), "K=4"),
    (lambda te, tr, nb: (te, {l: f[:0] for l, f in tr.items()}, nb[:, :0]), "empty"),
    (lambda te, tr, nb: (te, {}, nb), "empty training set"),
    (lambda te, tr, nb: (te, {**tr, "layer2": tr["layer2"][..., :3]}, nb), "differ"),
    (lambda te, tr, nb: (te, {"layer1": tr["layer1"]}, nb), "levels"),
    (lambda te, tr, nb: (te, tr, nb + 5), r"\[0, 3\)"),
    (lambda te, tr, nb: (te, tr, nb[:1]), "neighbor_indices"),
    (lambda te, tr, nb: ({**te, "layer3": te["layer3"] * np.nan}, tr, nb), "NaN"),
    (lambda te, tr, nb: (te, {**tr, "layer1": tr["layer1"] * np.inf}, nb), "NaN or Inf"),
])
def test_pixel_scores_bad_input(mutate, match):
  te, tr, nb = mutate(*_errors_case())
  with pytest.raises(ValueError, match=match):
    scoring.pixel_scores(te, tr, nb)


def test_pixel_scores_bad_kappa_and_combine():
  te, tr, nb = _errors_case()
  with pytest.raises(ValueError, match="kappa"):
    scoring.pixel_scores(te, tr, nb, kappa=2 * 2 * 2 + 1)  # > K * smallest level.
  with pytest.raises(ValueError, match="combine"):
    scoring.pixel_scores(te, tr, nb, combine="sum")


@pytest.mark.parametrize("k,match", [(4, "k must be"), (0, "k must be")])
def test_image_scores_bad_k(k, match):
  rng = np.random.default_rng(5)
  with pytest.raises(ValueError, match=match):
    scoring.image_scores(rng.standard_normal((2, 3)), rng.standard_normal((3, 3)), k)


def test_image_scores_bad_input():
  rng = np.random.default_rng(6)
  a = rng.standard_normal((2, 3)).astype(np.float32)
  with pytest.raises(ValueError, match="empty"):
    scoring.image_scores(a, np.zeros((0, 3), np.float32), 1)
  with pytest.raises(ValueError, match="mismatch"):
    scoring.image_scores(a, np.zeros((4, 5), np.float32), 1)
  with pytest.raises(ValueError, match="test_pool contains NaN"):
    scoring.image_scores(a * np.nan, a, 1)
  with pytest.raises(ValueError, match="num_neighbors"):
    scoring.image_scores(a, a, 1, num_neighbors=3)


@pytest.mark.parametrize("combine", ["ensemble", "cat"])
def test_scores_exact_on_features_with_a_large_common_offset(combine, search_path):
  # Every feature + 1e4 (as after an unnormalised layer): the search is translated
  # (neighbors.search_center), so scores still equal the float64 reference, and a
  # test image equal to a training image still scores 0 everywhere.
  rng = np.random.default_rng(4)
  test, train = _pyramid(rng, 3), _pyramid(rng, 7)
  test = {l: f + np.float32(1e4) for l, f in test.items()}
  train = {l: f + np.float32(1e4) for l, f in train.items()}
  test["layer1"][0] = train["layer1"][4]
  test["layer2"][0] = train["layer2"][4]
  test["layer3"][0] = train["layer3"][4]
  nbrs = np.stack([rng.permutation(7)[:5] for _ in range(3)]).astype(np.int32)
  nbrs[0, 2] = 4
  got = scoring.pixel_scores(test, train, nbrs, combine=combine)
  # "cat" first resizes every level to the finest grid in float32: each interpolated
  # value ~1e4 is rounded to u * 1e4 (u = 2^-24), so its distances (D = 15) carry an
  # absolute error up to a few sqrt(D) u 1e4 ~ 1e-2 against the float64 reference.
  # An untranslated search is off by ~5 here.
  atol = 8 * np.sqrt(15) * 2.0 ** -24 * 1e4 if combine == "cat" else ATOL
  np.testing.assert_allclose(got, reference.pixel_scores(test, train, nbrs, 1, combine, "l2"),
                             rtol=RTOL, atol=atol)
  # Ensemble compares raw features: exactly 0. "cat" resizes test and training levels
  # with two implementations of the same bilinear (whole map vs gathered taps), which
  # may round 1e4-sized values 1 ulp (~1e-3) apart.
  np.testing.assert_allclose(got[0], 0.0, atol=0.0 if combine == "ensemble" else atol)
  pool_test = test["layer3"].mean((1, 2))
  pool_train = train["layer3"].mean((1, 2))
  scores, idx = scoring.image_scores(pool_test, pool_train, 2)
  ref = reference.distances(pool_test, pool_train, "l2")
  np.testing.assert_allclose(scores, np.sort(ref, 1)[:, :2].mean(1), rtol=RTOL, atol=ATOL)
  assert idx[0, 0] == 4


def test_pixel_scores_refuse_complex_features():
  rng = np.random.default_rng(5)
  test, train = _pyramid(rng, 2), _pyramid(rng, 3)
  test["layer2"] = test["layer2"] + 1j
  with pytest.raises(ValueError, match=r"test_features\['layer2'\] must hold real numbers"):
    scoring.pixel_scores(test, train, np.array([[0], [1]], np.int32))
