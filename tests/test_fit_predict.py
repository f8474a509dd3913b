"""experiments/fit.py then predict.py, run as a user would (subprocesses for the shared
fit and predict, the script server of tests/script_server.py for the rest): the same image
scores as evaluate.py and as Spade.fit / score in process, the threshold column
against a brute-force leave-one-out, the output files, unreadable images skipped, and
clear errors for indexes that do not fit.

The detector is efficientnet_lite0 with its packaged ImageNet weights (no network) at
64 x 64, on tiny random categories in MVTec layout (mvtec_fixtures).
"""

import csv
import json
import os
import pathlib
import shutil
import subprocess
import sys
import types

from hostile_fixtures import write_bomb_png
from mvtec_fixtures import write_category
import numpy as np
import PIL.Image
import pytest
import script_server
from sklearn.metrics import roc_auc_score

import spade_jax
from spade_jax.data import mvtec

pytestmark = pytest.mark.slow  # Scripts end to end: the slow tier (pyproject.toml).

REPO = pathlib.Path(__file__).resolve().parents[1]
K_IMAGES, K_IMAGE_SCORE, SIZE = 3, 2, 64
SETTINGS = (f"--k_images={K_IMAGES}", f"--k_image_score={K_IMAGE_SCORE}", f"--resize={SIZE}",
            f"--crop={SIZE}")
QUANTILE = 0.5  # A threshold in the middle of the scores: both decisions occur.


def run_script(script: str, *args: str, env: dict | None = None,
               fresh_process: bool = False) -> subprocess.CompletedProcess:
  """The script's run, in a fresh process or (the default) in its script server."""
  full_env = dict(os.environ, JAX_PLATFORMS="cpu")
  full_env.pop("XLA_FLAGS", None)  # One CPU device, as a user runs it.
  full_env.update(env or {})
  if not fresh_process:
    return script_server.run_script(script, *args, env=full_env, timeout=300)
  return subprocess.run([sys.executable, str(REPO / "experiments" / script), *args],
                        capture_output=True, text=True, env=full_env, timeout=300, check=False)


def assert_clean_error(proc: subprocess.CompletedProcess, script: str, *needles: str) -> None:
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert f"{script}: error:" in proc.stderr, proc.stderr[-3000:]
  for needle in needles:
    assert needle in proc.stderr, proc.stderr[-3000:]


def fit_then_predict(root: pathlib.Path, index_name: str, fit_flags: tuple[str, ...],
                     predict_flags: tuple[str, ...], seed: int = 5) -> types.SimpleNamespace:
  """The script tests' workspace: a category "alpha" under root/data (6 training images;
  3 good, 2 crack and 2 hole test images), fit.py on its train/good writing
  root/index_name, then predict.py on its test folder into root/out, both in their
  script servers and asserted to succeed.

  Returns:
    SimpleNamespace(root, data, index, out, fit, predict): paths and the two runs.
  """
  data = root / "data"
  write_category(data, "alpha", n_train=6, n_good=3, defects={"crack": 2, "hole": 2},
                 seed=seed)
  index, out = root / index_name, root / "out"
  fit = run_script("fit.py", f"--train_dir={data / 'alpha' / 'train' / 'good'}",
                   f"--index={index}", *fit_flags)
  assert fit.returncode == 0, fit.stderr[-3000:]
  predict = run_script("predict.py", f"--index={index}", f"--images={data / 'alpha' / 'test'}",
                       f"--output_dir={out}", *predict_flags)
  assert predict.returncode == 0, predict.stderr[-3000:]
  return types.SimpleNamespace(root=root, data=data, index=index, out=out, fit=fit,
                               predict=predict)


def read_scores(path: pathlib.Path) -> tuple[list[str], list[list[str]]]:
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.reader(f))
  return rows[0], rows[1:]


@pytest.fixture(name="ws", scope="module")
def fixture_workspace(tmp_path_factory):
  """fit.py --calibrate on alpha/train/good, predict.py on alpha/test."""
  root = tmp_path_factory.mktemp("fit_predict")
  data = root / "data"
  write_category(data, "alpha", n_train=6, n_good=3, defects={"crack": 2, "hole": 2}, seed=3)
  index = root / "alpha.spade"
  fit = run_script("fit.py", f"--train_dir={data / 'alpha' / 'train' / 'good'}",
                   f"--index={index}", *SETTINGS, "--calibrate",
                   f"--calibration_quantile={QUANTILE}", fresh_process=True)
  assert fit.returncode == 0, fit.stderr[-3000:]
  out = root / "out"
  predict = run_script("predict.py", f"--index={index}", f"--images={data / 'alpha' / 'test'}",
                       f"--output_dir={out}", fresh_process=True)
  assert predict.returncode == 0, predict.stderr[-3000:]
  return types.SimpleNamespace(root=root, data=data, index=index, out=out, fit=fit,
                               predict=predict)


@pytest.fixture(name="reference", scope="module")
def fixture_reference(ws):
  """What evaluate.py's loop computes for alpha, in process: Spade.fit then score."""
  spade = spade_jax.Spade(spade_jax.load_backbone("efficientnet_lite0", weights="imagenet"),
                          spade_jax.SpadeConfig(k_images=K_IMAGES, k_image_score=K_IMAGE_SCORE,
                                                resize=SIZE, crop=SIZE))
  data = mvtec.load_category(ws.data, "alpha")
  index = spade.fit(data.train_images)
  scores, _ = spade.score(index, data.test_images)
  paths = [p.removeprefix("test/") for p in data.test_paths]
  return types.SimpleNamespace(scores=dict(zip(paths, scores)), labels=dict(
      zip(paths, data.test_labels)), pool=np.asarray(index.train_pool, np.float64))


def test_predict_gives_evaluate_scores(ws, reference):
  header, rows = read_scores(ws.out / "scores.csv")
  scores = {path: float(score) for path, score, _ in rows}
  assert sorted(scores) == sorted(reference.scores)
  for path, expected in reference.scores.items():
    assert scores[path] == pytest.approx(float(expected), rel=1e-5), path
  # evaluate.py on the category, same settings: its image AUROC is that of these scores.
  out = ws.root / "evaluate"
  proc = run_script("evaluate.py", f"--data_dir={ws.data}", *SETTINGS, "--num_heatmaps=0",
                    f"--output_dir={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((out / "results.json").read_text())
  paths = sorted(scores)
  auroc = roc_auc_score([reference.labels[p] for p in paths], [scores[p] for p in paths])
  assert results["categories"]["alpha"]["image_auroc"] == pytest.approx(auroc, abs=1e-12)
  assert header == ["path", "score", "anomalous"]


def test_threshold_column_is_the_leave_one_out_quantile(ws, reference):
  pool = reference.pool  # Brute force: each training image against the others.
  dist = np.sqrt(((pool[:, None] - pool[None]) ** 2).sum(-1))
  np.fill_diagonal(dist, np.inf)
  held_out = np.sort(dist, axis=1)[:, :K_IMAGE_SCORE].mean(axis=1)
  threshold = np.quantile(held_out, QUANTILE)
  stored = spade_jax.detector.load_index_file(ws.index).threshold
  assert stored.value == pytest.approx(threshold, rel=1e-5)
  assert (stored.quantile, stored.folds, stored.num_images) == (QUANTILE, 6, 6)
  assert stored.settings == {"k_image_score": K_IMAGE_SCORE, "metric": "l2",
                             "aggregate": "mean", "bandwidth": None}
  assert "leave-one-out" in ws.fit.stdout
  _, rows = read_scores(ws.out / "scores.csv")
  decisions = {path: int(flag) for path, _, flag in rows}
  for path, score, _ in rows:
    if abs(float(score) - threshold) > 1e-5 * threshold:  # Not on the edge.
      assert decisions[path] == int(float(score) > threshold), path
  assert set(decisions.values()) == {0, 1}
  assert f"anomalous: {sum(decisions.values())} of {len(rows)}" in ws.predict.stdout


def test_output_files(ws):
  header, rows = read_scores(ws.out / "scores.csv")
  paths = [r[0] for r in rows]
  assert paths == sorted(paths) == ["crack/000.png", "crack/001.png", "good/000.png",
                                    "good/001.png", "good/002.png", "hole/000.png",
                                    "hole/001.png"]
  heatmaps = sorted(p.relative_to(ws.out / "heatmaps").as_posix()
                    for p in (ws.out / "heatmaps").rglob("*.png"))
  assert heatmaps == [f"{p}.png" for p in paths]
  figure = np.asarray(PIL.Image.open(ws.out / "heatmaps" / "crack" / "000.png.png"))
  # image | gap | overlay, at the image's own size (write_category: 40 x 32).
  assert figure.shape == (32, 2 * 40 + 4, 3)
  assert (ws.out / "summary.png").is_file()
  assert not (ws.out / "skipped.csv").exists()
  assert sorted(p.name for p in ws.out.iterdir()) == [  # No temporaries.
      ".predict-complete", ".predict.lock", "heatmaps", "scores.csv", "summary.png"]


def test_unreadable_files_are_reported_and_skipped(ws):
  images = ws.root / "mixed"
  shutil.copytree(ws.data / "alpha" / "test", images)
  (images / "good" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
  write_bomb_png(images / "bomb.png")
  (images / "notes.txt").write_text("not an image, not listed")
  (images / ".thumb.png").write_text("hidden, not listed")
  deep = images / "line2" / "deep"
  deep.mkdir(parents=True)
  PIL.Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(deep / "x.JPG", format="jpeg")
  out = images / "results"  # Inside the image folder: its files are not scored.
  shutil.copytree(ws.out, out)  # As if from an earlier run.
  proc = run_script("predict.py", f"--index={ws.index}", f"--images={images}",
                    f"--output_dir={out}", "--num_summary=3")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "skipped good/broken.png" in proc.stderr and "skipped bomb.png" in proc.stderr
  assert "skipped 2 files that are not readable images" in proc.stdout
  _, rows = read_scores(out / "scores.csv")
  assert [r[0] for r in rows] == ["crack/000.png", "crack/001.png", "good/000.png",
                                  "good/001.png", "good/002.png", "hole/000.png",
                                  "hole/001.png", "line2/deep/x.JPG"]
  header, skipped = read_scores(out / "skipped.csv")
  assert header == ["path", "reason"]
  assert [r[0] for r in skipped] == ["bomb.png", "good/broken.png"]
  assert "too large" in skipped[0][1]
  assert (out / "heatmaps" / "line2" / "deep" / "x.JPG.png").is_file()
  summary = np.asarray(PIL.Image.open(out / "summary.png"))
  # The 40 x 32 images at their own size, enlarged 5x in the summary (to >= 160 px).
  assert summary.shape == (3 * (2 * 16 + 5 * 32) + 2 * 6, 2 * 5 * 40 + 4, 3)


@pytest.mark.parametrize("flag, needles", [
    ("--backbone=resnet18", ["--backbone=resnet18", "backbone=efficientnet_lite0"]),
    ("--resize=128", ["--resize=128", "resize=64"]),
    ("--layers=layer1", ["--layers=layer1", "layers=layer1,layer2,layer3"]),
    ("--k_image_score=1", ["k_image_score=2", "threshold", "calibrated"]),
])
def test_flags_that_contradict_the_index_are_refused(ws, tmp_path, flag, needles):
  proc = run_script("predict.py", f"--index={ws.index}",
                    f"--images={ws.data / 'alpha' / 'test'}", f"--output_dir={tmp_path}", flag)
  assert_clean_error(proc, "predict.py", str(ws.index), *needles)
  assert not (tmp_path / "scores.csv").exists()


def test_other_weights_than_the_index_are_refused(ws, tmp_path):
  proc = run_script("predict.py", f"--index={ws.index}", f"--images={ws.data / 'alpha' / 'test'}",
                    f"--output_dir={tmp_path / 'out'}", "--weights=none")
  assert_clean_error(proc, "predict.py", "other efficientnet_lite0 weights", "--weights")
  assert not (tmp_path / "out" / "scores.csv").exists()


def _corrupt(path: pathlib.Path) -> None:
  data = bytearray(path.read_bytes())
  data[-5] ^= 0xFF  # A flipped bit in the last tensor's bytes.
  path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind, needle", [
    ("missing", "no index file"), ("garbage", "not a readable safetensors file"),
    ("corrupt", "does not match its checksum"), ("folder", "no index file"),
])
def test_unreadable_index_is_a_clear_error(ws, tmp_path, kind, needle):
  index = tmp_path / "index.spade"
  if kind == "garbage":
    index.write_text("not an index")
  elif kind == "corrupt":
    shutil.copy(ws.index, index)
    _corrupt(index)
  elif kind == "folder":
    index.mkdir()
  proc = run_script("predict.py", f"--index={index}", f"--images={ws.data / 'alpha' / 'test'}",
                    f"--output_dir={tmp_path / 'out'}")
  assert_clean_error(proc, "predict.py", str(index), needle)


def test_index_of_an_unknown_backbone_is_a_clear_error(ws, tmp_path):
  from spade_fake_backbone import FakeBackbone  # pylint: disable=import-outside-toplevel
  spade = spade_jax.Spade(FakeBackbone(), spade_jax.SpadeConfig(
      k_images=1, k_image_score=1, layers=("layer1",), resize=32, crop=32))
  index = tmp_path / "fake.spade"
  spade_jax.save_index(index, spade.fit(np.zeros((2, 32, 32, 3), np.uint8)))
  proc = run_script("predict.py", f"--index={index}", f"--images={ws.data / 'alpha' / 'test'}",
                    f"--output_dir={tmp_path / 'out'}", "--k_images=1", "--k_image_score=1")
  assert_clean_error(proc, "predict.py", "fake_pyramid")


def test_fit_skips_unreadable_training_images(tmp_path):
  write_category(tmp_path / "data", "beta", n_train=3, seed=4)
  train = tmp_path / "data" / "beta" / "train" / "good"
  (train / "zz_broken.jpg").write_text("not a jpeg")
  index = tmp_path / "beta.spade"
  proc = run_script("fit.py", f"--train_dir={train}", f"--index={index}", "--weights=none",
                    "--k_images=2", "--k_image_score=1", "--resize=32", "--crop=32",
                    "--layers=layer1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "skipped zz_broken.jpg" in proc.stderr
  assert "index: " in proc.stdout and "(3 images" in proc.stdout
  loaded, threshold, _ = spade_jax.detector.load_index_file(index)
  assert loaded.num_images == 3 and threshold is None


@pytest.mark.parametrize("case, needles", [
    ("no_images", ["no image file under"]),
    ("index_folder_missing", ["does not exist", "--index"]),
    ("too_few_images", ["k_images=50", "--k_images"]),
    ("calibration_folds", ["calibration folds"]),
    ("calibration_too_few", ["calibration", "leave-one-out"]),
])
def test_fit_errors_are_clear(tmp_path, case, needles):
  train = tmp_path / "train"
  train.mkdir()
  if case != "no_images":
    for i in range(3):
      PIL.Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(train / f"{i}.png")
  index = tmp_path / ("missing/x.spade" if case == "index_folder_missing" else "x.spade")
  flags = {"too_few_images": [], "calibration_folds": ["--calibrate", "--calibration_folds=1"],
           "calibration_too_few": ["--calibrate", "--k_image_score=3", "--k_images=3"]
           }.get(case, ["--k_images=2", "--k_image_score=1"])
  proc = run_script("fit.py", f"--train_dir={train}", f"--index={index}", "--weights=none",
                    "--resize=32", "--crop=32", *flags)
  assert_clean_error(proc, "fit.py", *needles)
  assert not index.exists()
