"""Fused ensembles (spade_jax.Ensemble): held-out statistics from whole-image folds,
standardisation and combination against a brute-force NumPy reference computed from the
members' own fit / score, maps of other sizes, the mesh, member specs and their errors.

A tiny fake backbone (spade_fake_backbone) at 32 x 32; no torch, no network. The tests
that fit detectors over folds, and evaluate.py end to end (efficientnet_lite0's packaged
weights at 64 x 64), are in the slow tier.
"""

import dataclasses
import json

import jax
from mvtec_fixtures import write_category
import numpy as np
import pytest
from spade_fake_backbone import FakeBackbone
from stripe_images import stripe_images
from test_anomaly_map import _bilinear_ref
from test_fit_predict import assert_clean_error, run_script

import spade_jax
from spade_jax.detector import ensemble as ensemble_lib
from spade_jax.evaluation import EvalConfig

SIZE = 32
PATCHCORE = spade_jax.PatchCoreConfig(resize=SIZE, crop=SIZE, batch_size=4, coreset_ratio=0.5)
PADIM = spade_jax.PadimConfig(resize=SIZE, crop=SIZE, batch_size=4, num_features=12)
NUM_TRAIN = 9
FOLDS = 3


def _images(rng, n, defect=False):
  """Smooth stripes with noise; a defect is a bright 8 x 8 square."""
  return stripe_images(rng, n, SIZE, (slice(12, 20), slice(14, 22)) if defect else None)


def _members():
  backbone = FakeBackbone()
  return [spade_jax.PatchCore(backbone, PATCHCORE), spade_jax.Padim(backbone, PADIM)]


@pytest.fixture(name="data", scope="module")
def fixture_data():
  rng = np.random.default_rng(0)
  train = _images(rng, NUM_TRAIN)
  test = np.concatenate([_images(rng, 3), _images(rng, 2, defect=True)])
  ensemble = spade_jax.Ensemble(_members(), spade_jax.EnsembleConfig(folds=FOLDS))
  return ensemble, ensemble.fit(train), train, test


def _reference_stats(detector, train, kind="mean_std"):
  """Held-out statistics by brute force: each contiguous fold of whole images scored by
  the member fitted (from images) on the others; NumPy statistics."""
  scores, maps = np.zeros(len(train)), np.zeros((len(train), SIZE, SIZE))
  for held in np.array_split(np.arange(len(train)), FOLDS):
    rest = np.setdiff1d(np.arange(len(train)), held)
    s, m = detector.score(detector.fit(train[rest]), train[held])
    scores[held], maps[held] = s, m
  if kind == "mean_std":
    return scores.mean(), scores.std(), maps.mean(), maps.std(), scores
  med, pmed = np.median(scores), np.median(maps)
  return (med, 1.4826 * np.median(np.abs(scores - med)), pmed,
          1.4826 * np.median(np.abs(maps - pmed)), scores)


@pytest.mark.slow  # Fits detectors over folds: seconds each.
def test_statistics_come_from_held_out_folds(data):
  ensemble, index, train, _ = data
  for m, detector in enumerate(ensemble.members):
    center, scale, pcenter, pscale, _ = _reference_stats(detector, train)
    np.testing.assert_allclose(
        [index.image_center[m], index.image_scale[m], index.pixel_center[m],
         index.pixel_scale[m]], [center, scale, pcenter, pscale], rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # Fits detectors over folds: seconds each.
def test_a_training_image_is_never_scored_by_a_member_that_saw_it():
  # With the whole bank (no coreset), an image scored by a PatchCore fitted on it has
  # every patch at distance 0 from the bank: its own score is 0.
  rng = np.random.default_rng(1)
  train = _images(rng, NUM_TRAIN)
  patchcore = spade_jax.PatchCore(FakeBackbone(), dataclasses.replace(PATCHCORE,
                                                                      coreset_ratio=1.0))
  features = patchcore.extract(train)
  own, _ = patchcore.score_features(patchcore.fit_features(features), features)
  np.testing.assert_allclose(own, 0, atol=1e-3)
  held, maps = ensemble_lib.held_out_outputs(patchcore, features, FOLDS)
  assert held.shape == (NUM_TRAIN,) and maps.shape == (NUM_TRAIN, SIZE, SIZE)
  assert np.all(held > 0.02), held  # Each from a detector fitted without its image.
  _, _, _, _, reference = _reference_stats(patchcore, train)
  np.testing.assert_allclose(held, reference, rtol=1e-4)


@pytest.mark.parametrize("combine", ["mean", "max"])
@pytest.mark.slow  # Fits detectors over folds: seconds each.
def test_combination_matches_numpy_on_the_members_own_outputs(data, combine):
  ensemble, index, _, test = data
  ensemble = spade_jax.Ensemble(ensemble.members, spade_jax.EnsembleConfig(
      combine=combine, folds=FOLDS))
  scores, maps = ensemble.score(index, test)
  z_scores, z_maps = [], []
  for m, (detector, member_index) in enumerate(zip(ensemble.members, index.indices)):
    s, a = detector.score(member_index, test)
    z_scores.append((np.float64(s) - index.image_center[m]) / index.image_scale[m])
    z_maps.append((np.float64(a) - index.pixel_center[m]) / index.pixel_scale[m])
  reduce = np.mean if combine == "mean" else np.max
  assert scores.shape == (len(test),) and maps.shape == (len(test), SIZE, SIZE)
  np.testing.assert_allclose(scores, reduce(z_scores, axis=0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(maps, reduce(z_maps, axis=0), rtol=1e-5, atol=1e-5)
  assert scores[3:].min() > scores[:3].max()  # The planted squares rank first.


@pytest.mark.slow  # Fits detectors over folds: seconds each.
def test_median_mad_statistics_match_numpy(data):
  ensemble, _, train, _ = data
  detector = ensemble.members[1]
  config = spade_jax.EnsembleConfig(statistics="median_mad", folds=FOLDS)
  index = spade_jax.Ensemble([detector], config).fit(train)
  expected = _reference_stats(detector, train, "median_mad")[:4]
  np.testing.assert_allclose([index.image_center[0], index.image_scale[0],
                              index.pixel_center[0], index.pixel_scale[0]], expected,
                             rtol=1e-4, atol=1e-6)


def test_statistics_floor_a_constant_scale():
  center, scale = ensemble_lib.statistics(np.full(10, 3.0), "mean_std")
  assert center == 3.0 and scale == pytest.approx(ensemble_lib.SCALE_FLOOR * 3.0)
  values = np.random.default_rng(0).normal(2.0, 0.5, 1000)
  assert ensemble_lib.statistics(values, "mean_std") == pytest.approx(
      (values.mean(), values.std()))


@pytest.mark.parametrize("combine", ["mean", "max"])
def test_threshold_is_the_quantile_of_the_combined_held_out_scores(combine):
  ensemble = spade_jax.Ensemble(_members(), spade_jax.EnsembleConfig(combine=combine,
                                                                     folds=FOLDS))
  rng = np.random.default_rng(4)
  held = rng.normal(size=(2, NUM_TRAIN)) * [[0.5], [30.0]] + [[2.0], [700.0]]
  index = ensemble_lib.EnsembleIndex(
      indices=(), image_center=np.float32([2.1, 690.0]), image_scale=np.float32([0.4, 25.0]),
      pixel_center=np.float32([0, 0]), pixel_scale=np.float32([1, 1]), members=ensemble.names)
  threshold, combined = ensemble.threshold(index, held, quantile=0.8)
  z = (held - np.float32([[2.1], [690.0]])) / np.float32([[0.4], [25.0]])
  expected = z.mean(axis=0) if combine == "mean" else z.max(axis=0)
  np.testing.assert_allclose(combined, expected, rtol=1e-5, atol=1e-6)
  assert threshold.value == pytest.approx(np.quantile(expected, 0.8), rel=1e-5, abs=1e-6)
  assert (threshold.quantile, threshold.folds, threshold.num_images) == (0.8, FOLDS, NUM_TRAIN)
  assert threshold.settings == {"combine": combine, "statistics": "mean_std", "folds": FOLDS}
  threshold.check(ensemble.config)
  other = spade_jax.EnsembleConfig(combine="max" if combine == "mean" else "mean", folds=FOLDS)
  with pytest.raises(ValueError, match="combine"):
    threshold.check(other)
  with pytest.raises(ValueError, match=r"held_out must be \[2, N\]"):
    ensemble.threshold(index, held[:1])


def test_resolved_names_fill_in_the_defaults():
  assert ensemble_lib.resolved_names(
      "patchcore:l2:,padim::efficientnet_lite1:layer1,spade:mahalanobis:", "resnet18") == (
          "patchcore:l2:resnet18:layer2+layer3", "padim::efficientnet_lite1:layer1",
          "spade:mahalanobis:resnet18:layer1+layer2+layer3")
  fake = spade_jax.Ensemble(_members())
  assert ensemble_lib.resolved_names([m.text() for m in ensemble_lib.parse_members(
      ",".join(n.replace("fake_pyramid", "") for n in fake.names))], "fake_pyramid") == \
      fake.names
  with pytest.raises(ValueError, match="--ensemble_members"):
    ensemble_lib.resolved_names("knn::", "resnet18")


def test_maps_of_another_size_are_resized_to_the_first_members():
  rng = np.random.default_rng(2)
  big, small = rng.random((2, 8, 8)).astype(np.float32), rng.random((2, 4, 4)).astype(
      np.float32)
  index = ensemble_lib.EnsembleIndex(
      indices=(), image_center=np.float32([0, 1]), image_scale=np.float32([1, 2]),
      pixel_center=np.float32([0.5, 0.25]), pixel_scale=np.float32([2, 4]), members=())
  scores, maps = ensemble_lib.combine_outputs([np.zeros(2), np.ones(2)], [big, small], index,
                                              "mean", (8, 8))
  expected = ((big - 0.5) / 2 + (_bilinear_ref(small, 8, 8) - 0.25) / 4) / 2
  np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(scores, [0.0, 0.0])


@pytest.mark.slow  # Fits detectors over folds: seconds each.
def test_a_sharded_ensemble_equals_one_device(data):
  ensemble, index, train, test = data
  mesh = jax.make_mesh((len(jax.devices()),), ("data",))
  sharded = ensemble.fit(train, mesh=mesh)
  for name in ("image_center", "image_scale", "pixel_center", "pixel_scale"):
    np.testing.assert_allclose(getattr(sharded, name), getattr(index, name), rtol=1e-4,
                               atol=1e-5)
  ref_scores, ref_maps = ensemble.score(index, test)
  scores, maps = ensemble.score(sharded, test)
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(maps, ref_maps, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("text,needle", [
    ("knn:l2:efficientnet_lite0", "METHOD 'knn'"),
    ("padim:l2:efficientnet_lite0", "padim has no metric"),
    ("patchcore:manhattan:efficientnet_lite0", "METRIC 'manhattan'"),
    ("patchcore:l2:resnet7", "BACKBONE 'resnet7'"),
    ("patchcore:l2", "3 or 4 fields"),
    ("patchcore:l2:efficientnet_lite0:layer1++layer2", "LAYERS"),
    ("patchcore:l2:efficientnet_lite0,patchcore:l2:efficientnet_lite0", "listed twice"),
    (",", "no members"),
])
def test_bad_member_specs_name_the_flag_and_the_member(text, needle):
  with pytest.raises(ValueError, match="--ensemble_members") as info:
    ensemble_lib.parse_members(text)
  assert needle in str(info.value)
  with pytest.raises(ValueError, match="--ensemble_members"):
    EvalConfig(data_dir="d", method="ensemble", ensemble_members=(text,))


def test_member_specs_round_trip_and_build_configs():
  specs = ensemble_lib.parse_members(
      " patchcore:mahalanobis:efficientnet_lite1 , padim::efficientnet_lite2:layer1+layer2,"
      "spade::")
  assert [s.text() for s in specs] == ["patchcore:mahalanobis:efficientnet_lite1",
                                       "padim::efficientnet_lite2:layer1+layer2", "spade::"]
  config = ensemble_lib.member_config(specs[1], resize=64, crop=64, sigma=2.0)
  assert config.layers == ("layer1", "layer2") and config.crop == 64
  assert ensemble_lib.member_config(specs[0]).metric == "mahalanobis"
  with pytest.raises(ValueError, match="--ensemble_members: member 'padim::'"):
    ensemble_lib.member_config(ensemble_lib.parse_member("padim::"), sigma=-1.0)


@pytest.mark.slow  # Fits detectors over folds: seconds each.
def test_a_member_that_fails_is_named():
  class Broken(spade_jax.PatchCore):
    def fit_features(self, *args, **kwargs):
      raise RuntimeError("boom")

  members = [spade_jax.Padim(FakeBackbone(), PADIM), Broken(FakeBackbone(), PATCHCORE)]
  ensemble = spade_jax.Ensemble(members, spade_jax.EnsembleConfig(folds=FOLDS))
  with pytest.raises(ValueError, match=r"ensemble member 1 \(patchcore:l2:fake_pyramid:"
                                       r"layer2\+layer3\) failed: RuntimeError: boom"):
    ensemble.fit(_images(np.random.default_rng(3), NUM_TRAIN))
  with pytest.raises(ValueError, match="member 'patchcore:l2::layer9'"):
    spade_jax.Ensemble.from_specs("patchcore:l2::layer9", backbone="fake",
                                  load_backbone=lambda name, weights: FakeBackbone(name))


def test_eval_config_records_the_members():
  config = EvalConfig(data_dir="d", method="ensemble",
                      ensemble_members=("padim::efficientnet_lite1",), ensemble_combine="max")
  recorded = config.to_json()
  assert recorded["method"] == "ensemble"
  assert recorded["ensemble_members"] == ["padim::efficientnet_lite1"]
  assert recorded["ensemble_combine"] == "max"
  assert not {"layers", "metric", "k_images", "coreset_ratio"} & set(recorded)
  default = EvalConfig(data_dir="d", method="ensemble").to_json()
  assert default["ensemble_members"] == list(ensemble_lib.DEFAULT_MEMBERS)
  with pytest.raises(ValueError, match="combine"):
    EvalConfig(data_dir="d", method="ensemble", ensemble_combine="median")


@pytest.mark.slow  # The script end to end.
def test_evaluate_script_runs_an_ensemble_and_records_its_members(tmp_path):
  data = tmp_path / "data"
  write_category(data, "alpha", n_train=6, n_good=3, defects={"crack": 2, "hole": 2}, seed=5)
  members = "patchcore:l2:efficientnet_lite0,padim::efficientnet_lite0:layer1+layer2"
  out = tmp_path / "out"
  proc = run_script("evaluate.py", f"--data_dir={data}", "--method=ensemble", "--resize=64",
                    "--crop=64", f"--ensemble_members={members}", "--ensemble_folds=3",
                    "--ensemble_combine=max", "--num_heatmaps=1", f"--output_dir={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((out / "results.json").read_text())
  config = results["config"]
  assert config["method"] == "ensemble" and config["ensemble_combine"] == "max"
  assert config["ensemble_members"] == members.split(",")
  assert config["ensemble_folds"] == 3 and config["ensemble_statistics"] == "mean_std"
  entry = results["categories"]["alpha"]
  assert set(entry) >= {"image_auroc", "pixel_auroc", "au_pro", "n_train", "n_test",
                        "seconds", "stage_seconds"}
  assert set(results["mean"]) == {"image_auroc", "pixel_auroc", "au_pro"}


@pytest.mark.slow  # The scripts as subprocesses.
def test_scripts_refuse_bad_ensemble_flags(tmp_path):
  data = tmp_path / "data"
  write_category(data, "alpha", n_train=4, n_good=2, defects={"crack": 2}, seed=1)
  bad = run_script("evaluate.py", f"--data_dir={data}", "--method=ensemble",
                   "--ensemble_members=patchcore:l2:efficientnet_lite0,knn::",
                   f"--output_dir={tmp_path / 'o1'}")
  assert_clean_error(bad, "evaluate.py", "--ensemble_members", "knn::")
  layers = run_script("evaluate.py", f"--data_dir={data}", "--method=ensemble",
                      "--layers=layer1", f"--output_dir={tmp_path / 'o2'}")
  assert_clean_error(layers, "evaluate.py", "--layers is not used by --method=ensemble")
  foreign = run_script("evaluate.py", f"--data_dir={data}", "--method=patchcore",
                       "--ensemble_combine=max", f"--output_dir={tmp_path / 'o3'}")
  assert_clean_error(foreign, "evaluate.py", "--ensemble_combine")
  fit = run_script("fit.py", f"--train_dir={data / 'alpha' / 'train' / 'good'}",
                   f"--index={tmp_path / 'x.index'}", "--method=ensemble", "--layers=layer1")
  assert_clean_error(fit, "fit.py", "--layers is not used by --method=ensemble")
  # (fit.py and predict.py with ensemble indexes: test_ensemble_scripts.py.)


@pytest.mark.slow  # Uses the fitted ensemble.
def test_index_folder_round_trip_and_checks(data, tmp_path):
  ensemble, index, _, test = data
  path = tmp_path / "part.ensemble"
  spade_jax.save_ensemble_index(path, index)
  spade_jax.save_ensemble_index(path, index)  # Over an existing one.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["part.ensemble"]
  loaded = spade_jax.load_ensemble_index(path, expect=ensemble)
  np.testing.assert_array_equal(loaded.image_scale, index.image_scale)
  for got, want in zip(ensemble.score(loaded, test), ensemble.score(index, test)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  other = spade_jax.Ensemble(ensemble.members[:1])
  with pytest.raises(ValueError, match="not this ensemble's"):
    spade_jax.load_ensemble_index(path, expect=other)
  member = path / "member_1.safetensors"
  damaged = bytearray(member.read_bytes())
  damaged[-1] ^= 0xFF  # One bit pattern of the last tensor's data.
  member.write_bytes(bytes(damaged))
  with pytest.raises(ValueError, match="SHA-256"):
    spade_jax.load_ensemble_index(path)
  spade_jax.save_ensemble_index(path, index)
  manifest = json.loads((path / "manifest.json").read_text())
  manifest["image_scale"][0] = 0.0
  (path / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(ValueError, match="image_scale"):
    spade_jax.load_ensemble_index(path)
  manifest["image_scale"][0] = 2.0  # Valid, but not what was saved.
  (path / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(ValueError, match="does not match its checksum"):
    spade_jax.load_ensemble_index(path)


@pytest.mark.slow  # Uses the fitted ensemble.
def test_index_folder_threshold_settings_and_version_1(data, tmp_path):
  ensemble, index, _, _ = data
  threshold = spade_jax.detector.Threshold(value=0.5, quantile=0.9, folds=FOLDS, num_images=9,
                                           settings=ensemble.config.score_settings())
  path = tmp_path / "part.ensemble"
  spade_jax.save_ensemble_index(path, index, threshold=threshold, settings={"sigma": 4.0})
  contents = spade_jax.load_ensemble_index_file(path, expect=ensemble)
  assert contents.threshold == threshold and contents.settings == {"sigma": 4.0}
  manifest = json.loads((path / "manifest.json").read_text())
  for name in ("threshold", "settings", "checksum"):  # What version 1 wrote.
    del manifest[name]
  manifest["version"] = 1
  (path / "manifest.json").write_text(json.dumps(manifest))
  old = spade_jax.load_ensemble_index_file(path)
  assert old.threshold is None and old.settings is None
  np.testing.assert_array_equal(old.index.pixel_scale, index.pixel_scale)
  other = tmp_path / "photos"
  other.mkdir()
  (other / "a.txt").write_text("mine")
  with pytest.raises(ValueError, match="not an ensemble index"):
    spade_jax.save_ensemble_index(other, index)
  assert (other / "a.txt").read_text() == "mine"
