"""A threshold, an index or a flag is never silently misapplied (issue 17, items 1-4, 15):

- a calibrated threshold holds only for the scoring settings it was calibrated with,
  checked in the library (Threshold.check / anomalous, predict_folder);
- PatchCore's threshold records everything its image scores depend on;
- an index records the identity of the backbone's weights, and scoring or loading it
  with other weights is refused;
- a calibration's folds are decided (and checked) before any work;
- a flag that the chosen method does not read is an error.
"""

import pathlib
import sys

import numpy as np
import PIL.Image
import pytest
from safetensors import numpy as safetensors_numpy
from safetensors import safe_open
from spade_fake_backbone import FakeBackbone
from test_fit_predict import assert_clean_error, run_script

import spade_jax
from spade_jax.detector import calibration, index_file
from spade_jax.evaluation import folders
from spade_jax.features.backbones import load as backbone_load

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))
import detector_flags  # noqa: E402  (the scripts' module, beside them)

SPADE = {"k_images": 2, "k_image_score": 2, "layers": ("layer1",), "resize": 32, "crop": 32,
         "batch_size": 4}
PATCHCORE = {"layers": ("layer1", "layer2"), "resize": 32, "crop": 32, "batch_size": 4,
             "coreset_ratio": 0.5, "embed_dim": None}


def _images(n: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), np.uint8)


def _spade(seed: int = 0, **overrides) -> spade_jax.Spade:
  return spade_jax.Spade(FakeBackbone(seed=seed), spade_jax.SpadeConfig(**{**SPADE,
                                                                         **overrides}))


def _patchcore(seed: int = 0, **overrides) -> spade_jax.PatchCore:
  return spade_jax.PatchCore(FakeBackbone(seed=seed),
                             spade_jax.PatchCoreConfig(**{**PATCHCORE, **overrides}))


def _write_folder(folder: pathlib.Path, images: np.ndarray) -> pathlib.Path:
  folder.mkdir(parents=True, exist_ok=True)
  for i, image in enumerate(images):
    PIL.Image.fromarray(image).save(folder / f"{i:02d}.png")
  return folder


# 1. The threshold's settings are checked by the library, for every caller.


@pytest.fixture(name="calibrated", scope="module")
def fixture_calibrated():
  spade = _spade()
  pool, _ = spade.extract(_images(6))
  threshold, held_out = calibration.spade_threshold(spade, pool, quantile=0.5)
  return spade, threshold, held_out


def test_threshold_holds_for_its_scoring_settings_only(calibrated):
  spade, threshold, _ = calibrated
  threshold.check(spade.config)  # Its own settings.
  threshold.check(_spade(k_images=3, kappa=2, sigma=1.0).config)  # Pixel settings only.
  for change in ({"k_image_score": 3}, {"metric": "cosine"},
                 {"aggregate": "softmin", "bandwidth": 0.5}):
    with pytest.raises(ValueError, match=f"{next(iter(change))}=.*calibrated with"):
      threshold.check(_spade(**change).config, "here")
  with pytest.raises(ValueError, match="another detector"):
    threshold.check(_patchcore().config)


def test_threshold_anomalous_checks_before_it_decides(calibrated):
  spade, threshold, held_out = calibrated
  np.testing.assert_array_equal(threshold.anomalous(held_out, spade.config),
                                held_out > threshold.value)
  with pytest.raises(ValueError, match="k_image_score=1"):
    threshold.anomalous(held_out, _spade(k_image_score=1).config)


def test_an_older_threshold_without_aggregate_is_a_mean_threshold():
  old = calibration.Threshold(value=1.0, quantile=0.9, folds=2, num_images=4,
                              settings={"k_image_score": 2, "metric": "l2"})
  old.check(_spade().config)
  with pytest.raises(ValueError, match="aggregate='kde'"):
    old.check(_spade(aggregate="kde").config)


def test_predict_folder_refuses_a_threshold_of_other_settings(calibrated, tmp_path):
  spade, threshold, _ = calibrated
  index = spade.fit(_images(6))
  images = _write_folder(tmp_path / "images", _images(2, seed=1))
  out = tmp_path / "out"
  with pytest.raises(ValueError, match="k_image_score=3 .calibrated with 2."):
    folders.predict_folder(_spade(k_image_score=3), index, images, out, threshold=threshold)
  assert not out.exists()  # Refused before any work.
  report = folders.predict_folder(spade, index, images, out, threshold=threshold,
                                  write_heatmaps=False, num_summary=0)
  assert len(report.scores) == 2


# 2. PatchCore's threshold records what changes its image scores.


def test_patchcore_threshold_records_what_changes_its_scores():
  detector = _patchcore(reweight=True, num_neighbors=3, k_nearest=2)
  patches = detector.extract(_images(6))
  threshold, _ = calibration.patchcore_threshold(detector, patches, folds=3)
  assert threshold.settings == {"metric": "l2", "k_nearest": 2, "reweight": True,
                                "num_neighbors": 3, "coreset_ratio": 0.5,
                                "projection_dim": 128, "coreset_seed": 0, "patch_size": 3,
                                "topk": None}
  threshold.check(detector.config)
  index = detector.fit_features(patches)
  test = detector.extract(_images(3, seed=9))
  reference, _ = detector.score_features(index, test)
  for change in ({"k_nearest": 1}, {"reweight": False}, {"num_neighbors": 4}):
    other = _patchcore(**{"reweight": True, "num_neighbors": 3, "k_nearest": 2, **change})
    with pytest.raises(ValueError, match=f"{next(iter(change))}="):
      threshold.check(other.config)
    scores, _ = other.score_features(index, test)  # Each of them changes the scores.
    assert not np.allclose(scores, reference)


# 3. The weights' identity is part of the index.


def test_index_records_the_weights_and_refuses_others(tmp_path):
  spade = _spade()
  index = spade.fit(_images(4))
  assert index.weights_id == FakeBackbone(seed=0).weights_id != FakeBackbone(seed=1).weights_id
  path = tmp_path / "a.spade"
  spade_jax.save_index(path, index)
  loaded = spade_jax.load_index(path, expect=spade)
  assert loaded.weights_id == index.weights_id
  assert loaded.fingerprint == index.fingerprint
  other = _spade(seed=1)
  with pytest.raises(ValueError, match="other fake_pyramid weights"):
    other.score(loaded, _images(1))
  with pytest.raises(ValueError, match="other fake_pyramid weights"):
    spade_jax.load_index(path, expect=other)
  with pytest.raises(ValueError, match="other fake_pyramid weights"):
    folders.predict_folder(other, loaded, _write_folder(tmp_path / "images", _images(1)),
                           tmp_path / "out")
  scores, _ = spade.score(loaded, _images(1))  # The same weights are fine.
  assert np.isfinite(scores).all()


def test_patchcore_index_records_the_weights(tmp_path):
  detector = _patchcore()
  index = detector.fit(_images(4))
  path = tmp_path / "a.patchcore"
  spade_jax.save_index(path, index)
  loaded = spade_jax.load_index(path)
  assert loaded.weights_id == FakeBackbone().weights_id
  with pytest.raises(ValueError, match="other fake_pyramid weights"):
    _patchcore(seed=1).score(loaded, _images(1))


def test_edited_weights_identity_fails_the_checksum(tmp_path):
  path = tmp_path / "a.spade"
  spade_jax.save_index(path, _spade().fit(_images(4)))
  with safe_open(str(path), framework="numpy") as f:
    metadata = dict(f.metadata())
  metadata["weights"] = FakeBackbone(seed=1).weights_id  # Relabel the gallery.
  safetensors_numpy.save_file(safetensors_numpy.load_file(str(path)), str(path),
                              metadata=metadata)
  with pytest.raises(ValueError, match="checksum"):
    spade_jax.load_index(path)


def test_an_index_without_a_weights_identity_still_loads(tmp_path):
  index = _spade().fit(_images(4)).replace(weights_id=None)  # As written before it.
  path = tmp_path / "old.spade"
  spade_jax.save_index(path, index)
  with safe_open(str(path), framework="numpy") as f:
    assert "weights" not in f.metadata()
  assert index_file.load_index(path, expect=_spade(seed=1)).weights_id is None


def test_backbone_weights_identity_is_of_the_weights_not_the_file(tmp_path):
  backbone = spade_jax.load_backbone("efficientnet_lite0", weights=None, seed=0)
  assert backbone.weights_id.startswith("sha256:") and len(backbone.weights_id) == 71
  path = backbone_load.save_weights(backbone, tmp_path / "lite0.safetensors")
  assert spade_jax.load_backbone("efficientnet_lite0", weights=path).weights_id == \
      backbone.weights_id
  assert spade_jax.load_backbone("efficientnet_lite0", weights=None, seed=1).weights_id != \
      backbone.weights_id


# 4. The calibration's folds are decided and checked before any work.


@pytest.mark.parametrize("metric, folds, images, expected", [
    ("l2", None, 7, 7), ("l2", 3, 7, 3), ("learned", None, 7, 5), ("learned", None, 4, 4),
    ("learned", 2, 7, 2),
])
def test_calibration_folds_are_the_ones_that_run(metric, folds, images, expected):
  spade = _spade(metric=metric, k_image_score=1, k_images=1)
  assert calibration.calibration_folds(spade, images, 0.9, folds) == expected
  assert calibration.calibration_folds(_patchcore(), images, 0.9, folds) == \
      min(images, folds or calibration.PATCHCORE_FOLDS)


def test_learned_calibration_with_too_few_images_fails_before_any_work(tmp_path,
                                                                       monkeypatch):
  spade = _spade(metric="learned", k_image_score=1, k_images=1)
  train = _write_folder(tmp_path / "train", _images(4))
  monkeypatch.setattr(spade, "extract", lambda images: pytest.fail("extracted features"))
  with pytest.raises(ValueError, match="learned kernel .metric='learned'. on as few as 2"):
    folders.fit_folder(spade, train, tmp_path / "x.spade", calibrate=True,
                       folds=2)
  few = _write_folder(tmp_path / "few", _images(2))
  with pytest.raises(ValueError, match="metric='learned' .* at least 3"):
    folders.fit_folder(spade, few, tmp_path / "x.spade")


def test_fit_folder_logs_the_folds_that_will_run(tmp_path, monkeypatch):
  spade = _spade(metric="learned", k_image_score=1, k_images=1)
  train = _write_folder(tmp_path / "train", _images(6))

  class Stop(Exception):
    pass

  def stop(*args, **kwargs):
    raise Stop

  monkeypatch.setattr(spade, "fit_features", stop)  # The log comes before the fit.
  lines = []
  with pytest.raises(Stop):
    folders.fit_folder(spade, train, tmp_path / "x.spade", calibrate=True, log=lines.append)
  assert any("5-fold" in line for line in lines), lines
  assert not any("leave-one-out" in line for line in lines), lines


# 15. Flags of the other method are errors.


@pytest.mark.parametrize("method, given, needles", [
    ("patchcore", {"k_images", "kappa"}, ["--k_images, --kappa are not used by "
                                          "--method=patchcore", "--method=spade"]),
    ("spade", {"reweight", "patch_size", "coreset_ratio"},
     ["--coreset_ratio, --patch_size, --reweight are not used by --method=spade"]),
    ("spade", {"bandwidth", "metric", "layers"}, []),
    ("patchcore", {"metric", "layers", "sigma", "weights"}, []),
])
def test_flags_of_the_other_method_are_refused(method, given, needles):
  if not needles:
    detector_flags.check_method_flags(method, given)
    return
  with pytest.raises(ValueError) as e:
    detector_flags.check_method_flags(method, given)
  for needle in needles:
    assert needle in str(e.value)


def test_recorded_settings_are_the_methods_own():
  settings = {"method": "patchcore", "backbone": "b", "weights": None, "layers": ("l",),
              "k_images": 5, "kappa": 1, "coreset_ratio": 0.1, "reweight": False}
  recorded = detector_flags.recorded_settings("patchcore", settings)
  assert "k_images" not in recorded and "kappa" not in recorded
  assert recorded["coreset_ratio"] == 0.1 and recorded["weights"] == "none"


@pytest.mark.slow
def test_fit_script_refuses_a_flag_of_the_other_method(tmp_path):
  train = _write_folder(tmp_path / "train", _images(2))
  proc = run_script("fit.py", f"--train_dir={train}", f"--index={tmp_path / 'x.spade'}",
                    "--method=patchcore", "--k_images=100000", "--kappa=7", "--weights=none")
  assert_clean_error(proc, "fit.py", "--k_images, --kappa are not used by --method=patchcore")
  assert not (tmp_path / "x.spade").exists()
