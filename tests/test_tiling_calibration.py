"""Tiled detectors (issue 19): calibration on tiles and the tile position feature.

* fit_folder --calibrate with tiles: folds of whole images, an image's held-out score
  the max over its tiles; the threshold equals a brute-force recomputation (per fold,
  Tiled.fit on the other images and Tiled.score of the held-out ones, as predict does).
* TileConfig.position_weight (fit.py --tile_position_weight): off by default (the
  features and scores are the detector's own), it appends the tiles' normalised
  centres, the index stores them (and its settings record the weight), and on a
  constructed example it makes a tile's nearest training tile the one at its place.

A tiny fake backbone (spade_fake_backbone); 128 x 192 images in 64-pixel tiles.
"""

import numpy as np
import PIL.Image
import pytest
from spade_fake_backbone import FakeBackbone
from test_whole_image import smooth_images

import spade_jax
from spade_jax.detector import calibration, load_index_file, tiling
from spade_jax.evaluation import folders

SHAPE = (128, 192)
LAYERS = ("layer1", "layer2")


def make(method: str):
  if method == "spade":
    return spade_jax.Spade(FakeBackbone(), spade_jax.SpadeConfig(
        k_images=2, k_image_score=2, layers=LAYERS, crop=None, batch_size=8))
  return spade_jax.PatchCore(FakeBackbone(), spade_jax.PatchCoreConfig(
      layers=LAYERS, embed_dim=8, coreset_ratio=0.5, crop=None, batch_size=8))


def write_folder(path, images):
  path.mkdir(parents=True)
  for i, image in enumerate(images):
    PIL.Image.fromarray(image).save(path / f"{i:02d}.png")
  return path


@pytest.mark.slow
@pytest.mark.parametrize("method,folds", [("spade", None), ("patchcore", 3)])
def test_tiled_calibration_equals_brute_force_per_fold(tmp_path, method, folds):
  images = smooth_images(5, 3, SHAPE)
  images[2, 10:30, 150:170] = (250, 20, 20)  # One odd training image: a high score.
  tiles = tiling.TileConfig(64, 16)
  report = folders.fit_folder(make(method), write_folder(tmp_path / "train", images),
                              tmp_path / "x.spade", calibrate=True, quantile=0.75,
                              folds=folds, tiles=tiles, log=lambda _: None)
  t = report.threshold
  n = len(images)
  assert (t.num_images, t.folds) == (n, n if folds is None else folds)
  per_image = len(tiling.tile_boxes(*SHAPE, tiles))
  assert report.num_images == n * per_image  # The index holds tiles.
  # Brute force: folds of whole images in file order, each scored as predict does.
  tiled = tiling.Tiled(make(method), tiles)
  expected = np.zeros(n)
  for held in np.array_split(np.arange(n), t.folds):
    train = np.setdiff1d(np.arange(n), held)
    expected[held] = tiled.score(tiled.fit(images[train]), images[held])[0]
  np.testing.assert_allclose(report.held_out_scores, expected, rtol=1e-5)
  np.testing.assert_allclose(t.value, np.quantile(expected, 0.75), rtol=1e-5)
  assert load_index_file(tmp_path / "x.spade").threshold == t


def test_tiled_folds_never_split_an_image_and_count_tiles():
  groups = calibration.image_groups([3, 3, 3, 3])
  seen = []

  def score_fold(train, held):
    assert not set(groups[train]) & set(groups[held])  # Whole images only.
    seen.append(sorted(set(groups[held])))
    return held.astype(float)  # Row index as score: an image's max is its last row.

  scores = calibration.held_out_scores(score_fold, 4, 2, groups)
  assert seen == [[0, 1], [2, 3]]
  np.testing.assert_array_equal(scores, [2, 5, 8, 11])
  spade = make("spade")
  assert calibration.grouped_folds(spade, groups) == 4  # SPADE: leave-one-out of images.
  # 2 images of 1 tile, k_image_score=2: a fold holds 1 training tile.
  with pytest.raises(ValueError, match="as few as 1 of the 2 training tiles"):
    calibration.grouped_folds(spade, calibration.image_groups([1, 1]))


@pytest.mark.slow
def test_position_feature_is_off_by_default():
  assert tiling.TileConfig(64).position_weight == 0
  assert "tile_position_weight" not in tiling.TileConfig(64).settings()
  images = smooth_images(2, 4, SHAPE)
  tiled = tiling.Tiled(make("spade"), tiling.TileConfig(64, 16))
  (pool, levels), counts = tiled.extract(images)
  plain_pool, plain_levels = tiled.detector.extract(tiled.training_tiles(images))
  np.testing.assert_array_equal(pool, plain_pool)
  assert levels["layer1"].shape == plain_levels["layer1"].shape
  assert counts == [len(tiling.tile_boxes(*SHAPE, tiled.tiles))] * 2
  with pytest.raises(ValueError, match="tile_position_weight must be a finite number"):
    tiling.TileConfig(64, position_weight=-1.0)
  padim = spade_jax.Padim(FakeBackbone(), spade_jax.PadimConfig(layers=LAYERS, crop=None))
  with pytest.raises(ValueError, match="tile_position_weight is for SPADE and PatchCore"):
    tiling.Tiled(padim, tiling.TileConfig(64, position_weight=1.0))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["spade", "patchcore"])
def test_position_feature_matches_tiles_at_the_same_place(tmp_path, method):
  """Images whose tiles all look alike (one flat gray): without positions a test tile's
  features tie with every training tile's; with positions its nearest training tile
  (pooled feature for SPADE's image kNN, a patch feature for PatchCore's bank) is the
  one at its own place, and the index stores the appended features."""
  images = np.full((3, *SHAPE, 3), 128, np.uint8)
  weight = 100.0
  tiles = tiling.TileConfig(64, 16, position_weight=weight)
  tiled = tiling.Tiled(make(method), tiles)
  boxes = tiling.tile_boxes(*SHAPE, tiles)
  centres = tiling.tile_positions(*SHAPE, boxes, 64)
  np.testing.assert_allclose(centres[0], [0.25, 1 / 6])
  np.testing.assert_allclose(centres[-1], [0.75, 5 / 6])

  def rows(features):
    return features[0] if method == "spade" else features[:, 0, 0, :]

  train, counts = tiled.extract(images[:2])
  test, _ = tiled.extract(images[2:])
  assert counts == [len(boxes)] * 2
  np.testing.assert_allclose(rows(test)[:, -2:], weight * centres, rtol=1e-6)
  d = ((rows(test)[:, None, :] - rows(train)[None, :, :]) ** 2).sum(-1)
  nearest = np.argmin(d, axis=1) % len(boxes)  # The place of the nearest training tile.
  np.testing.assert_array_equal(nearest, np.arange(len(boxes)))
  plain = rows(train)[:, :-2]
  assert np.ptp(plain, axis=0).max() < 1e-5  # Without positions: every tile alike.
  # The index (fit_folder) stores the appended features and records the weight.
  report = folders.fit_folder(make(method), write_folder(tmp_path / "t", images[:2]),
                              tmp_path / "p.spade", tiles=tiles, log=lambda _: None)
  contents = load_index_file(report.index_path)
  assert contents.settings["tile_position_weight"] == weight
  stored = contents.index.train_pool if method == "spade" else contents.index.bank
  assert np.shape(stored)[-1] == rows(train).shape[-1]
  scores, maps = tiling.Tiled(make(method), tiles).score(contents.index, images[2:])
  assert np.isfinite(scores).all() and maps[0].shape == SHAPE
