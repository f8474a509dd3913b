"""Whole-image inspection from Python (issue 19): non-square inputs for every detector,
maps brought back to the photo's size, the geometry recorded in the index, sharded ==
one device, and evaluate's --crop=none path.

A tiny fake backbone (spade_fake_backbone) on 64 x 96 inputs; the references are
brute-force NumPy (a linear ramp, which bilinear interpolation reproduces exactly).
"""

import jax
from mvtec_fixtures import write_category
import numpy as np
import pytest
from spade_fake_backbone import FakeBackbone

import spade_jax
from spade_jax import evaluation
from spade_jax.data import mvtec
from spade_jax.detector import common, tiling
from spade_jax.evaluation import loop
from spade_jax.features import geometry, preprocessing

SIZE = (64, 96)  # (H, W): non-square, a multiple of the fake backbone's stride 32.
LAYERS = ("layer1", "layer2")


def smooth_images(n: int, seed: int, shape=(48, 72)) -> np.ndarray:
  """[n, H, W, 3] uint8: diagonal stripes with a little noise (normal images)."""
  rng = np.random.default_rng(seed)
  h, w = shape
  y, x = np.mgrid[:h, :w]
  base = 128 + 60 * np.sin((x + y) / 3.0)
  out = base[None, :, :, None] + rng.normal(0, 4, (n, h, w, 3))
  return np.clip(out, 0, 255).astype(np.uint8)


def with_corner_defect(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
  top, left, bottom, right = box
  out = image.copy()
  out[top:bottom, left:right] = (250, 20, 20)
  return out


DETECTORS = {
    "spade": lambda: spade_jax.Spade(FakeBackbone(), spade_jax.SpadeConfig(
        k_images=2, k_image_score=2, layers=LAYERS, crop=None, image_size=SIZE)),
    "patchcore": lambda: spade_jax.PatchCore(FakeBackbone(), spade_jax.PatchCoreConfig(
        layers=LAYERS, embed_dim=8, coreset_ratio=0.5, crop=None, image_size=SIZE)),
    "padim": lambda: spade_jax.Padim(FakeBackbone(), spade_jax.PadimConfig(
        layers=LAYERS, crop=None, image_size=SIZE)),
}


@pytest.fixture(name="data", scope="module")
def fixture_data():
  train = smooth_images(6, 0)
  good = smooth_images(1, 1)[0]
  box = (0, 60, 8, 72)  # The top-right corner: outside a centre crop of the 48 x 72 photo.
  return train, np.stack([good, with_corner_defect(smooth_images(1, 2)[0], box)]), box


@pytest.mark.parametrize("method", sorted(DETECTORS))
def test_every_detector_scores_non_square_images(method, data, tmp_path):
  train, test, box = data
  detector = DETECTORS[method]()
  index = detector.fit(train)
  scores, maps = detector.score(index, test)
  assert maps.shape == (2, *SIZE)
  assert scores[1] > scores[0]
  # The map, back at the photo's 48 x 72, peaks on the corner defect.
  full = geometry.to_original(maps[1], 48, 72, resize=256, crop=None)
  y, x = np.unravel_index(np.argmax(full), full.shape)
  top, left, bottom, right = box
  assert top - 4 <= y < bottom + 4 and left - 4 <= x < right + 4, (y, x)
  # The index records the whole-image geometry; a file round trip scores the same.
  assert '"crop": null' in index.feature_config and '"image_size": [64, 96]' in \
      index.feature_config
  spade_jax.save_index(tmp_path / "i.idx", index)
  loaded = spade_jax.load_index(tmp_path / "i.idx")
  again, _ = detector.score(loaded, test)
  np.testing.assert_allclose(again, scores, rtol=1e-5)
  # A cropped detector refuses it (another feature config).
  cropped = type(detector)(detector.backbone, detector.config.__class__(
      **{**_fields(detector.config), "crop": 64, "resize": 64, "image_size": None}))
  with pytest.raises(ValueError, match="the index was built for"):
    cropped.score(index, test)


def _fields(config) -> dict:
  import dataclasses  # pylint: disable=import-outside-toplevel
  return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


@pytest.mark.parametrize("method", sorted(DETECTORS))
def test_sharded_equals_single_device_on_non_square(method, data):
  train, test, _ = data
  detector = DETECTORS[method]()
  scores, maps = detector.score(detector.fit(train), test)
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  sharded_scores, sharded_maps = detector.score(detector.fit(train, mesh=mesh), test)
  np.testing.assert_allclose(sharded_scores, scores, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(sharded_maps, maps, rtol=1e-5, atol=1e-5)


def test_crop_none_needs_an_image_size():
  detector = spade_jax.Spade(FakeBackbone(), spade_jax.SpadeConfig(crop=None))
  with pytest.raises(ValueError, match=r"crop=None \(the whole image\) needs image_size"):
    detector.fit(smooth_images(2, 0))
  sized = common.with_whole_image_size(detector, 48, 72)
  assert sized.config.image_size == (256, 384) and sized.backbone is detector.backbone
  for bad, needle in [({"image_size": (64, 0)}, "image_size must be two positive ints"),
                      ({"crop": 224, "image_size": (64, 96)}, "it needs crop=None"),
                      ({"crop": 0}, "crop must be a positive int or None"),
                      ({"resize": -1}, "resize must be a positive int"),
                      ({"image_size": (16, 64)}, "smaller than the backbones' minimum")]:
    with pytest.raises(ValueError, match=needle):
      spade_jax.PatchCoreConfig(**{"crop": None, **bad})


def test_to_original_reproduces_a_linear_ramp():
  """Bilinear interpolation is exact on a linear function of the input coordinates."""
  a, b, c = 0.7, -0.3, 5.0
  for crop, (h, w), resize, size in [(None, (50, 70), 256, (64, 96)),
                                     (40, (45, 60), 48, (40, 40))]:
    i, j = np.mgrid[:size[0], :size[1]].astype(np.float64)
    ramp = a * i + b * j + c
    full = geometry.to_original(ramp, h, w, resize=resize, crop=crop)
    assert full.shape == (h, w)
    # Brute force: photo pixel centre -> resized image -> crop -> input coordinates.
    rh, rw = (size if crop is None else geometry.aspect_size(resize, h, w))
    top = 0 if crop is None else round((rh - crop) / 2)
    left = 0 if crop is None else round((rw - crop) / 2)
    y, x = np.mgrid[:h, :w].astype(np.float64)
    iy = (y + 0.5) * rh / h - 0.5 - top
    jx = (x + 0.5) * rw / w - 0.5 - left
    inside = (iy >= 0) & (iy <= size[0] - 1) & (jx >= 0) & (jx <= size[1] - 1)
    np.testing.assert_allclose(full[inside], (a * iy + b * jx + c)[inside], atol=1e-4)
    if crop is None:
      assert not np.isnan(full).any()
    else:  # The border the crop cut off is NaN: not inspected.
      outside = (iy < -0.5) | (iy > size[0] - 0.5) | (jx < -0.5) | (jx > size[1] - 0.5)
      assert outside.any() and np.isnan(full[outside]).all()


def test_preprocess_to_an_image_size():
  images = [smooth_images(1, 0, (30, 50))[0], smooth_images(1, 1, (50, 30))[0]]
  batch = preprocessing.preprocess(images, resize=None, crop=None, image_size=(40, 60))
  assert batch.shape == (2, 40, 60, 3)
  masks = preprocessing.preprocess_masks([np.ones((30, 50), bool)], crop=None,
                                         image_size=(40, 60))
  assert masks.shape == (1, 40, 60) and masks.all()
  assert geometry.aspect_size(256, 300, 400) == (256, 341)
  assert geometry.parse_image_size("256,384") == (256, 384)
  assert geometry.parse_crop("none") is None and geometry.parse_crop("224") == 224
  for text in ("256", "0,3", "a,b"):
    with pytest.raises(ValueError, match="--image_size must be H,W"):
      geometry.parse_image_size(text)
  with pytest.raises(ValueError, match="--crop must be a positive int or 'none'"):
    geometry.parse_crop("full")


def test_evaluate_category_without_crop(tmp_path):
  """evaluate's loop with crop=None: the first training image's size (aspect kept),
  masks and maps at that one resolution."""
  write_category(tmp_path, "alpha", size=(48, 32), n_train=4, n_good=2,
                 defects={"crack": 2}, seed=1)
  data = mvtec.load_category(tmp_path, "alpha")
  detector = DETECTORS["spade"]()
  detector = type(detector)(detector.backbone, detector.config.__class__(
      **{**_fields(detector.config), "resize": 64, "image_size": None}))
  result = loop.evaluate_category(detector, data, crop=None, resize=64, heatmap_dir=None,
                                  num_heatmaps=0, log=lambda _: None)
  assert 0 <= result["pixel_auroc"] <= 1 and 0 <= result["au_pro"] <= 1
  masks = preprocessing.preprocess_masks(data.test_masks, resize=64, crop=None,
                                         image_size=(64, 96))
  assert masks.shape[1:] == (64, 96) and masks.any()


def test_evaluate_category_with_tiles(tmp_path):
  """evaluate's loop with tiles: maps and masks at the images' own 64 x 96."""
  write_category(tmp_path, "alpha", size=(96, 64), n_train=3, n_good=2,
                 defects={"crack": 2}, seed=1)
  data = mvtec.load_category(tmp_path, "alpha")
  detector = DETECTORS["spade"]()
  result = loop.evaluate_category(detector, data, crop=None, resize=64, heatmap_dir=None,
                                  num_heatmaps=0, log=lambda _: None,
                                  tiles=tiling.TileConfig(32, 8))
  assert 0 <= result["pixel_auroc"] <= 1 and result["n_test"] == 4


def test_eval_config_records_geometry_only_when_not_the_default():
  default = evaluation.EvalConfig(data_dir="d").to_json()
  assert "image_size" not in default and "tile_size" not in default
  assert default["crop"] == 224
  whole = evaluation.EvalConfig(data_dir="d", crop=None, image_size=[64, 96]).to_json()
  assert whole["crop"] is None and whole["image_size"] == [64, 96]
  tiled = evaluation.EvalConfig(data_dir="d", crop=None, tile_size=256, tile_overlap=32)
  assert tiled.to_json()["tile_size"] == 256 and tiled.tiles.tile_overlap == 32
  assert "tile_position_weight" not in tiled.to_json()  # Off: recorded as before.
  placed = evaluation.EvalConfig(data_dir="d", crop=None, tile_size=256,
                                 tile_position_weight=2.0)
  assert placed.to_json()["tile_position_weight"] == 2.0
  assert placed.tiles.position_weight == 2.0
  with pytest.raises(ValueError, match="tile_position_weight is for SPADE and PatchCore"):
    evaluation.EvalConfig(data_dir="d", method="padim", crop=None, tile_size=256,
                          tile_position_weight=1.0)
  with pytest.raises(ValueError, match="it needs crop=None"):
    evaluation.EvalConfig(data_dir="d", tile_size=256)
  with pytest.raises(ValueError, match="tile_overlap=256 must be smaller"):
    evaluation.EvalConfig(data_dir="d", crop=None, tile_size=256, tile_overlap=256)
