"""The scripts with --method=patchcore: evaluate.py records the method and its settings
in results.json's "config", and fit.py then predict.py give the image scores that
PatchCore.fit / score give in process (whose AUROC is evaluate.py's), with a k-fold
threshold from the training images alone.

efficientnet_lite0 with its packaged ImageNet weights (no network) at 64 x 64, on a
tiny random category in MVTec layout (mvtec_fixtures).
"""

import json
import pathlib
import sys
import types

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from test_fit_predict import assert_clean_error, fit_then_predict, read_scores, run_script

import spade_jax
from spade_jax.data import mvtec
from spade_jax.detector import calibration

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))
import detector_flags  # noqa: E402  (the scripts' module, beside them)

pytestmark = pytest.mark.slow  # Scripts end to end: the slow tier (pyproject.toml).

SIZE = 64
SETTINGS = ("--method=patchcore", f"--resize={SIZE}", f"--crop={SIZE}", "--coreset_ratio=0.5")


@pytest.fixture(name="ws", scope="module")
def fixture_workspace(tmp_path_factory):
  root = tmp_path_factory.mktemp("patchcore_scripts")
  ws = fit_then_predict(root, "alpha.patchcore",
                        (*SETTINGS, "--calibrate", "--calibration_folds=3",
                         "--calibration_quantile=0.5"), ("--noheatmaps",))
  data, index, out = ws.data, ws.index, ws.out
  evaluate = run_script("evaluate.py", f"--data_dir={data}", *SETTINGS, "--num_heatmaps=0",
                        f"--output_dir={root / 'evaluate'}")
  assert evaluate.returncode == 0, evaluate.stderr[-3000:]
  return types.SimpleNamespace(root=root, data=data, index=index, out=out,
                               results=json.loads((root / "evaluate" / "results.json")
                                                  .read_text()))


def test_results_record_the_method_and_its_settings(ws):
  config = ws.results["config"]
  assert config["method"] == "patchcore"
  assert config["layers"] == ["layer2", "layer3"]  # PatchCore's default levels.
  assert (config["coreset_ratio"], config["patch_size"], config["reweight"]) == (0.5, 3, False)
  assert "k_images" not in config and "kappa" not in config  # SPADE's, not used.
  assert set(ws.results["categories"]["alpha"]) >= {"image_auroc", "pixel_auroc", "au_pro",
                                                    "n_train", "n_test", "seconds"}


def test_fit_predict_give_the_in_process_scores(ws):
  detector = spade_jax.PatchCore(
      spade_jax.load_backbone("efficientnet_lite0", weights="imagenet"),
      spade_jax.PatchCoreConfig(resize=SIZE, crop=SIZE, coreset_ratio=0.5))
  data = mvtec.load_category(ws.data, "alpha")
  scores, _ = detector.score(detector.fit(data.train_images), data.test_images)
  expected = dict(zip([p.removeprefix("test/") for p in data.test_paths], scores))
  header, rows = read_scores(ws.out / "scores.csv")
  assert header == ["path", "score", "anomalous"]
  got = {path: float(score) for path, score, _ in rows}
  assert sorted(got) == sorted(expected)
  for path, value in expected.items():
    assert got[path] == pytest.approx(float(value), rel=1e-5), path
  labels = dict(zip([p.removeprefix("test/") for p in data.test_paths], data.test_labels))
  paths = sorted(got)
  auroc = roc_auc_score([labels[p] for p in paths], [got[p] for p in paths])
  assert ws.results["categories"]["alpha"]["image_auroc"] == pytest.approx(auroc, abs=1e-6)


def test_threshold_is_a_k_fold_quantile(ws):
  stored = spade_jax.detector.load_index_file(ws.index).threshold
  assert (stored.quantile, stored.folds, stored.num_images) == (0.5, 3, 6)
  assert stored.settings == {"metric": "l2", "coreset_ratio": 0.5, "patch_size": 3,
                             "reweight": False, "k_nearest": 1, "projection_dim": 128,
                             "coreset_seed": 0, "topk": None}
  _, rows = read_scores(ws.out / "scores.csv")
  for _, score, flag in rows:
    if abs(float(score) - stored.value) > 1e-5 * stored.value:
      assert int(flag) == int(float(score) > stored.value)
  assert np.isfinite(stored.value)


def test_method_that_contradicts_the_index_is_refused(ws, tmp_path):
  proc = run_script("predict.py", f"--index={ws.index}", "--method=spade",
                    f"--images={ws.data / 'alpha' / 'test'}", f"--output_dir={tmp_path}")
  assert_clean_error(proc, "predict.py", "--method=spade", "method=patchcore")


def test_flags_of_spade_are_refused_with_a_patchcore_index(ws, tmp_path):
  proc = run_script("predict.py", f"--index={ws.index}", f"--images={ws.data / 'alpha' / 'test'}",
                    f"--output_dir={tmp_path / 'out'}", "--kappa=7")
  assert_clean_error(proc, "predict.py", "--kappa is not used by --method=patchcore")


# Issue 18: the levels, the image score and the reduction are flags.


def test_results_record_the_reduction_and_no_topk_by_default(ws):
  config = ws.results["config"]
  assert config["reduction"] == "per_level" and config["reweight"] is False
  assert "topk" not in config and "image_score" not in config


def test_three_levels_and_the_topk_image_score_from_the_command_line(ws, tmp_path):
  evaluate = run_script("evaluate.py", f"--data_dir={ws.data}", *SETTINGS,
                        "--layers=layer1,layer2,layer3", "--image_score=topk", "--topk=5",
                        "--num_heatmaps=0", f"--output_dir={tmp_path}")
  assert evaluate.returncode == 0, evaluate.stderr[-3000:]
  results = json.loads((tmp_path / "results.json").read_text())
  config = results["config"]
  assert config["layers"] == ["layer1", "layer2", "layer3"]
  assert (config["image_score"], config["topk"], config["reweight"]) == ("topk", 5, False)
  detector = spade_jax.PatchCore(
      spade_jax.load_backbone("efficientnet_lite0", weights="imagenet"),
      spade_jax.PatchCoreConfig(resize=SIZE, crop=SIZE, coreset_ratio=0.5, topk=5,
                                layers=("layer1", "layer2", "layer3")))
  data = mvtec.load_category(ws.data, "alpha")
  scores, _ = detector.score(detector.fit(data.train_images), data.test_images)
  auroc = roc_auc_score(data.test_labels, scores)
  assert results["categories"]["alpha"]["image_auroc"] == pytest.approx(auroc, abs=1e-6)


def _contents(config, recorded=None, threshold=None):
  """An index file's contents (as load_index_file returns them) for settings_from_index."""
  index = spade_jax.PatchCoreIndex(bank=np.zeros((4, 8), np.float32), backbone_name="b",
                                   feature_config=config.feature_config("b"))
  return types.SimpleNamespace(index=index, settings=recorded, threshold=threshold)


_FLAGS = {"method": "patchcore", "backbone": "b", "weights": "imagenet", "layers": ("l",),
          "metric": "l2", "sigma": 4.0, "resize": 64, "crop": 64, "coreset_ratio": 0.1,
          "patch_size": 3, "reweight": False, "image_score": None, "topk": None,
          "reduction": "per_level"}


def _predict_config(contents, given=(), **flags):
  settings = detector_flags.settings_from_index({**_FLAGS, **flags}, set(given), contents,
                                                "x.patchcore")
  return detector_flags.patchcore_config(settings, 1)


def test_predict_takes_the_reduction_from_an_older_index():
  old = _contents(spade_jax.PatchCoreConfig(reduction="adaptive_avg"), {"reweight": True})
  config = _predict_config(old)
  assert config.reduction == "adaptive_avg" and config.image_score_rule == "reweight"
  with pytest.raises(ValueError, match="--reduction=per_level does not match the index"):
    _predict_config(old, given={"reduction"})


def test_predict_image_score_flags_replace_the_recorded_ones():
  # Fitted with --reweight: --image_score / --topk choose another score without
  # --noreweight (the three come from the command line together).
  contents = _contents(spade_jax.PatchCoreConfig(), {"reweight": True, "image_score": None})
  assert _predict_config(contents).image_score_rule == "reweight"
  config = _predict_config(contents, {"image_score", "topk"}, image_score="topk", topk=3)
  assert (config.image_score_rule, config.topk, config.reweight) == ("topk", 3, False)
  assert _predict_config(contents, {"topk"}, topk=3).image_score_rule == "topk"
  assert _predict_config(contents, {"image_score"}, image_score="max").image_score_rule == "max"


def test_predict_keeps_a_thresholds_image_score():
  calibrated = spade_jax.PatchCoreConfig(topk=4)
  threshold = calibration.Threshold(value=1.0, quantile=0.9, folds=2, num_images=4,
                                    settings=calibrated.score_settings())
  contents = _contents(calibrated, {"topk": 4}, threshold)
  assert _predict_config(contents).topk == 4
  with pytest.raises(ValueError, match="--image_score=max differs from the image_score=topk"):
    _predict_config(contents, {"image_score"}, image_score="max")
  with pytest.raises(ValueError, match="--topk=5 differs from the topk=4"):
    _predict_config(contents, {"topk"}, topk=5)
  # A threshold of the largest patch score (from before topk: no "topk") refuses --topk.
  before = calibration.Threshold(value=1.0, quantile=0.9, folds=2, num_images=4,
                                 settings={"metric": "l2", "reweight": False})
  assert _predict_config(_contents(calibrated, {}, before)).image_score_rule == "max"
  with pytest.raises(ValueError, match="topk"):
    _predict_config(_contents(calibrated, {}, before), {"topk"}, topk=3)


def test_image_score_flags_are_patchcores():
  with pytest.raises(ValueError, match="--image_score, --reduction, --topk are not used by "
                                       "--method=spade"):
    detector_flags.check_method_flags("spade", {"image_score", "topk", "reduction"})
