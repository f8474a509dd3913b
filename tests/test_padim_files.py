"""PaDiM as a first-class detector: index files, calibration, evaluation config, flags.

- save_index / load_index of a PadimIndex: exact round trip (same arrays, same scores),
  a sharded index saved without its padding, checksums over every tensor and the
  metadata, every malformed field or tensor refused with a ValueError naming the file,
  and load_index(expect=...) refusing another detector's index both ways;
- padim_threshold against a brute-force float64 NumPy cross-validation of PaDiM's image
  scores (Gaussians refitted on the other folds, Mahalanobis maps, bilinear upsampling,
  SciPy's blur, maximum);
- EvalConfig(method="padim") and the scripts' flag helpers (detector_flags).
"""

import json
import pathlib
import sys

import jax
import numpy as np
import numpy_reference as reference
import pytest
from safetensors import numpy as safetensors_numpy
from safetensors import safe_open
from scipy import ndimage
from sklearn import covariance as sk_covariance
from spade_fake_backbone import FakeBackbone

import spade_jax
from spade_jax import evaluation
from spade_jax.detector import calibration, index_file, index_padim
from spade_jax.evaluation import config as config_lib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))
import detector_flags  # noqa: E402  (the scripts' module, beside them)

SIZE = 32  # layer1's grid: 8 x 8 = 64 positions.
CONFIG = spade_jax.PadimConfig(resize=SIZE, crop=SIZE, batch_size=4, num_features=16,
                               feature_seed=3)
NUM_TRAIN = 7
NUM_CHANNELS = 24  # FakeBackbone's layer1..3: 6 + 8 + 10.


def _images(n, seed):
  return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), np.uint8)


@pytest.fixture(name="fitted", scope="module")
def fixture_fitted():
  padim = spade_jax.Padim(FakeBackbone(), CONFIG)
  train, test = _images(NUM_TRAIN, 0), _images(3, 1)
  return padim, padim.fit(train), train, test


def _static(index):
  return (index.backbone_name, index.feature_config, index.grid, index.channels,
          index.num_channels, index.regularization, index.epsilon, index.weights_id)


def _metadata(path):
  with safe_open(str(path), framework="numpy") as f:
    return dict(f.metadata())


def _rewrite(path, tensors=None, **metadata):
  """Rewrites the file with edited tensors / metadata, keeping the stored checksums."""
  old = safetensors_numpy.load_file(str(path))
  meta = {**_metadata(path), **metadata}
  safetensors_numpy.save_file({**old, **(tensors or {})}, str(path), metadata=meta)


# ----------------------------------------------------------------------------------
# Index files.


def test_roundtrip_is_exact_and_scores_alike(fitted, tmp_path):
  padim, index, _, test = fitted
  path = tmp_path / "idx.padim"
  spade_jax.save_index(path, index)
  loaded = spade_jax.load_index(path, expect=padim)
  assert isinstance(loaded, spade_jax.PadimIndex) and _static(loaded) == _static(index)
  np.testing.assert_array_equal(loaded.mean, index.mean)
  np.testing.assert_array_equal(loaded.precision, index.precision)
  for a, b in zip(padim.score(loaded, test), padim.score(index, test)):
    np.testing.assert_array_equal(a, b)
  meta = _metadata(path)
  assert meta["format"] == index_file.PADIM_INDEX_FORMAT == "spade_jax.PadimIndex"
  assert json.loads(meta["padim"]) == {"grid": [8, 8], "num_channels": NUM_CHANNELS,
                                       "regularization": "paper", "epsilon": 0.01}
  assert meta["feature_config"] == CONFIG.feature_config("fake_pyramid")
  assert meta["weights"] == padim.backbone.weights_id
  assert set(json.loads(meta["checksums"])) == {"__metadata__", "mean", "precision",
                                                "channels"}
  stored = safetensors_numpy.load_file(str(path))
  assert stored["channels"].dtype == np.int32
  assert tuple(stored["channels"]) == CONFIG.channels(NUM_CHANNELS)


def test_ledoit_wolf_index_and_threshold_roundtrip(fitted, tmp_path):
  padim, _, train, test = fitted
  config = spade_jax.PadimConfig(**{**CONFIG.__dict__, "regularization": "ledoit_wolf"})
  lw = spade_jax.Padim(padim.backbone, config)
  index = lw.fit(train)
  threshold = calibration.Threshold(value=3.0, quantile=0.9, folds=3, num_images=NUM_TRAIN,
                                    settings=config.score_settings())
  path = tmp_path / "lw.padim"
  spade_jax.save_index(path, index, threshold=threshold, settings={"method": "padim"})
  contents = index_file.load_index_file(path, expect=lw)
  assert _static(contents.index) == _static(index) and contents.index.epsilon is None
  assert contents.threshold == threshold and contents.settings == {"method": "padim"}
  np.testing.assert_array_equal(lw.score(contents.index, test)[0], lw.score(index, test)[0])
  with pytest.raises(ValueError, match="fitted with.*ledoit_wolf.*refit"):
    spade_jax.load_index(path, expect=padim)  # Other fit settings: refused at load.


def test_sharded_index_saves_without_padding(fitted, tmp_path):
  padim, index, _, test = fitted
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:3]), ("data",))  # 64 -> 66 rows.
  sharded = spade_jax.detector.shard_padim_index(index, mesh)
  assert sharded.is_sharded and sharded.precision.data.shape[0] == 66
  spade_jax.save_index(tmp_path / "sharded.padim", sharded)
  loaded = spade_jax.load_index(tmp_path / "sharded.padim")
  assert not loaded.is_sharded and loaded.num_positions == 64
  np.testing.assert_array_equal(loaded.mean, index.mean)
  np.testing.assert_array_equal(loaded.precision, index.precision)
  np.testing.assert_allclose(padim.score(loaded, test, mesh=mesh)[0],
                             padim.score(index, test)[0], rtol=1e-5)


@pytest.mark.parametrize("edit, message", [
    ("precision", "tensor 'precision' does not match its checksum"),
    ("channels", "tensor 'channels' does not match its checksum"),
    ("epsilon", "metadata does not match its checksum"),
    ("feature_seed", "metadata does not match its checksum"),
])
def test_edited_file_fails_its_checksums(fitted, tmp_path, edit, message):
  _, index, _, _ = fitted
  path = tmp_path / "idx.padim"
  spade_jax.save_index(path, index)
  stored = safetensors_numpy.load_file(str(path))
  if edit == "precision":
    changed = stored["precision"].copy()
    changed[5, 2, 2] *= 1.5  # A looser Gaussian at one position.
    _rewrite(path, {"precision": changed})
  elif edit == "channels":
    _rewrite(path, {"channels": stored["channels"][::-1].copy()})
  elif edit == "epsilon":
    _rewrite(path, padim=json.dumps({"grid": [8, 8], "num_channels": NUM_CHANNELS,
                                     "regularization": "paper", "epsilon": 0.02},
                                    sort_keys=True))
  else:
    config = json.loads(_metadata(path)["feature_config"])
    _rewrite(path, feature_config=json.dumps({**config, "feature_seed": 4}, sort_keys=True))
  with pytest.raises(ValueError, match=message) as e:
    spade_jax.load_index(path)
  assert str(path) in str(e.value)


def _forge(path, tensors, field=None, config=None, **metadata):
  """A PaDiM file with a self-consistent header (correct checksums), so that only the
  structural checks of load_index can object."""
  feature_config = {**json.loads(CONFIG.feature_config("fake_pyramid")), **(config or {})}
  padim_field = {"grid": [8, 8], "num_channels": NUM_CHANNELS, "regularization": "paper",
                 "epsilon": 0.01, **(field or {})}
  meta = {"format": index_file.PADIM_INDEX_FORMAT, "version": "2",
          "backbone": "fake_pyramid", "feature_config": json.dumps(feature_config,
                                                                   sort_keys=True),
          "levels": json.dumps(list(CONFIG.layers)), "padim": json.dumps(padim_field)}
  meta.update(metadata)
  meta = {k: v for k, v in meta.items() if v is not None}
  checksums = index_file._checksums(tensors, meta)  # pylint: disable=protected-access
  meta["checksums"] = json.dumps({k: checksums.get(k, "sha256:" + "0" * 64)
                                  for k in ["__metadata__", *index_padim.TENSORS]})
  safetensors_numpy.save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("case, message", [
    ("consistent", None),
    ("mean_f64", "'mean' has dtype F64, expected F32"),
    ("channels_i64", "'channels' has dtype I64, expected I32"),
    ("precision_2d", r"'precision' has shape \[64, 256\], expected 3 dimensions"),
    ("precision_rows", r"'precision' has shape \[63, 16, 16\], expected \[64, 16, 16\]"),
    ("mean_channels", r"'mean' has shape \[64, 15\], expected \[64, 16\]"),
    ("grid", r"'mean' has shape \[64, 16\], expected \[16, 16\].*grid \[4, 4\]"),
    ("huge_grid", r"'mean'.*expected \[1099511627776, 16\]"),
    ("extra_tensor", "unexpected tensors.*'bank'"),
    ("no_channels", "no tensor 'channels'"),
    ("not_the_draw", "'channels' is not the channel subset of feature_config"),
    ("default_d", r"'mean'.*expected \[64, 24\].*d=24"),  # num_features null: min(100, C).
    ("no_field", "no 'padim' field"),
    ("field_json", "'padim' is not valid JSON"),
    ("field_keys", "'padim' must be an object with the fields"),
    ("grid_value", "grid=\\[8, 0\\]"),
    ("num_channels_huge", "num_channels=1099511627776, expected an int in"),
    ("num_channels_small", "num_features=16, more than the num_channels=10"),
    ("regularization", "regularization='oas'"),
    ("epsilon_zero", "epsilon=0, expected a finite number > 0"),
    ("epsilon_with_lw", "epsilon=0.01 with regularization 'ledoit_wolf', expected null"),
    ("config_fields", r"'feature_config' must have the fields.*PadimConfig"),
    ("num_features", "num_features=0, expected a positive int or null"),
    ("feature_seed", "feature_seed=-1, expected a non-negative int"),
    ("kernels_field", "a PaDiM index has no metadata field 'kernels'"),
    ("levels", "feature_config.*layers.*levels"),
])
def test_malformed_files_are_refused(fitted, tmp_path, case, message):
  _, index, _, _ = fitted
  tensors = {"mean": np.asarray(index.mean), "precision": np.asarray(index.precision),
             "channels": np.asarray(index.channels, np.int32)}
  field, config, meta = {}, {}, {}
  if case == "mean_f64":
    tensors["mean"] = tensors["mean"].astype(np.float64)
  elif case == "channels_i64":
    tensors["channels"] = tensors["channels"].astype(np.int64)
  elif case == "precision_2d":
    tensors["precision"] = tensors["precision"].reshape(64, 256)
  elif case == "precision_rows":
    tensors["precision"] = tensors["precision"][:63]
  elif case == "mean_channels":
    tensors["mean"] = tensors["mean"][:, :15]
  elif case == "grid":
    field = {"grid": [4, 4]}
  elif case == "huge_grid":
    field = {"grid": [2 ** 20, 2 ** 20]}
  elif case == "extra_tensor":
    tensors["bank"] = tensors["mean"]
  elif case == "no_channels":
    del tensors["channels"]
  elif case == "not_the_draw":
    tensors["channels"] = np.arange(16, dtype=np.int32)
  elif case == "default_d":
    config = {"num_features": None}
  elif case == "no_field":
    meta = {"padim": None}
  elif case == "field_json":
    meta = {"padim": "{nope"}
  elif case == "field_keys":
    meta = {"padim": json.dumps({"grid": [8, 8]})}
  elif case == "grid_value":
    field = {"grid": [8, 0]}
  elif case == "num_channels_huge":
    field = {"num_channels": 2 ** 40}
  elif case == "num_channels_small":
    field = {"num_channels": 10}
  elif case == "regularization":
    field = {"regularization": "oas"}
  elif case == "epsilon_zero":
    field = {"epsilon": 0}
  elif case == "epsilon_with_lw":
    field = {"regularization": "ledoit_wolf"}
  elif case == "config_fields":
    config = {"patch_size": 3}
  elif case == "num_features":
    config = {"num_features": 0}
  elif case == "feature_seed":
    config = {"feature_seed": -1}
  elif case == "kernels_field":
    meta = {"kernels": json.dumps({"metric": "l2", "spec": None, "bandwidths": {}})}
  elif case == "levels":
    meta = {"levels": json.dumps(["layer1"])}
  path = tmp_path / "forged.padim"
  _forge(path, tensors, field, config, **meta)
  if message is None:
    loaded = spade_jax.load_index(path)
    assert _static(loaded)[:-1] == _static(index)[:-1]  # (Forged without weights.)
    np.testing.assert_array_equal(loaded.precision, index.precision)
    return
  with pytest.raises(ValueError, match=message) as e:
    spade_jax.load_index(path)
  assert str(path) in str(e.value)


def test_padim_field_in_another_format_is_refused(tmp_path):
  spade = spade_jax.Spade(FakeBackbone(), spade_jax.SpadeConfig(
      k_images=2, k_image_score=2, resize=SIZE, crop=SIZE, layers=("layer1",)))
  path = tmp_path / "idx.spade"
  spade_jax.save_index(path, spade.fit(_images(3, 2)))
  tensors = safetensors_numpy.load_file(str(path))
  meta = {**_metadata(path), "padim": "{}"}
  meta.pop("checksums")
  meta["checksums"] = json.dumps(index_file._checksums(tensors, meta))  # pylint: disable=protected-access
  safetensors_numpy.save_file(tensors, str(path), metadata=meta)
  with pytest.raises(ValueError, match="only a PaDiM index has the metadata field 'padim'"):
    spade_jax.load_index(path)


def test_expect_refuses_other_detectors_and_settings(fitted, tmp_path):
  padim, index, train, _ = fitted
  path = tmp_path / "idx.padim"
  spade_jax.save_index(path, index)
  spade = spade_jax.Spade(FakeBackbone(), spade_jax.SpadeConfig(
      k_images=2, k_image_score=2, resize=SIZE, crop=SIZE, layers=("layer1",)))
  patchcore_config = spade_jax.PatchCoreConfig(resize=SIZE, crop=SIZE,
                                               layers=("layer1", "layer2"))
  with pytest.raises(ValueError, match="holds a PadimIndex but a SpadeIndex is expected"):
    spade_jax.load_index(path, expect=spade)
  with pytest.raises(ValueError, match="holds a PadimIndex but a PatchCoreIndex"):
    spade_jax.load_index(path, expect=("fake_pyramid", patchcore_config))
  for change, match in (({"feature_seed": 4}, "refit"), ({"epsilon": 0.1}, "epsilon.*refit"),
                        ({"layers": ("layer1", "layer2")}, "refit")):
    other = spade_jax.PadimConfig(**{**CONFIG.__dict__, **change})
    with pytest.raises(ValueError, match=match):
      spade_jax.load_index(path, expect=("fake_pyramid", other))
  with pytest.raises(ValueError, match="other fake_pyramid weights"):
    spade_jax.load_index(path, expect=spade_jax.Padim(FakeBackbone(seed=1), CONFIG))
  # Settings that leave the statistics alone (sigma, batch_size) are accepted.
  knobs = spade_jax.PadimConfig(**{**CONFIG.__dict__, "sigma": 2.0, "batch_size": 1})
  spade_jax.load_index(path, expect=("fake_pyramid", knobs))
  spade_path = tmp_path / "idx.spade"
  spade_jax.save_index(spade_path, spade.fit(train[:3]))
  with pytest.raises(ValueError, match="holds a SpadeIndex but a PadimIndex is expected"):
    spade_jax.load_index(spade_path, expect=padim)
  with pytest.raises(ValueError, match="PadimIndex, a SpadeIndex or a PatchCoreIndex"):
    spade_jax.save_index(tmp_path / "never.padim", {"mean": 1})
  with pytest.raises(ValueError, match="cannot save.*'channels' is not the channel subset"):
    spade_jax.save_index(tmp_path / "never.padim", index.replace(channels=tuple(range(16))))
  assert not (tmp_path / "never.padim").exists()
  # Drawn from another channel count than the backbone's layers have (C = 24).
  wider = index.replace(num_channels=30, channels=CONFIG.channels(30))
  spade_jax.save_index(tmp_path / "wider.padim", wider)
  with pytest.raises(ValueError, match="drawn from 30 channels, but 'fake_pyramid' has 24"):
    spade_jax.load_index(tmp_path / "wider.padim", expect=padim)


# ----------------------------------------------------------------------------------
# Calibration.


def _reference_scores(train_emb, test_emb, regularization, epsilon=0.01, sigma=4.0):
  """float64 PaDiM image scores of test_emb [M, h, w, d] against Gaussians of train_emb."""
  n, h, w, d = train_emb.shape
  x = train_emb.astype(np.float64).reshape(n, h * w, d).transpose(1, 0, 2)
  mean = x.mean(axis=1)
  if regularization == "paper":
    cov = np.stack([np.cov(p, rowvar=False) + epsilon * np.eye(d) for p in x])
  else:
    cov = np.stack([sk_covariance.ledoit_wolf(p)[0] for p in x])
  y = test_emb.astype(np.float64).reshape(len(test_emb), h * w, d) - mean
  dist = np.sqrt(np.einsum("npd,pde,npe->np", y, np.linalg.inv(cov), y))
  up = np.moveaxis(reference.bilinear(np.moveaxis(dist.reshape(-1, h, w), 0, -1), SIZE,
                                      SIZE), -1, 0)
  maps = np.stack([ndimage.gaussian_filter(m, sigma, mode="reflect", truncate=4.0)
                   for m in up])
  return maps.max(axis=(1, 2))


@pytest.mark.parametrize("folds, regularization", [(3, "paper"), (None, "ledoit_wolf")])
def test_threshold_matches_brute_force_cross_validation(fitted, folds, regularization):
  padim, _, train, _ = fitted
  config = spade_jax.PadimConfig(**{**CONFIG.__dict__, "regularization": regularization})
  detector = spade_jax.Padim(padim.backbone, config)
  emb = detector.extract(train)
  threshold, scores = calibration.padim_threshold(detector, emb, quantile=0.8, folds=folds)
  used = 3 if folds is not None else calibration.PADIM_FOLDS
  expected = np.empty(NUM_TRAIN)
  for held_out in np.array_split(np.arange(NUM_TRAIN), used):
    others = np.setdiff1d(np.arange(NUM_TRAIN), held_out)
    expected[held_out] = _reference_scores(emb[others], emb[held_out], regularization)
  np.testing.assert_allclose(scores, expected, rtol=2e-4)
  assert threshold.value == pytest.approx(np.quantile(expected, 0.8), rel=2e-4)
  assert (threshold.folds, threshold.num_images, threshold.quantile) == (used, NUM_TRAIN, 0.8)
  assert threshold.settings == config.score_settings()
  threshold.check(config)
  with pytest.raises(ValueError, match="sigma=2.0 \\(calibrated with 4.0\\)"):
    threshold.check(spade_jax.PadimConfig(**{**config.__dict__, "sigma": 2.0}))
  with pytest.raises(ValueError, match="calibrated for another detector"):
    threshold.check(spade_jax.PatchCoreConfig())


def test_calibration_folds_of_padim(fitted):
  padim = fitted[0]
  assert calibration.calibration_folds(padim, 20) == calibration.PADIM_FOLDS == 5
  assert calibration.calibration_folds(padim, 3) == 3  # Leave-one-out: 2 images a fold.
  assert calibration.calibration_folds(padim, 4, folds=2) == 2
  for n, folds in ((2, None), (3, 2)):
    with pytest.raises(ValueError, match="PaDiM needs at least 2"):
      calibration.calibration_folds(padim, n, folds=folds)
  patchcore_threshold = calibration.Threshold(
      value=1.0, quantile=0.9, folds=2, num_images=4,
      settings=spade_jax.PatchCoreConfig().score_settings())
  with pytest.raises(ValueError, match="calibrated for another detector"):
    patchcore_threshold.check(CONFIG)


# ----------------------------------------------------------------------------------
# Evaluation config and the scripts' flags.


def test_eval_config_of_padim():
  config = evaluation.EvalConfig(data_dir="d", method="padim", num_features=50,
                                 feature_seed=2)
  recorded = config.to_json()
  assert recorded["method"] == "padim" and recorded["layers"] == list(CONFIG.layers)
  assert {k: recorded[k] for k in ("num_features", "feature_seed", "regularization",
                                   "epsilon")} == {"num_features": 50, "feature_seed": 2,
                                                   "regularization": "paper", "epsilon": 0.01}
  assert "metric" not in recorded and "k_images" not in recorded
  assert "num_features" not in evaluation.EvalConfig(data_dir="d").to_json()
  assert config.detector_config(4) == spade_jax.PadimConfig(num_features=50, feature_seed=2,
                                                            batch_size=4)
  lw = evaluation.EvalConfig(data_dir="d", method="padim", regularization="ledoit_wolf")
  assert lw.to_json()["epsilon"] is None  # Unused by Ledoit-Wolf.
  with pytest.raises(ValueError, match="Mahalanobis"):
    evaluation.EvalConfig(data_dir="d", method="padim", metric="cosine")
  with pytest.raises(ValueError, match="PadimConfig.epsilon"):
    evaluation.EvalConfig(data_dir="d", method="padim", epsilon=0.0)
  with pytest.raises(ValueError, match="PaDiM needs at least 2"):
    config_lib.check_test_labels("c", [0, 1], 1, config)


@pytest.mark.parametrize("method, given, needles", [
    ("padim", {"kappa", "coreset_ratio"}, ["--coreset_ratio, --kappa are not used by "
                                           "--method=padim", "--method=patchcore/spade"]),
    ("padim", {"metric"}, ["--metric is not used by --method=padim"]),
    ("spade", {"epsilon", "num_features"}, ["--epsilon, --num_features are not used by "
                                            "--method=spade", "--method=padim"]),
    ("patchcore", {"regularization"}, ["--regularization is not used"]),
    ("padim", {"num_features", "feature_seed", "regularization", "epsilon", "sigma",
               "layers", "weights"}, []),
    ("spade", {"metric", "k_images"}, []),
    ("patchcore", {"metric", "reweight"}, []),
])
def test_flags_of_other_methods_are_refused(method, given, needles):
  if not needles:
    detector_flags.check_method_flags(method, given)
    return
  with pytest.raises(ValueError) as e:
    detector_flags.check_method_flags(method, given)
  for needle in needles:
    assert needle in str(e.value)


def _flag_settings(**changes):
  return {"method": "padim", "backbone": "fake_pyramid", "weights": None,
          "k_images": 50, "k_image_score": 50, "kappa": 1, "layers": CONFIG.layers,
          "combine": "ensemble", "sigma": 4.0, "metric": "l2", "aggregate": "mean",
          "bandwidth": None, "resize": SIZE, "crop": SIZE, "coreset_ratio": 0.1,
          "patch_size": 3, "reweight": False, "num_features": 16, "feature_seed": 3,
          "regularization": "paper", "epsilon": 0.01, **changes}


def test_settings_from_a_padim_index(fitted):
  _, index, _, _ = fitted
  recorded = detector_flags.recorded_settings("padim", _flag_settings())
  assert "metric" not in recorded and "kappa" not in recorded
  assert recorded["num_features"] == 16 and recorded["weights"] == "none"
  threshold = calibration.Threshold(value=1.0, quantile=0.9, folds=2, num_images=4,
                                    settings=CONFIG.score_settings())
  contents = index_file.IndexFile(index, threshold, recorded)
  defaults = _flag_settings(method="spade", layers=("layer2",), num_features=None,
                            feature_seed=0, epsilon=0.5, sigma=1.0, resize=256, crop=224)
  out = detector_flags.settings_from_index(defaults, set(), contents, "x.padim")
  assert {k: out[k] for k in ("method", "layers", "num_features", "feature_seed",
                              "regularization", "epsilon", "sigma", "resize", "crop")} == {
      "method": "padim", "layers": CONFIG.layers, "num_features": 16, "feature_seed": 3,
      "regularization": "paper", "epsilon": 0.01, "sigma": 4.0, "resize": SIZE, "crop": SIZE}
  assert detector_flags.detector_config("padim", out, 4) == spade_jax.PadimConfig(
      **{**CONFIG.__dict__, "batch_size": 4})
  for flag, value, match in (("epsilon", 0.5, "--epsilon=0.5 does not match the index"),
                             ("feature_seed", 0, "--feature_seed=0 does not match"),
                             ("sigma", 1.0, "--sigma=1.0 differs from the sigma=4.0"),
                             ("kappa", 1, "--kappa is not used by --method=padim")):
    with pytest.raises(ValueError, match=match):
      detector_flags.settings_from_index(_flag_settings(**{flag: value}), {flag}, contents,
                                         "x.padim")
