"""PatchCore with a kernel metric (issue 18, part 1) against float64 NumPy references.

The references are independent of spade_jax's kernels: Mahalanobis whitens the patches
with scikit-learn's Ledoit-Wolf covariance, the polynomial and RBF kernels are their
formulas (d_k^2 = k(x, x) + k(y, y) - 2 k(x, y)) with the parameters their heuristics
choose; the greedy k-center coreset runs in the kernel's space and each patch is scored
by its nearest bank entry. Features are random (no backbone) except for the scripts'
test, so every detector call here compiles for tiny shapes only.
"""

import json
import pathlib
import sys
import types

import jax
from mvtec_fixtures import write_category
import numpy as np
import pytest
from safetensors import safe_open
from scipy import ndimage
from sklearn.covariance import LedoitWolf
from test_anomaly_map import _bilinear_ref
from test_fit_predict import assert_clean_error, read_scores, run_script

import spade_jax
from spade_jax.data import mvtec
from spade_jax.detector import calibration, index_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))
import detector_flags  # noqa: E402  (the scripts' module, beside them)

GRID, DIM, CROP = 6, 5, 24
NUM_TRAIN = 6
BANK = int(0.2 * NUM_TRAIN * GRID * GRID)  # coreset_ratio 0.2 of 216 patches: 43.


class _NoBackbone:
  """fit_features / score_features take features: a backbone that is never called."""
  name = "none"
  features = {"layer2": DIM}


def _config(metric: str, **kwargs) -> spade_jax.PatchCoreConfig:
  settings = {"layers": ("layer2",), "resize": CROP, "crop": CROP, "coreset_ratio": 0.2,
              "projection_dim": None, "sigma": 1.0, "batch_size": 2, "metric": metric}
  return spade_jax.PatchCoreConfig(**{**settings, **kwargs})


def _detector(metric: str, **kwargs) -> spade_jax.PatchCore:
  return spade_jax.PatchCore(_NoBackbone(), _config(metric, **kwargs))


@pytest.fixture(name="feats", scope="module")
def fixture_features():
  """(train [6, 6, 6, 5], test [3, 6, 6, 5]) float32 patches with correlated channels of
  unequal scales (Mahalanobis differs from L2); test patches partly shifted away."""
  rng = np.random.default_rng(7)
  mix = rng.standard_normal((DIM, DIM)) * np.array([3.0, 1.0, 0.5, 0.2, 0.1])[:, None]
  train = rng.standard_normal((NUM_TRAIN, GRID, GRID, DIM)) @ mix + 1.0
  test = rng.standard_normal((3, GRID, GRID, DIM)) @ mix + 1.0
  test[1:, 2:4, 2:4] += 2.0 * rng.standard_normal((2, 2, 2, DIM))
  return train.astype(np.float32), test.astype(np.float32)


# ----------------------------------------------------------------------------------
# NumPy references (float64).


def _greedy(distance_to, num_rows: int, size: int) -> np.ndarray:
  """Greedy k-center from row 0: each step the row farthest from the selected ones;
  distance_to(i) -> [num_rows] distances of every row to row i."""
  chosen = [0]
  mins = distance_to(0)
  mins[0] = -np.inf
  for _ in range(size - 1):
    best = int(np.argmax(mins))
    chosen.append(best)
    mins = np.minimum(mins, distance_to(best))
    mins[chosen] = -np.inf
  return np.array(chosen)


def _whitener(rows: np.ndarray) -> np.ndarray:
  """Sigma^{-1/2} of scikit-learn's Ledoit-Wolf covariance of rows [N, D]."""
  values, vectors = np.linalg.eigh(LedoitWolf().fit(rows).covariance_)
  return vectors @ np.diag(values ** -0.5) @ vectors.T


def _poly(x, y, gamma):
  return (gamma * x @ y.T + 1.0) ** 2


def _distances(name: str, train_rows: np.ndarray):
  """The reference kernel-induced distance of `name` fitted on train_rows [N, D]:
  (x [A, D], y [B, D]) -> [A, B]."""
  if name == "mahalanobis":
    w = _whitener(train_rows)
    return lambda x, y: np.linalg.norm((x @ w)[:, None] - (y @ w)[None], axis=-1)
  if name == "polynomial":  # from_features: gamma = 1 / mean |x|^2, offset 1, degree 2.
    gamma = 1.0 / np.mean(np.sum(train_rows ** 2, axis=1))

    def poly(x, y):
      sq = (np.diag(_poly(x, x, gamma))[:, None] + np.diag(_poly(y, y, gamma))[None]
            - 2.0 * _poly(x, y, gamma))
      return np.sqrt(np.maximum(sq, 0.0))
    return poly
  assert name == "rbf"  # Median heuristic over all pairs of (at most 1000) rows.
  d2 = np.sum((train_rows[:, None] - train_rows[None]) ** 2, axis=-1)
  h = np.sqrt(np.median(d2[np.triu_indices(len(train_rows), 1)]))
  return lambda x, y: np.sqrt(2.0 - 2.0 * np.exp(
      -np.sum((x[:, None] - y[None]) ** 2, axis=-1) / (2.0 * h * h)))


def reference(name: str, train: np.ndarray, test: np.ndarray, size: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(bank [size, D], image scores [N], patch-score maps [N, h, w]) of PatchCore with
  kernel `name` fitted on train [M, h, w, D] (exact greedy in the kernel's distance)."""
  rows = train.reshape(-1, DIM).astype(np.float64)
  dist = _distances(name, rows)
  bank = rows[_greedy(lambda i: dist(rows, rows[i:i + 1])[:, 0], len(rows), size)]
  n, h, w, _ = test.shape
  patch = dist(test.reshape(-1, DIM).astype(np.float64), bank).min(axis=1).reshape(n, h, w)
  return bank, patch.reshape(n, -1).max(axis=1), patch


def _maps(score_maps: np.ndarray, sigma: float = 1.0) -> np.ndarray:
  return np.stack([ndimage.gaussian_filter(m, sigma, mode="reflect", truncate=4.0)
                   for m in _bilinear_ref(score_maps, CROP, CROP)])


# ----------------------------------------------------------------------------------
# The detector against the references.


@pytest.fixture(name="fitted", scope="module")
def fixture_fitted(feats):
  """metric -> (detector, index) fitted on the train patches."""
  train, _ = feats
  out = {}
  for name in ("mahalanobis", "polynomial", "rbf"):
    detector = _detector(name)
    out[name] = (detector, detector.fit_features(train))
  return out


@pytest.mark.parametrize("name", ["mahalanobis", "polynomial", "rbf"])
def test_kernel_patchcore_matches_numpy_reference(feats, fitted, name):
  train, test = feats
  detector, index = fitted[name]
  assert index.fitted_metric == name and type(index.kernel).name == (
      "mahalanobis" if name == "mahalanobis" else name)
  bank, scores, score_maps = reference(name, train, test, BANK)
  # The bank: the training patches the greedy picks in the kernel's space, untransformed.
  np.testing.assert_allclose(np.asarray(index.bank), bank, rtol=1e-6, atol=1e-6)
  got_scores, got_maps = detector.score_features(index, test)
  np.testing.assert_allclose(got_scores, scores, rtol=2e-4, atol=1e-5)
  np.testing.assert_allclose(got_maps, _maps(score_maps), rtol=2e-4, atol=1e-5)


def test_mahalanobis_is_not_l2(feats, fitted):
  """The control: the L2 bank and scores differ (the kernel changes the detector)."""
  train, test = feats
  l2 = _detector("l2")
  l2_index = l2.fit_features(train)
  assert l2_index.kernel is None and l2_index.fitted_metric is None
  mahalanobis_bank, _, _ = reference("mahalanobis", train, test, BANK)
  assert not np.allclose(np.asarray(l2_index.bank), mahalanobis_bank)
  rows = train.reshape(-1, DIM)
  np.testing.assert_array_equal(
      np.asarray(l2_index.bank),
      rows[np.asarray(spade_jax.coreset(rows, BANK, projection_dim=None))])
  assert not np.allclose(l2.score_features(l2_index, test)[0],
                         fitted["mahalanobis"][0].score_features(fitted["mahalanobis"][1],
                                                                 test)[0])


def test_projected_coreset_runs_on_the_whitened_rows(feats):
  """With a projection, the greedy projects the whitened rows (the kernel's space)."""
  train, _ = feats
  index = _detector("mahalanobis", projection_dim=3, coreset_seed=2).fit_features(train)
  rows = train.reshape(-1, DIM)
  white = (rows.astype(np.float64) @ _whitener(rows.astype(np.float64))).astype(np.float32)
  chosen = np.asarray(spade_jax.coreset(white, BANK, projection_dim=3, key=2))
  np.testing.assert_array_equal(np.asarray(index.bank), rows[chosen])


def test_every_kernel_metric_fits_and_scores(feats):
  """Each of KERNEL_METRICS fits on the patches and gives finite scores; "learned" is
  Mahalanobis whose shrinkage and bandwidth were learned (held out: whole images)."""
  train, test = feats
  assert set(spade_jax.detector.KERNEL_METRICS) == {
      "mahalanobis", "learned", "linear", "rbf", "laplacian", "polynomial", "rff",
      "nystrom"}
  for name in ("learned", "nystrom"):  # (The other L2 kernels take nystrom's path.)
    detector = _detector(name, projection_dim=4)
    index = detector.fit_features(train[:3])
    scores, maps = detector.score_features(index, test[:2])
    assert np.all(np.isfinite(scores)) and np.all(np.isfinite(maps)), name
    assert index.num_entries == int(0.2 * 3 * GRID * GRID)
  assert type(index.kernel).name == "nystrom"


def test_sharded_fit_and_score_equal_single_device(feats, fitted):
  train, test = feats
  mesh = jax.make_mesh((len(jax.devices()),), ("data",))
  assert len(jax.devices()) == 8
  for name in ("mahalanobis", "polynomial"):
    detector, index = fitted[name]
    sharded = detector.fit_features(train, mesh=mesh)
    assert sharded.is_sharded and sharded.fitted_metric == name
    np.testing.assert_array_equal(sharded.bank.to_numpy(), np.asarray(index.bank))
    for a, b in zip(jax.tree.leaves(sharded.kernel), jax.tree.leaves(index.kernel)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(detector.score_features(sharded, test)[0],
                               detector.score_features(index, test)[0], rtol=1e-5)
  # With the default random projection (the whitened rows projected on every device).
  detector = _detector("mahalanobis", projection_dim=3)
  np.testing.assert_array_equal(detector.fit_features(train, mesh=mesh).bank.to_numpy(),
                                np.asarray(detector.fit_features(train).bank))


def test_save_load_round_trip(feats, fitted, tmp_path):
  _, test = feats
  detector, index = fitted["mahalanobis"]
  path = tmp_path / "k.patchcore"
  spade_jax.save_index(path, index)
  with safe_open(str(path), framework="numpy") as f:
    metadata, names = f.metadata(), sorted(f.keys())
  assert metadata["version"] == index_file.INDEX_VERSION
  assert json.loads(metadata["kernels"])["metric"] == "mahalanobis"
  assert names[0] == "bank" and all(n.startswith("kernels/bank/") for n in names[1:])
  loaded = spade_jax.load_index(path, expect=detector)
  assert loaded.fitted_metric == "mahalanobis"
  for a, b in zip(jax.tree.leaves(loaded.kernel), jax.tree.leaves(index.kernel)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(detector.score_features(loaded, test)[0],
                                detector.score_features(index, test)[0])
  # A kernel tensor edited in the file: its checksum refuses it.
  raw = bytearray(path.read_bytes())
  raw[-3] ^= 0x01
  path.write_bytes(bytes(raw))
  with pytest.raises(ValueError, match="does not match its checksum"):
    spade_jax.load_index(path)


def test_l2_index_files_are_unchanged_and_refused_for_a_kernel(feats, tmp_path):
  train, test = feats
  l2 = _detector("l2")
  path = tmp_path / "l2.patchcore"
  spade_jax.save_index(path, l2.fit_features(train))
  with safe_open(str(path), framework="numpy") as f:
    assert f.metadata()["version"] == "2" and "kernels" not in f.metadata()
    assert list(f.keys()) == ["bank"]
  loaded = spade_jax.load_index(path, expect=l2)  # Files without a kernel still load.
  with pytest.raises(ValueError, match="refit the index with metric='mahalanobis'"):
    spade_jax.load_index(path, expect=_detector("mahalanobis"))
  with pytest.raises(ValueError, match="holds no kernel"):
    _detector("mahalanobis").score_features(loaded, test)
  with pytest.raises(ValueError, match="selected for the kernel of metric 'polynomial'"):
    l2.score_features(_detector("polynomial").fit_features(train), test)


def test_calibration_refits_the_kernel_per_fold(feats):
  train, _ = feats
  detector = _detector("mahalanobis")
  threshold, held_out = calibration.patchcore_threshold(detector, train, quantile=0.5,
                                                        folds=3)
  expected = np.empty(NUM_TRAIN)
  for fold in np.array_split(np.arange(NUM_TRAIN), 3):
    rest = np.setdiff1d(np.arange(NUM_TRAIN), fold)
    size = int(0.2 * len(rest) * GRID * GRID)
    expected[fold] = reference("mahalanobis", train[rest], train[fold], size)[1]
  np.testing.assert_allclose(held_out, expected, rtol=2e-4, atol=1e-5)
  assert threshold.value == pytest.approx(float(np.quantile(expected, 0.5)), rel=2e-4)
  assert threshold.settings["metric"] == "mahalanobis"
  threshold.check(detector.config)
  with pytest.raises(ValueError, match="metric='l2' .calibrated with 'mahalanobis'"):
    threshold.check(_config("l2"))
  # A learned kernel's folds need 3 training images each.
  with pytest.raises(ValueError, match="learned kernel"):
    calibration.calibration_folds(_detector("learned"), 4, folds=2)


@pytest.mark.parametrize("kwargs,message", [
    ({"metric": "hamming"}, "PatchCoreConfig.metric must be a metric"),
    ({"metric": "mahalanobis", "coreset_ratio": 0.0}, "coreset_ratio"),
])
def test_config_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    spade_jax.PatchCoreConfig(**kwargs)


# ----------------------------------------------------------------------------------
# The scripts: fit.py --method=patchcore --metric=mahalanobis, then predict.py.

SIZE = 64
SETTINGS = ("--method=patchcore", f"--resize={SIZE}", f"--crop={SIZE}", "--coreset_ratio=0.5",
            "--metric=mahalanobis")


@pytest.mark.slow
def test_fit_and_predict_scripts_with_a_kernel(tmp_path):
  data = tmp_path / "data"
  write_category(data, "alpha", n_train=6, n_good=2, defects={"hole": 2}, seed=11)
  index = tmp_path / "alpha.patchcore"
  fit = run_script("fit.py", f"--train_dir={data / 'alpha' / 'train' / 'good'}",
                   f"--index={index}", *SETTINGS)
  assert fit.returncode == 0, fit.stderr[-3000:]
  contents = spade_jax.detector.load_index_file(index)
  assert contents.index.fitted_metric == "mahalanobis"
  assert contents.settings["metric"] == "mahalanobis"
  out = tmp_path / "out"
  predict = run_script("predict.py", f"--index={index}", f"--images={data / 'alpha' / 'test'}",
                       f"--output_dir={out}", "--noheatmaps")
  assert predict.returncode == 0, predict.stderr[-3000:]
  detector = spade_jax.PatchCore(
      spade_jax.load_backbone("efficientnet_lite0", weights="imagenet"),
      spade_jax.PatchCoreConfig(resize=SIZE, crop=SIZE, coreset_ratio=0.5,
                                metric="mahalanobis"))
  category = mvtec.load_category(data, "alpha")
  scores, _ = detector.score(detector.fit(category.train_images), category.test_images)
  expected = dict(zip([p.removeprefix("test/") for p in category.test_paths], scores))
  _, rows = read_scores(out / "scores.csv")
  assert sorted(row[0] for row in rows) == sorted(expected)
  for path, score in rows:  # No threshold: no anomalous column.
    assert float(score) == pytest.approx(float(expected[path]), rel=1e-4), path
  # Another metric than the index's kernel: a clean error naming the flag (before any
  # image is read or the backbone loaded).
  proc = run_script("predict.py", f"--index={index}", f"--images={data / 'alpha' / 'test'}",
                    f"--output_dir={tmp_path / 'other'}", "--metric=l2")
  assert_clean_error(proc, "predict.py", "--metric=l2 does not match the index",
                     "metric=mahalanobis")
  assert not (tmp_path / "other").exists()


def test_predict_settings_take_the_metric_of_the_index_kernel(feats, fitted):
  _, index = fitted["polynomial"]
  contents = types.SimpleNamespace(index=index, settings=None, threshold=None)
  flags = {"method": "patchcore", "metric": "l2", "layers": ("layer2",), "resize": CROP,
           "crop": CROP, "weights": None}
  assert detector_flags.settings_from_index(flags, set(), contents, "f")["metric"] == \
      "polynomial"
  with pytest.raises(ValueError, match="--metric=l2 does not match the index f"):
    detector_flags.settings_from_index(flags, {"metric"}, contents, "f")
  plain = types.SimpleNamespace(index=index.replace(kernel=None, fitted_metric=None),
                                settings=None, threshold=None)
  with pytest.raises(ValueError, match="--metric=rbf is a kernel, but the index f holds"):
    detector_flags.settings_from_index({**flags, "metric": "rbf"}, {"metric"}, plain, "f")


def test_patchcore_reads_metric_but_not_aggregate_or_bandwidth():
  assert "metric" in detector_flags.METHOD_FLAGS["patchcore"]
  with pytest.raises(ValueError, match="--bandwidth is not used by --method=patchcore"):
    detector_flags.check_method_flags("patchcore", {"bandwidth"})
  with pytest.raises(ValueError, match="--aggregate is not used by --method=patchcore"):
    detector_flags.check_method_flags("patchcore", {"aggregate", "metric"})
  config = detector_flags.patchcore_config(
      {"layers": ("layer2",), "patch_size": 3, "coreset_ratio": 0.1, "reweight": False,
       "metric": "learned", "sigma": 4.0, "resize": 64, "crop": 64,
       "image_size": None}, 2)
  assert config.is_kernel and config.metric == "learned"
