"""fit.py and predict.py with --method=ensemble: the index folder fit.py writes scores in
predict.py as spade_jax.Ensemble.score scores it in process (scores and maps), its
threshold is the quantile of the combined held-out scores recomputed by brute force
(each member refitted from images on the other folds, NumPy statistics), a damaged,
edited or partial index folder is refused, and so are the flags that contradict it,
each error naming its flag.

efficientnet_lite0 with its packaged ImageNet weights (no network) at 48 x 60 (whole
40 x 32 images, --resize=48), a PatchCore and a PaDiM member, on a tiny random category
in MVTec layout (mvtec_fixtures). One module fixture runs fit.py and predict.py once.
"""

import json
import shutil

import numpy as np
import pytest
from test_fit_predict import assert_clean_error, fit_then_predict, read_scores, run_script

import spade_jax
from spade_jax.data import mvtec
from spade_jax.features import geometry

pytestmark = pytest.mark.slow  # Scripts end to end: the slow tier (pyproject.toml).

RESIZE, FOLDS, QUANTILE = 48, 3, 0.5
MEMBERS = ("patchcore:l2:efficientnet_lite0", "padim::efficientnet_lite0:layer1+layer2")
SETTINGS = ("--method=ensemble", f"--resize={RESIZE}", f"--ensemble_members={','.join(MEMBERS)}",
            f"--ensemble_folds={FOLDS}")


@pytest.fixture(name="ws", scope="module")
def fixture_workspace(tmp_path_factory):
  """fit.py --method=ensemble --calibrate on alpha/train/good, predict.py on alpha/test."""
  return fit_then_predict(tmp_path_factory.mktemp("ensemble_scripts"), "alpha.ensemble",
                          (*SETTINGS, "--calibrate", f"--calibration_quantile={QUANTILE}"),
                          ("--save_maps", "--num_summary=2"), seed=7)

@pytest.fixture(name="members", scope="module")
def fixture_members():
  """The ensemble's member detectors, built in process as fit.py builds them."""
  ensemble = spade_jax.Ensemble.from_specs(MEMBERS, resize=RESIZE, crop=None)
  return ensemble.with_whole_image_size(32, 40).members  # write_category's 40 x 32.


def _ensemble(members, combine="mean"):
  return spade_jax.Ensemble(members, spade_jax.EnsembleConfig(combine=combine, folds=FOLDS))


def test_predict_gives_ensemble_score_on_the_same_index(ws, members):
  ensemble = _ensemble(members)
  index = spade_jax.load_ensemble_index(ws.index, expect=ensemble)
  data = mvtec.load_category(ws.data, "alpha")
  scores, maps = ensemble.score(index, data.test_images)
  paths = [p.removeprefix("test/") for p in data.test_paths]
  header, rows = read_scores(ws.out / "scores.csv")
  assert header == ["path", "score", "anomalous"]
  got = {path: float(score) for path, score, _ in rows}
  assert sorted(got) == sorted(paths)
  for path, score, amap in zip(paths, scores, maps):
    assert got[path] == pytest.approx(float(score), rel=1e-5, abs=1e-5), path
    saved = np.load(ws.out / "maps" / f"{path}.npy")
    assert saved.shape == (32, 40) and amap.shape == (48, 60)  # At the image's own size.
    np.testing.assert_allclose(saved, geometry.to_original(amap, 32, 40, resize=RESIZE,
                                                           crop=None),
                               rtol=1e-5, atol=1e-5, err_msg=path)
  assert len(list((ws.out / "heatmaps").rglob("*.png"))) == len(paths)
  assert (ws.out / "summary.png").is_file()
  assert "anomalous:" in ws.predict.stdout


def test_threshold_is_the_quantile_of_brute_force_combined_held_out_scores(ws, members):
  ensemble = _ensemble(members)
  contents = spade_jax.load_ensemble_index_file(ws.index, expect=ensemble)
  train = mvtec.load_category(ws.data, "alpha").train_images
  held = np.zeros((len(members), len(train)))
  for m, detector in enumerate(members):  # Refitted without each fold, in file order.
    features = np.asarray(detector.extract(train))
    for fold in np.array_split(np.arange(len(train)), FOLDS):
      rest = np.setdiff1d(np.arange(len(train)), fold)
      held[m, fold], _ = detector.score_features(detector.fit_features(features[rest]),
                                                 features[fold])
  center, scale = held.mean(axis=1), held.std(axis=1)
  np.testing.assert_allclose(contents.index.image_center, center, rtol=1e-4)
  np.testing.assert_allclose(contents.index.image_scale, scale, rtol=1e-3)
  combined = ((held - center[:, None]) / scale[:, None]).mean(axis=0)
  threshold = contents.threshold
  assert threshold.value == pytest.approx(np.quantile(combined, QUANTILE), rel=1e-3, abs=1e-4)
  assert (threshold.quantile, threshold.folds, threshold.num_images) == (QUANTILE, FOLDS, 6)
  assert threshold.settings == {"combine": "mean", "statistics": "mean_std", "folds": FOLDS}
  assert f"threshold: {threshold.value:.6g}" in ws.fit.stdout
  _, rows = read_scores(ws.out / "scores.csv")
  for _, score, flag in rows:
    assert int(flag) == int(float(score) > threshold.value)
  settings = contents.settings
  assert settings["method"] == "ensemble" and settings["ensemble_members"] == list(MEMBERS)
  assert "layers" not in settings and "metric" not in settings


def _copy(ws, tmp_path):
  copy = tmp_path / "copy.ensemble"
  shutil.copytree(ws.index, copy)
  return copy


def _predict(ws, index, tmp_path, *flags):
  return run_script("predict.py", f"--index={index}", f"--images={ws.data / 'alpha' / 'test'}",
                    f"--output_dir={tmp_path / 'out'}", *flags)


def test_a_damaged_edited_or_partial_index_is_refused(ws, tmp_path):
  copy = _copy(ws, tmp_path)
  manifest = json.loads((copy / "manifest.json").read_text())
  manifest["threshold"]["value"] += 1.0  # Edited: the manifest's checksum no longer holds.
  (copy / "manifest.json").write_text(json.dumps(manifest))
  assert_clean_error(_predict(ws, copy, tmp_path), "predict.py", "manifest.json does not "
                     "match its checksum")
  shutil.copy(ws.index / "manifest.json", copy / "manifest.json")
  member = copy / "member_1.safetensors"
  damaged = bytearray(member.read_bytes())
  damaged[-1] ^= 0xFF
  member.write_bytes(bytes(damaged))
  assert_clean_error(_predict(ws, copy, tmp_path), "predict.py", "member_1.safetensors",
                     "SHA-256")
  member.unlink()  # Partial.
  assert_clean_error(_predict(ws, copy, tmp_path), "predict.py", "member_1.safetensors is "
                     "missing")
  (copy / "manifest.json").unlink()
  assert_clean_error(_predict(ws, copy, tmp_path), "predict.py", "no index file", "folder",
                     "manifest.json")
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag,needles", [
    ("--method=padim", ["--method=padim does not match the index", "method=ensemble"]),
    ("--ensemble_combine=max", ["--ensemble_combine=max differs", "calibrated with"]),
    ("--ensemble_members=patchcore:l2:efficientnet_lite0",
     ["--ensemble_members=patchcore:l2:efficientnet_lite0 does not match the index"]),
    ("--ensemble_statistics=median_mad", ["--ensemble_statistics=median_mad does not match"]),
    ("--sigma=2", ["--sigma=2.0 does not match the index"]),
    ("--resize=32", ["--resize=32 does not match the index"]),
    ("--kappa=3", ["--kappa is not used by --method=ensemble"]),
    ("--layers=layer1", ["--layers is not used by --method=ensemble"]),
    ("--tile_size=32", ["--tile_size: tiles are not supported with an ensemble index"]),
])
def test_predict_refuses_flags_that_contradict_the_index(ws, tmp_path, flag, needles):
  assert_clean_error(_predict(ws, ws.index, tmp_path, flag), "predict.py", *needles)
  assert not (tmp_path / "out").exists()


def test_predict_accepts_the_index_members_spelled_otherwise(ws, tmp_path):
  members = "patchcore:l2::layer2+layer3,padim:::layer1+layer2"  # --backbone's, in full.
  proc = _predict(ws, ws.index, tmp_path, f"--ensemble_members={members}", "--noheatmaps",
                  "--num_summary=0")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (tmp_path / "out" / "scores.csv").read_text() == (ws.out / "scores.csv").read_text()


@pytest.mark.parametrize("flags,needles", [
    (("--calibrate", "--calibration_folds=5"), ["--calibration_folds=5", "--ensemble_folds=3"]),
    (("--tile_size=32",), ["--tile_size: tiles are not supported with --method=ensemble"]),
    (("--ensemble_folds=1",), ["--ensemble_folds must be >= 2"]),
    (("--ensemble_members=patchcore:l2:efficientnet_lite0,knn::",), ["--ensemble_members",
                                                                     "knn::"]),
    (("--k_images=3",), ["--k_images is not used by --method=ensemble"]),
])
def test_fit_refuses_bad_flags_naming_them(ws, tmp_path, flags, needles):
  index = tmp_path / "x.ensemble"
  proc = run_script("fit.py", f"--train_dir={ws.data / 'alpha' / 'train' / 'good'}",
                    f"--index={index}", *SETTINGS, *flags)
  assert_clean_error(proc, "fit.py", *needles)
  assert not index.exists()


def test_fit_never_replaces_what_is_not_an_ensemble_index(ws, tmp_path):
  keep = tmp_path / "photos"
  keep.mkdir()
  (keep / "a.txt").write_text("mine")
  proc = run_script("fit.py", f"--train_dir={ws.data / 'alpha' / 'train' / 'good'}",
                    f"--index={keep}", *SETTINGS)
  assert_clean_error(proc, "fit.py", "exists and is not an ensemble index", "--index")
  assert (keep / "a.txt").read_text() == "mine"


def test_an_uncalibrated_index_with_another_combine(ws, members, tmp_path):
  """Without a threshold: no decisions, and --ensemble_combine may change at predict."""
  contents = spade_jax.load_ensemble_index_file(ws.index)
  index = tmp_path / "plain.ensemble"  # fit.py's index, without its threshold.
  spade_jax.save_ensemble_index(index, contents.index, settings=contents.settings)
  proc = _predict(ws, index, tmp_path, "--ensemble_combine=max", "--noheatmaps",
                  "--num_summary=0")
  assert proc.returncode == 0, proc.stderr[-3000:]
  header, rows = read_scores(tmp_path / "out" / "scores.csv")
  assert header == ["path", "score"] and "anomalous" not in proc.stdout
  ensemble = _ensemble(members, "max")
  data = mvtec.load_category(ws.data, "alpha")
  scores, _ = ensemble.score(contents.index, data.test_images)
  expected = dict(zip([p.removeprefix("test/") for p in data.test_paths], scores))
  assert sorted(path for path, _ in rows) == sorted(expected)
  for path, score in rows:
    assert float(score) == pytest.approx(float(expected[path]), rel=1e-5, abs=1e-5)
