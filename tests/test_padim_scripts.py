"""The scripts with --method=padim: fit.py --calibrate then predict.py give the image
scores Padim.fit / score give in process, with a k-fold threshold from the training
images alone; evaluate.py records the method and its settings in results.json's
"config" (its AUROC is that of the same scores); fit.py refuses other methods' flags.

efficientnet_lite0 with its packaged ImageNet weights (no network) at 64 x 64, on a
tiny random category in MVTec layout (mvtec_fixtures). One module fixture runs the three
scripts once for every test.
"""

import json
import types

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from test_fit_predict import assert_clean_error, fit_then_predict, read_scores, run_script

import spade_jax
from spade_jax.data import mvtec

pytestmark = pytest.mark.slow  # Scripts end to end: the slow tier (pyproject.toml).

SIZE = 64
NUM_FEATURES = 20
SETTINGS = ("--method=padim", f"--resize={SIZE}", f"--crop={SIZE}",
            f"--num_features={NUM_FEATURES}")


@pytest.fixture(name="ws", scope="module")
def fixture_workspace(tmp_path_factory):
  root = tmp_path_factory.mktemp("padim_scripts")
  ws = fit_then_predict(root, "alpha.padim", (*SETTINGS, "--calibrate", "--calibration_folds=3",
                                              "--calibration_quantile=0.5"),
                        ("--noheatmaps", "--num_summary=0"))
  data, index, out = ws.data, ws.index, ws.out
  evaluate = run_script("evaluate.py", f"--data_dir={data}", *SETTINGS, "--num_heatmaps=0",
                        f"--output_dir={root / 'evaluate'}")
  assert evaluate.returncode == 0, evaluate.stderr[-3000:]
  return types.SimpleNamespace(root=root, data=data, index=index, out=out,
                               results=json.loads((root / "evaluate" / "results.json")
                                                  .read_text()))


def test_results_record_the_method_and_its_settings(ws):
  config = ws.results["config"]
  assert config["method"] == "padim"
  assert config["layers"] == ["layer1", "layer2", "layer3"]  # PaDiM's default levels.
  assert {k: config[k] for k in ("num_features", "feature_seed", "regularization",
                                 "epsilon")} == {"num_features": NUM_FEATURES,
                                                 "feature_seed": 0, "regularization": "paper",
                                                 "epsilon": 0.01}
  assert not {"k_images", "kappa", "coreset_ratio", "metric"} & set(config)  # Not PaDiM's.
  assert set(ws.results["categories"]["alpha"]) >= {"image_auroc", "pixel_auroc", "au_pro",
                                                    "n_train", "n_test", "seconds"}


def test_fit_predict_give_the_in_process_scores_and_threshold(ws):
  detector = spade_jax.Padim(
      spade_jax.load_backbone("efficientnet_lite0", weights="imagenet"),
      spade_jax.PadimConfig(resize=SIZE, crop=SIZE, num_features=NUM_FEATURES))
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
  contents = spade_jax.detector.load_index_file(ws.index, expect=detector)
  stored = contents.threshold
  assert (stored.quantile, stored.folds, stored.num_images) == (0.5, 3, 6)
  assert stored.settings == {"regularization": "paper", "epsilon": 0.01, "sigma": 4.0}
  assert np.isfinite(stored.value)
  for _, score, flag in rows:
    if abs(float(score) - stored.value) > 1e-5 * stored.value:
      assert int(flag) == int(float(score) > stored.value)
  assert contents.settings["method"] == "padim" and "metric" not in contents.settings


def test_flags_of_other_methods_are_refused(ws, tmp_path):
  proc = run_script("fit.py", f"--train_dir={ws.data / 'alpha' / 'train' / 'good'}",
                    f"--index={tmp_path / 'x.padim'}", "--method=padim", "--kappa=7",
                    "--metric=cosine")
  assert_clean_error(proc, "fit.py", "--kappa, --metric are not used by --method=padim")
  assert not (tmp_path / "x.padim").exists()
  # (predict.py's flags against a PaDiM index: test_padim_files.py, settings_from_index.)
