"""Spade end to end with a tiny fake backbone; index save/load."""

import os

import numpy as np
import numpy_reference as reference
import pytest
from scipy import ndimage
from spade_fake_backbone import FakeBackbone
from test_anomaly_map import _bilinear_ref

import spade_jax
from spade_jax.detector import index_file

CONFIG = spade_jax.SpadeConfig(k_images=3, k_image_score=2, resize=72, crop=64,
                               batch_size=3, layers=("layer1", "layer2", "layer3"))


def _images(rng, n, defect=False):
  """Smooth normal textures; a defect is a bright square."""
  yy, xx = np.mgrid[:80, :80]
  out = []
  for _ in range(n):
    phase = np.array([0.0, 1.0, 2.0]) + rng.uniform(0, 0.05, 3)
    img = 128 + 60 * np.sin(xx[..., None] / 6.0 + phase) + rng.normal(0, 4, (80, 80, 3))
    if defect:
      y, x = rng.integers(20, 50, 2)
      img[y:y + 10, x:x + 10] = (255, 0, 255)
    out.append(np.clip(img, 0, 255).astype(np.uint8))
  return np.stack(out)


@pytest.fixture(scope="module")
def fitted():
  rng = np.random.default_rng(0)
  spade = spade_jax.Spade(FakeBackbone(), CONFIG)
  train = _images(rng, 7)
  test = np.concatenate([_images(rng, 3), _images(rng, 2, defect=True)])
  return spade, spade.fit(train), train, test


def test_index_layout(fitted):
  spade, index, train, _ = fitted
  assert isinstance(index, spade_jax.SpadeIndex)
  assert index.train_pool.shape == (7, 12)
  assert {l: v.shape for l, v in index.train_features.items()} == {
      "layer1": (7, 16, 16, 6), "layer2": (7, 8, 8, 8), "layer3": (7, 4, 4, 10)}
  assert index.backbone_name == "fake_pyramid" and index.num_images == 7
  # A pytree: the arrays are leaves, the metadata is static.
  import jax  # pylint: disable=import-outside-toplevel
  assert len(jax.tree_util.tree_leaves(index)) == 4
  doubled = jax.tree_util.tree_map(lambda x: 2 * x, index)
  assert doubled.feature_config == index.feature_config


@pytest.mark.parametrize("combine", ["ensemble", "cat"])
def test_score_matches_numpy_reference(fitted, combine):
  spade, index, train, test = fitted
  spade = spade_jax.Spade(spade.backbone, spade_jax.SpadeConfig(
      **{**CONFIG.__dict__, "combine": combine}))
  scores, maps = spade.score(index, test)
  assert scores.shape == (5,) and maps.shape == (5, 64, 64)
  assert isinstance(scores, np.ndarray) and isinstance(maps, np.ndarray)
  # Independent float64 reference from the same backbone features.
  from spade_jax.features.preprocessing import preprocess  # pylint: disable=import-outside-toplevel
  feats = spade.backbone(preprocess(test, resize=72, crop=64))
  feats = {k: np.asarray(v) for k, v in feats.items()}
  d = reference.distances(feats["pool"], np.asarray(index.train_pool), "l2")
  order = np.argsort(d, axis=1, kind="stable")
  np.testing.assert_allclose(scores, np.sort(d, 1)[:, :2].mean(1), rtol=1e-5, atol=1e-5)
  levels = CONFIG.layers
  score_maps = reference.pixel_scores({l: feats[l] for l in levels},
                          {l: np.asarray(index.train_features[l]) for l in levels},
                          order[:, :3], 1, combine, "l2")
  ref = np.stack([ndimage.gaussian_filter(m, 4.0, mode="reflect", truncate=4.0)
                  for m in _bilinear_ref(score_maps, 64, 64)])
  np.testing.assert_allclose(maps, ref, rtol=1e-4, atol=1e-4)


def test_defects_score_higher(fitted):
  spade, index, _, test = fitted
  scores, maps = spade.score(index, test)
  # (The fake backbone's 12-d pooled vector is too crude to rank whole images; the
  # pixel maps are what it can show.)
  assert scores.shape == (5,)
  # The defect (a bright square at (y - 8, x - 8) in the 64x64 crop) is hotter than
  # the rest of its map and than the same place in normal images.
  for img, m in zip(test[3:], maps[3:]):
    inside = (img[8:72, 8:72] == (255, 0, 255)).all(-1)
    assert m[inside].mean() > 2 * m[~inside].mean()
    assert m[inside].mean() > maps[:3, inside].max()


def test_save_load_roundtrip(fitted, tmp_path):
  spade, index, _, test = fitted
  path = tmp_path / "idx.spade"
  spade_jax.save_index(path, index)
  loaded = spade_jax.load_index(path, expect=spade)
  assert loaded.feature_config == index.feature_config
  np.testing.assert_array_equal(loaded.train_pool, index.train_pool)
  for l in CONFIG.layers:
    np.testing.assert_array_equal(loaded.train_features[l], index.train_features[l])
  np.testing.assert_array_equal(spade.score(loaded, test[:2])[1], spade.score(index, test[:2])[1])
  assert [p.name for p in tmp_path.iterdir()] == ["idx.spade"]


def test_load_refuses_other_backbone_or_config(fitted, tmp_path):
  spade, index, _, test = fitted
  path = tmp_path / "idx.spade"
  spade_jax.save_index(path, index)
  with pytest.raises(ValueError, match="built for"):
    spade_jax.load_index(path, expect=("wide_resnet50_2", CONFIG))
  other = spade_jax.SpadeConfig(**{**CONFIG.__dict__, "layers": ("layer1", "layer2")})
  with pytest.raises(ValueError, match="refit"):
    spade_jax.load_index(path, expect=("fake_pyramid", other))
  with pytest.raises(ValueError, match="refit"):
    spade_jax.Spade(FakeBackbone(name="other"), CONFIG).score(index, test[:1])
  # Scoring knobs do not change the stored features: accepted.
  knobs = spade_jax.SpadeConfig(**{**CONFIG.__dict__, "kappa": 2, "sigma": 2.0})
  spade_jax.load_index(path, expect=("fake_pyramid", knobs))


def test_save_is_atomic(fitted, tmp_path, monkeypatch):
  _, index, _, _ = fitted
  path = tmp_path / "idx.spade"
  spade_jax.save_index(path, index)
  before = path.read_bytes()

  def interrupted(tensors, tmp, metadata):
    with open(tmp, "wb") as f:
      f.write(b"partial")
    raise KeyboardInterrupt  # e.g. Ctrl-C halfway through the write.

  monkeypatch.setattr(index_file, "_save_file", interrupted)
  with pytest.raises(KeyboardInterrupt):
    spade_jax.save_index(path, index)
  assert path.read_bytes() == before  # Old index intact ...
  assert os.listdir(tmp_path) == ["idx.spade"]  # ... and no temporary left behind.
  fresh = tmp_path / "new.spade"
  with pytest.raises(KeyboardInterrupt):
    spade_jax.save_index(fresh, index)
  assert not fresh.exists()


def test_save_errors(fitted, tmp_path):
  _, index, _, _ = fitted
  with pytest.raises(ValueError, match="does not exist"):
    spade_jax.save_index(tmp_path / "missing" / "idx.spade", index)
  with pytest.raises(ValueError, match="SpadeIndex"):
    spade_jax.save_index(tmp_path / "idx.spade", {"pool": 1})
  with pytest.raises(ValueError, match="no index file"):
    spade_jax.load_index(tmp_path / "nothing.spade")
  (tmp_path / "junk.spade").write_bytes(b"\x00" * 20)
  with pytest.raises(ValueError, match="not a readable"):
    spade_jax.load_index(tmp_path / "junk.spade")


def test_bad_input(fitted):
  spade, index, train, test = fitted
  with pytest.raises(ValueError, match="train_images is empty"):
    spade.fit(train[:0])
  with pytest.raises(ValueError, match="k_images=3 is larger than the number of training"):
    spade.fit(train[:2])
  small = spade_jax.SpadeConfig(**{**CONFIG.__dict__, "k_images": 8})
  with pytest.raises(ValueError, match="k_images=8"):
    spade_jax.Spade(spade.backbone, small).score(index, test[:1])
  with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
    spade.score(index, test[0])
  with pytest.raises(ValueError, match="no features"):
    spade_jax.Spade(spade.backbone, spade_jax.SpadeConfig(layers=("layer9",)))


@pytest.mark.parametrize("field,value", [
    ("k_images", 0), ("kappa", -1), ("combine", "sum"), ("metric", "hamming"),
    ("layers", ()), ("sigma", -1.0), ("sigma", float("inf")), ("sigma", float("nan")),
    ("sigma", 1e6), ("crop", 300), ("batch_size", 1.5)])
def test_config_validation(field, value):
  with pytest.raises(ValueError, match=field):
    spade_jax.SpadeConfig(**{field: value})
