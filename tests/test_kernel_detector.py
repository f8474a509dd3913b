"""Kernelized SPADE in the detector (issue 11): SpadeConfig.metric naming a kernel,
aggregate / bandwidth, the kernels and bandwidths carried by the SpadeIndex, stored in
index files, used by the calibration and set from the scripts' flags.

References are independent of the detector: spade_jax.image_scores / pixel_scores
with kernels fitted by spade_jax.kernels on the extracted features, and a brute-force
leave-one-out for the calibration.
"""

import json
import os
import pathlib
import struct
import subprocess

import jax
from mvtec_fixtures import write_category
import numpy as np
import PIL.Image
import pytest
from safetensors import numpy as safetensors_numpy
import script_server
from spade_fake_backbone import FakeBackbone

import spade_jax
from spade_jax import evaluation, kernels
from spade_jax.detector import calibration, index_file
from spade_jax.evaluation import results as results_lib
from spade_jax.scoring import anomaly_map

REPO = pathlib.Path(__file__).resolve().parents[1]
BASE = {"k_images": 3, "k_image_score": 2, "resize": 72, "crop": 64, "batch_size": 3,
        "layers": ("layer1", "layer2", "layer3")}
# Flags the tiny script categories accept (efficientnet_lite0, random weights).
SMALL = ("--weights=none", "--k_images=2", "--k_image_score=2", "--resize=64", "--crop=64",
         "--layers=layer1")


def _spade(**overrides):
  return spade_jax.Spade(FakeBackbone(), spade_jax.SpadeConfig(**{**BASE, **overrides}))


@pytest.fixture(name="images", scope="module")
def fixture_images():
  rng = np.random.default_rng(0)
  return rng.integers(0, 256, (7, 72, 72, 3), np.uint8), rng.integers(0, 256, (3, 72, 72, 3),
                                                                      np.uint8)


@pytest.fixture(name="maha", scope="module")
def fixture_maha(images):
  """Spade(metric="mahalanobis", aggregate="softmin") and its fitted index."""
  spade = _spade(metric="mahalanobis", aggregate="softmin")
  return spade, spade.fit(images[0])


def _reference(spade, train, test, pool_kernel, level_kernels, pool_h=None, level_h=None):
  """Image scores and maps from the public scores (not the detector's scoring)."""
  cfg = spade.config
  train_pool, train_feats = spade.extract(train)
  test_pool, test_feats = spade.extract(test)
  aggregate = {"aggregate": cfg.aggregate}
  scores, nbrs = spade_jax.image_scores(test_pool, train_pool, cfg.k_image_score, pool_kernel,
                                        num_neighbors=cfg.k_images, bandwidth=pool_h,
                                        **aggregate)
  maps = spade_jax.pixel_scores(test_feats, train_feats, nbrs, kappa=cfg.kappa,
                                metric=level_kernels, bandwidth=level_h, **aggregate)
  maps = anomaly_map.anomaly_maps(np.asarray(maps), (cfg.crop, cfg.crop), sigma=cfg.sigma)
  return np.asarray(scores), np.asarray(maps), train_pool, train_feats


def test_mahalanobis_equals_the_kernel_scores(images):
  train, test = images
  spade = _spade(metric="mahalanobis")
  index = spade.fit(train)
  assert index.fitted_metric == "mahalanobis" and index.bandwidths == ()
  assert sorted(index.kernels) == ["layer1", "layer2", "layer3", "pool"]
  pool, feats = spade.extract(train)
  ref_scores, ref_maps, _, _ = _reference(
      spade, train, test, kernels.mahalanobis(pool),
      {l: kernels.mahalanobis(feats[l]) for l in BASE["layers"]})
  scores, maps = spade.score(index, test)
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(maps, ref_maps, rtol=1e-5, atol=1e-6)
  # Whitening changes the numbers: the kernel is really used.
  l2_scores, _ = _spade().score(_spade().fit(train), test)
  assert not np.allclose(scores, l2_scores, rtol=1e-3)


def test_softmin_uses_the_median_bandwidths(images, maha):
  train, test = images
  spade, index = maha
  known = dict(index.bandwidths)
  assert sorted(known) == ["layer1", "layer2", "layer3", "pool"]
  assert all(h > 0 for h in known.values())
  ref_scores, ref_maps, pool, feats = _reference(
      spade, train, test, index.kernels["pool"],
      {l: index.kernels[l] for l in BASE["layers"]}, known["pool"],
      {l: known[l] for l in BASE["layers"]})
  # The median heuristic is variants.median_bandwidths in the kernels' units.
  pool_h, level_h = spade_jax.scoring.variants.median_bandwidths(
      pool, feats, metrics=index.kernels)
  assert known == pytest.approx({"pool": pool_h, **level_h}, rel=1e-6)
  scores, maps = spade.score(index, test)
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(maps, ref_maps, rtol=1e-5, atol=1e-6)


def test_softmin_limits_are_spade_scores(images):
  train, test = images
  mean = _spade()  # SPADE: l2, mean, k_image_score = 2, kappa = 1.
  nearest = _spade(k_image_score=1)
  mean_scores, mean_maps = mean.score(mean.fit(train), test)
  nearest_scores, _ = nearest.score(nearest.fit(train), test)
  tiny = _spade(aggregate="softmin", bandwidth=1e-6)
  scores, maps = tiny.score(tiny.fit(train), test)
  # h -> 0: d_1 (+ at most h log k).
  np.testing.assert_allclose(scores, nearest_scores, rtol=1e-5, atol=1e-6 * np.log(2) + 1e-6)
  np.testing.assert_allclose(maps, mean_maps, rtol=1e-5, atol=1e-6)  # kappa = 1: any h.
  huge = _spade(aggregate="softmin", bandwidth=1e4)
  scores, _ = huge.score(huge.fit(train), test)
  np.testing.assert_allclose(scores, mean_scores, rtol=1e-4)  # h -> inf: the mean.


def test_defaults_fit_nothing(images):
  index = _spade().fit(images[0])
  assert (index.kernels, index.fitted_metric, index.bandwidths) == ({}, None, ())
  assert len(jax.tree_util.tree_leaves(index)) == 4


def test_index_for_another_metric_is_refused_then_fitted(images, maha):
  train, test = images
  spade, index = maha
  plain = _spade().fit(train)
  with pytest.raises(ValueError, match="fit_kernels"):
    spade.score(plain, test)
  refitted = spade.fit_kernels(plain)
  assert refitted.bandwidths == index.bandwidths
  np.testing.assert_array_equal(spade.score(refitted, test)[0], spade.score(index, test)[0])
  assert spade.fit_kernels(index) is index  # Nothing missing: unchanged.
  rbf = _spade(metric="rbf")
  with pytest.raises(ValueError, match="metric 'mahalanobis'.*fit_kernels"):
    rbf.score(index, test)
  # A fixed metric ignores the kernels; an explicit bandwidth needs no median.
  _spade().score(index, test[:1])
  _spade(metric="mahalanobis", aggregate="kde", bandwidth=0.5).score(index, test[:1])


def test_fit_kernels_reuses_the_kernels_of_the_same_metric(images, maha):
  spade, index = maha  # mahalanobis + softmin.
  mean_index = _spade(metric="mahalanobis").fit(images[0])
  completed = spade.fit_kernels(mean_index)  # Only the bandwidths are missing.
  assert completed.kernels["layer2"] is mean_index.kernels["layer2"]
  assert dict(completed.bandwidths) == pytest.approx(dict(index.bandwidths), rel=1e-6)
  mesh = jax.make_mesh((2,), ("data",))
  sharded = spade.fit_kernels(spade_jax.detector.shard_index(mean_index, mesh))
  assert dict(sharded.bandwidths) == pytest.approx(dict(index.bandwidths), rel=1e-6)


def test_sharded_index_gives_the_same_scores(images, maha):
  _, test = images
  spade, index = maha
  mesh = jax.make_mesh((4,), ("data",))
  sharded = spade_jax.detector.shard_index(index, mesh)
  assert sharded.is_sharded
  for leaf in jax.tree_util.tree_leaves(sharded.kernels):
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 4
  np.testing.assert_allclose(spade.score(sharded, test)[0], spade.score(index, test)[0],
                             rtol=1e-5, atol=1e-6)
  # Fitting on a mesh fits on the gathered rows: the same kernels.
  fitted = spade.fit(images[0], mesh=mesh)
  np.testing.assert_allclose(np.asarray(fitted.kernels["layer1"].eigvecs),
                             np.asarray(index.kernels["layer1"].eigvecs), rtol=1e-5, atol=1e-6)
  assert dict(fitted.bandwidths) == pytest.approx(dict(index.bandwidths))


# ----------------------------------------------------------------------------------
# Index files.


def _header(path):
  raw = path.read_bytes()
  (size,) = struct.unpack("<Q", raw[:8])
  return json.loads(raw[8:8 + size]), 8 + size


def test_save_load_round_trip_gives_identical_scores(images, maha, tmp_path):
  _, test = images
  spade, index = maha
  path = tmp_path / "maha.spade"
  spade_jax.save_index(path, index)
  loaded = spade_jax.load_index(path, expect=spade)
  assert (loaded.fitted_metric, loaded.bandwidths) == ("mahalanobis", index.bandwidths)
  for a, b in zip(jax.tree_util.tree_leaves(loaded.kernels),
                  jax.tree_util.tree_leaves(index.kernels)):
    np.testing.assert_array_equal(a, b)
  for got, want in zip(spade.score(loaded, test), spade.score(index, test)):
    np.testing.assert_array_equal(got, want)
  header, _ = _header(path)
  meta = header["__metadata__"]
  assert meta["version"] == index_file.INDEX_VERSION == "3"
  checksums = json.loads(meta["checksums"])
  assert "kernels/pool/eigvecs" in checksums and "kernels/layer3/center" in checksums
  # An index without kernels is still written (and read) as version 2.
  plain = tmp_path / "plain.spade"
  spade_jax.save_index(plain, _spade().fit(images[0]))
  assert _header(plain)[0]["__metadata__"]["version"] == "2"
  assert spade_jax.load_index(plain).fitted_metric is None


def test_tampered_kernel_array_fails_its_checksum(maha, tmp_path):
  _, index = maha
  path = tmp_path / "maha.spade"
  spade_jax.save_index(path, index)
  header, start = _header(path)
  begin, end = header["kernels/pool/eigvecs"]["data_offsets"]
  raw = bytearray(path.read_bytes())
  raw[start + begin:start + end] = np.frombuffer(
      bytes(raw[start + begin:start + end]), "<f4").__mul__(1.5).astype("<f4").tobytes()
  path.write_bytes(bytes(raw))
  with pytest.raises(ValueError, match=r"'kernels/pool/eigvecs' does not match its checksum"):
    spade_jax.load_index(path)


def _forge_kernels(path, edit):
  """Rewrites the file's "kernels" field with edit(field) and self-consistent checksums,
  so that only the structural checks can object."""
  tensors = safetensors_numpy.load_file(str(path))
  header, _ = _header(path)
  meta = dict(header["__metadata__"])
  field = json.loads(meta["kernels"])
  edit(field, tensors)
  meta["kernels"] = json.dumps(field)
  meta.pop("checksums")
  meta["checksums"] = json.dumps(index_file._checksums(tensors, meta))  # pylint: disable=protected-access
  safetensors_numpy.save_file(tensors, str(path), metadata=meta)


def _set(field, path, value):
  *parents, last = path
  for key in parents:
    field = field[key]
  field[last] = value


@pytest.mark.parametrize("path, value, message", [
    (("spec", "levels", "pool", "kernel"), "os.system", "unknown kernel 'os.system'"),
    (("spec", "levels", "pool", "kernel"), "rbf", "has the arrays"),
    (("spec", "levels", "pool", "static"), {"complete": True, "__class__": "x"},
     "static fields"),
    (("spec", "levels", "pool", "static"), {"complete": [1]}, "must be a string"),
    (("metric",), "__import__('os')", "metric="),
    (("metric",), "l2", "kernel spec for the fixed metric"),
    (("bandwidths",), {"pool": -1.0}, "bandwidths="),
    (("bandwidths",), {"layer9": 1.0}, "bandwidths="),
])
def test_forged_kernel_field_is_refused(maha, tmp_path, path, value, message):
  _, index = maha
  file = tmp_path / "maha.spade"
  spade_jax.save_index(file, index)
  _forge_kernels(file, lambda field, _: _set(field, path, value))
  with pytest.raises(ValueError, match=message) as e:
    spade_jax.load_index(file)
  assert str(file) in str(e.value)


def test_forged_kernel_of_the_wrong_size_is_refused(maha, tmp_path):
  _, index = maha
  file = tmp_path / "maha.spade"
  spade_jax.save_index(file, index)

  def swap(_, tensors):  # layer1's kernel under pool's name: 6-d, the pool is 12-d.
    for name in [n for n in tensors if n.startswith("kernels/pool/")]:
      tensors[name] = tensors[name.replace("/pool/", "/layer1/")]

  _forge_kernels(file, swap)
  with pytest.raises(ValueError, match="kernel of part 'pool' takes 6-d features"):
    spade_jax.load_index(file)


# ----------------------------------------------------------------------------------
# Configuration and calibration.


@pytest.mark.parametrize("overrides, message", [
    ({"metric": "hamming"}, "metric must be a metric.*mahalanobis"),
    ({"metric": "mahalanobis", "combine": "cat"}, "combine='ensemble'"),
    ({"aggregate": "max"}, "aggregate must be one of"),
    ({"bandwidth": 1.0}, "only used by aggregate"),
    ({"aggregate": "kde", "bandwidth": 0.0}, "bandwidth must be a finite number > 0"),
    ({"aggregate": "kde", "bandwidth": float("nan")}, "bandwidth must be"),
    ({"aggregate": "softmin", "bandwidth": float("inf")}, "bandwidth must be"),
    ({"aggregate": "softmin", "bandwidth": True}, "bandwidth must be"),
])
def test_config_validation(overrides, message):
  with pytest.raises(ValueError, match=message):
    spade_jax.SpadeConfig(**overrides)


def test_config_defaults_are_spade():
  config = spade_jax.SpadeConfig()
  assert (config.metric, config.aggregate, config.bandwidth) == ("l2", "mean", None)
  assert set(spade_jax.detector.KERNEL_METRICS) == {
      "mahalanobis", "learned", "linear", "rbf", "laplacian", "polynomial", "rff", "nystrom"}
  assert spade_jax.SpadeConfig(aggregate="kde", bandwidth=2).bandwidth == 2.0


@pytest.mark.parametrize("aggregate", ["mean", "softmin"])
def test_calibration_fits_the_kernel_on_each_fold(aggregate):
  rng = np.random.default_rng(3)
  pool = rng.standard_normal((9, 5)).astype(np.float32)
  spade = _spade(metric="mahalanobis", aggregate=aggregate, k_image_score=2)
  threshold, scores = calibration.spade_threshold(spade, pool, quantile=0.75, folds=3)
  expected = []
  for held in np.array_split(np.arange(9), 3):
    train = np.setdiff1d(np.arange(9), held)
    kernel = kernels.mahalanobis(pool[train])
    h = None
    if aggregate != "mean":  # The median distance of a training image to its nearest.
      d = np.asarray(kernel.exact(kernel.prepare(pool[train])[:, None],
                                  kernel.prepare(pool[train])[None]))
      h = float(np.median(np.sort(d + np.diag(np.full(len(train), np.inf)), 1)[:, 0]))
    ref, _ = spade_jax.image_scores(pool[held], pool[train], 2, kernel, aggregate=aggregate,
                                    bandwidth=h)
    expected.append(np.asarray(ref))
  np.testing.assert_allclose(scores, np.concatenate(expected), rtol=1e-4, atol=1e-6)
  assert threshold.settings == {"k_image_score": 2, "metric": "mahalanobis",
                                "aggregate": aggregate, "bandwidth": None}


def test_eval_config_records_and_checks_the_scoring(tmp_path):
  config = evaluation.EvalConfig(data_dir="d", metric="mahalanobis", aggregate="softmin")
  assert {k: config.to_json()[k] for k in ("metric", "aggregate", "bandwidth")} == {
      "metric": "mahalanobis", "aggregate": "softmin", "bandwidth": None}
  assert config.spade_config(2).aggregate == "softmin"
  # PatchCore takes the kernels too (issue 18), and records its metric.
  assert evaluation.EvalConfig(data_dir="d", method="patchcore",
                               metric="mahalanobis").to_json()["metric"] == "mahalanobis"
  with pytest.raises(ValueError, match="neither a metric"):
    evaluation.EvalConfig(data_dir="d", method="patchcore", metric="hamming")
  with pytest.raises(ValueError, match="soft scores are SPADE's"):
    evaluation.EvalConfig(data_dir="d", method="patchcore", aggregate="kde")
  assert "aggregate" not in evaluation.EvalConfig(data_dir="d", method="patchcore").to_json()
  # A results.json written before aggregate / bandwidth were recorded resumes as "mean".
  old = {k: v for k, v in evaluation.EvalConfig(data_dir="d").to_json().items()
         if k not in ("aggregate", "bandwidth")}
  entry = {"image_auroc": 0.5, "pixel_auroc": 0.5, "au_pro": 0.5, "n_train": 3, "n_test": 4,
           "seconds": 1.0}
  (tmp_path / evaluation.RESULTS_FILE).write_text(json.dumps(
      {"config": old, "categories": {"alpha": entry}, "mean": {}}))
  resumed = results_lib.load_results(tmp_path, evaluation.EvalConfig(data_dir="d"))
  assert list(resumed["categories"]) == ["alpha"]
  with pytest.raises(ValueError, match="another config"):
    results_lib.load_results(tmp_path, evaluation.EvalConfig(data_dir="d", aggregate="kde"))


# ----------------------------------------------------------------------------------
# The scripts.


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return script_server.run_script(script, *args, env=env, timeout=300)


@pytest.fixture(name="data_dir", scope="module")
def fixture_data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("kernel_scripts") / "data"
  write_category(root, "alpha", n_train=4, seed=1)
  return root


@pytest.mark.slow
def test_evaluate_script_records_metric_and_aggregate(data_dir, tmp_path):
  out = tmp_path / "out"
  proc = _run("evaluate.py", f"--data_dir={data_dir}", *SMALL, "--num_heatmaps=0",
              "--metric=mahalanobis", "--aggregate=softmin", f"--output_dir={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((out / evaluation.RESULTS_FILE).read_text())
  assert {k: results["config"][k] for k in ("metric", "aggregate", "bandwidth")} == {
      "metric": "mahalanobis", "aggregate": "softmin", "bandwidth": None}
  assert list(results["categories"]) == ["alpha"]
  assert 0 <= results["categories"]["alpha"]["image_auroc"] <= 1


@pytest.mark.parametrize("flags, needles", [
    (("--metric=hamming",), ("evaluate.py: error:", "'hamming'", "mahalanobis")),
    (("--aggregate=max",), ("--aggregate", "softmin")),
    (("--aggregate=kde", "--bandwidth=-1"), ("evaluate.py: error:", "bandwidth")),
    (("--bandwidth=2",), ("evaluate.py: error:", "only used by aggregate")),
    (("--metric=rbf", "--combine=cat"), ("evaluate.py: error:", "combine='ensemble'")),
    (("--method=patchcore", "--metric=hamming"), ("evaluate.py: error:", "'hamming'",
                                                  "mahalanobis")),
    (("--method=patchcore", "--aggregate=softmin"), ("evaluate.py: error:",
                                                     "--aggregate is not used by "
                                                     "--method=patchcore")),
])
@pytest.mark.slow
def test_evaluate_script_bad_names_are_clean_errors(data_dir, tmp_path, flags, needles):
  small = SMALL if "--method=patchcore" not in flags else [  # SPADE's flags are refused.
      f for f in SMALL if not f.startswith("--k_")]
  proc = _run("evaluate.py", f"--data_dir={data_dir}", *small, *flags,
              f"--output_dir={tmp_path / 'out'}")
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  for needle in needles:
    assert needle in proc.stderr, proc.stderr[-3000:]
  assert not (tmp_path / "out").exists()


@pytest.fixture(name="fitted_index", scope="module")
def fixture_fitted_index(data_dir, tmp_path_factory):
  """fit.py --metric=mahalanobis --aggregate=kde --calibrate."""
  index = tmp_path_factory.mktemp("kernel_fit") / "alpha.spade"
  proc = _run("fit.py", f"--train_dir={data_dir / 'alpha' / 'train'}", f"--index={index}",
              *SMALL, "--metric=mahalanobis", "--aggregate=kde", "--calibrate",
              "--calibration_quantile=0.5")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return index


@pytest.mark.slow
def test_fit_script_stores_kernels_and_calibrates_with_them(fitted_index):
  contents = index_file.load_index_file(fitted_index)
  index = contents.index
  assert index.fitted_metric == "mahalanobis" and sorted(index.kernels) == ["layer1", "pool"]
  assert sorted(dict(index.bandwidths)) == ["layer1", "pool"]
  assert contents.threshold.settings == {"k_image_score": 2, "metric": "mahalanobis",
                                         "aggregate": "kde", "bandwidth": None}
  assert (contents.settings["metric"], contents.settings["aggregate"]) == ("mahalanobis",
                                                                           "kde")


@pytest.mark.slow
def test_predict_script_takes_the_scoring_from_the_index(data_dir, fitted_index, tmp_path):
  out = tmp_path / "out"
  proc = _run("predict.py", f"--index={fitted_index}", f"--images={data_dir / 'alpha' / 'test'}",
              f"--output_dir={out}", "--heatmaps=false", "--num_summary=0")
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [row.split(",") for row in (out / "scores.csv").read_text().splitlines()]
  assert rows[0] == ["path", "score", "anomalous"] and len(rows) == 6
  # The scores of the index's kernels and bandwidths, as Spade.score gives them here.
  spade = spade_jax.Spade(spade_jax.load_backbone("efficientnet_lite0", weights=None),
                          spade_jax.SpadeConfig(k_images=2, k_image_score=2, resize=64, crop=64,
                                                layers=("layer1",), metric="mahalanobis",
                                                aggregate="kde"))
  test = np.stack([np.asarray(PIL.Image.open(data_dir / "alpha" / "test" / row[0]).convert("RGB"))
                   for row in rows[1:]])
  expected, _ = spade.score(spade_jax.load_index(fitted_index, expect=spade), test)
  np.testing.assert_allclose([float(row[1]) for row in rows[1:]], expected, rtol=1e-5)
  # A flag that contradicts the calibrated threshold is refused.
  proc = _run("predict.py", f"--index={fitted_index}", f"--images={data_dir / 'alpha' / 'test'}",
              f"--output_dir={tmp_path / 'other'}", "--aggregate=mean")
  assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert "predict.py: error:" in proc.stderr and "--aggregate=mean" in proc.stderr


@pytest.mark.parametrize("metric,expected_folds", [("mahalanobis", 12), ("learned", 5)])
def test_calibration_default_folds(monkeypatch, metric, expected_folds):
  # Leave-one-out by default, but a learned kernel is learned once per fold (optax, seconds
  # each): 5 folds then. The stub fits a closed-form kernel and counts the fits.
  pool = np.random.default_rng(4).standard_normal((12, 4)).astype(np.float32)
  fits = []

  def fit_metric(config, train_pool, train_features, **_):
    del config, train_features
    fits.append(len(train_pool))
    return {"pool": kernels.mahalanobis(train_pool)}, {}

  monkeypatch.setattr(calibration.metric_fit, "fit_metric", fit_metric)
  threshold, scores = calibration.spade_threshold(_spade(metric=metric, k_image_score=2), pool)
  assert threshold.folds == expected_folds and len(fits) == expected_folds
  assert scores.shape == (12,) and np.all(np.isfinite(scores))
