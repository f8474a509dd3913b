"""The decision threshold calibrated on normal images (spade_jax.detector.calibration),
against a brute-force NumPy cross-validation, and stored in index files."""

import json

import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy
from spade_fake_backbone import FakeBackbone

import spade_jax
from spade_jax.detector import calibration, index_file


def _spade(**overrides):
  config = {"k_images": 2, "k_image_score": 3, "layers": ("layer1",), "resize": 32,
            "crop": 32, "batch_size": 4, **overrides}
  return spade_jax.Spade(FakeBackbone(), spade_jax.SpadeConfig(**config))


def _reference_held_out(pool: np.ndarray, k: int, folds: int, metric: str) -> np.ndarray:
  """Each image's mean distance to its k nearest images outside its fold (float64)."""
  pool = pool.astype(np.float64)
  if metric == "cosine":
    unit = pool / np.linalg.norm(pool, axis=1, keepdims=True)
    dist = 1.0 - unit @ unit.T
  else:
    dist = np.sqrt(((pool[:, None] - pool[None]) ** 2).sum(-1))
  scores = np.empty(len(pool))
  for fold in np.array_split(np.arange(len(pool)), folds):
    others = np.setdiff1d(np.arange(len(pool)), fold)
    for i in fold:
      scores[i] = np.sort(dist[i, others])[:k].mean()
  return scores


@pytest.mark.parametrize("folds, metric", [(None, "l2"), (3, "l2"), (4, "cosine"), (50, "l2")])
def test_threshold_matches_brute_force_cross_validation(folds, metric):
  rng = np.random.default_rng(0)
  pool = rng.standard_normal((11, 16)).astype(np.float32)
  spade = _spade(metric=metric)
  threshold, scores = calibration.spade_threshold(spade, pool, quantile=0.9, folds=folds)
  used = 11 if folds is None else min(folds, 11)
  expected = _reference_held_out(pool, 3, used, metric)
  np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
  assert threshold.value == pytest.approx(np.quantile(expected, 0.9), rel=1e-5)
  assert (threshold.folds, threshold.num_images, threshold.quantile) == (used, 11, 0.9)
  assert threshold.settings == {"k_image_score": 3, "metric": metric, "aggregate": "mean",
                                "bandwidth": None}


def test_threshold_from_fitted_index_pool():
  rng = np.random.default_rng(1)
  spade = _spade(k_image_score=1)
  index = spade.fit(rng.integers(0, 256, (6, 32, 32, 3), np.uint8))
  threshold, scores = calibration.spade_threshold(spade, np.asarray(index.train_pool),
                                                  quantile=1.0)
  assert threshold.value == pytest.approx(scores.max())
  # Leave-one-out: no image is scored against itself (its own distance would be 0).
  assert np.all(scores > 0)


@pytest.mark.parametrize("kwargs, match", [
    ({"quantile": 1.5}, "quantile"), ({"quantile": float("nan")}, "quantile"),
    ({"folds": 1}, "folds"), ({"folds": 2.5}, "folds"),
    ({"folds": 2, "k": 3, "n": 5}, "as few as 2 of the 5"),
    ({"n": 1}, "at least 2"),
])
def test_bad_calibration_arguments(kwargs, match):
  n, k = kwargs.pop("n", 5), kwargs.pop("k", 1)
  args = {"quantile": 0.99, "folds": None, **kwargs}
  with pytest.raises(ValueError, match=match):
    calibration.check_calibration_args(n, args["quantile"], args["folds"], k)


def _threshold(**overrides):
  fields = {"value": 1.5, "quantile": 0.99, "folds": 4, "num_images": 8,
            "settings": {"k_image_score": 5, "metric": "l2"}, **overrides}
  return calibration.Threshold(**fields)


def test_threshold_json_round_trip_and_conflicts():
  t = _threshold()
  assert calibration.Threshold.from_json(t.to_json(), "here") == t
  assert t.conflicts({"k_image_score": 5, "metric": "cosine", "kappa": 3}) == {
      "metric": ("l2", "cosine")}


@pytest.mark.parametrize("text", [
    "nope", "[]", '{"value": 1}',
    json.dumps({**json.loads(_threshold().to_json()), "value": float("inf")}),
    json.dumps({**json.loads(_threshold().to_json()), "folds": 1}),
    json.dumps({**json.loads(_threshold().to_json()), "folds": 9}),
    json.dumps({**json.loads(_threshold().to_json()), "quantile": 2}),
    json.dumps({**json.loads(_threshold().to_json()), "settings": []}),
    json.dumps({**json.loads(_threshold().to_json()), "extra": 1}),
])
def test_malformed_threshold_json_is_refused(text):
  with pytest.raises(ValueError, match="^here: metadata field 'threshold'"):
    calibration.Threshold.from_json(text, "here")


@pytest.fixture(name="index")
def fixture_index():
  spade = _spade(k_image_score=1)
  return spade.fit(np.random.default_rng(2).integers(0, 256, (4, 32, 32, 3), np.uint8))


def test_index_file_stores_the_threshold(tmp_path, index):
  path = tmp_path / "a.spade"
  spade_jax.save_index(path, index)
  assert index_file.load_index_file(path).threshold is None  # Optional.
  spade_jax.save_index(path, index, threshold=_threshold())
  loaded, threshold, _ = index_file.load_index_file(path)
  assert threshold == _threshold()
  np.testing.assert_array_equal(loaded.train_pool, index.train_pool)
  assert isinstance(spade_jax.load_index(path), spade_jax.SpadeIndex)


def test_edited_threshold_fails_the_metadata_checksum(tmp_path, index):
  path = tmp_path / "a.spade"
  spade_jax.save_index(path, index, threshold=_threshold())
  tensors = safetensors_numpy.load_file(str(path))
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  with safe_open(str(path), framework="numpy") as f:
    metadata = dict(f.metadata())
  metadata["threshold"] = _threshold(value=99.0).to_json()  # A looser threshold.
  safetensors_numpy.save_file(tensors, str(path), metadata=metadata)
  with pytest.raises(ValueError, match="checksum"):
    spade_jax.load_index(path)


def test_save_index_refuses_a_bad_threshold(tmp_path, index):
  with pytest.raises(ValueError, match="threshold must be"):
    spade_jax.save_index(tmp_path / "a.spade", index, threshold=1.5)
  with pytest.raises(ValueError, match="quantile"):
    spade_jax.save_index(tmp_path / "a.spade", index, threshold=_threshold(quantile=3.0))
  assert not (tmp_path / "a.spade").exists()


def test_index_file_stores_the_fit_settings(tmp_path, index):
  path = tmp_path / "a.spade"
  settings = {"k_images": 3, "layers": ["layer1"], "weights": "none", "sigma": 4.0}
  spade_jax.save_index(path, index, settings=settings)
  contents = index_file.load_index_file(path)
  assert contents.settings == settings and contents.threshold is None
  assert index_file.load_index_file(tmp_path / "a.spade").index.num_images == 4
  with pytest.raises(ValueError, match="settings must be JSON"):
    spade_jax.save_index(tmp_path / "b.spade", index, settings={"x": object()})
  with pytest.raises(ValueError, match="settings must be JSON"):
    spade_jax.save_index(tmp_path / "b.spade", index, settings={"x": float("nan")})
  with pytest.raises(ValueError, match="'settings' must be a JSON object"):
    spade_jax.save_index(tmp_path / "b.spade", index, settings=[1, 2])
  assert not (tmp_path / "b.spade").exists()
