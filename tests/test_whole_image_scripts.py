"""fit.py and predict.py inspect the whole image by default (issue 19), run as a user
would: a defect in a corner of a non-square photo (outside any centre crop) is scored
above the normal images, its saved map (at the photo's own size) peaks on it, the
heatmaps show the photo at its size, images of another aspect are stretched with a
warning, and flags that contradict the index's geometry are clear errors.

efficientnet_lite0 with its packaged ImageNet weights (no network), --resize=64.
"""

import pathlib
import types

import numpy as np
import PIL.Image
import pytest
from test_fit_predict import assert_clean_error, read_scores, run_script

pytestmark = pytest.mark.slow  # Scripts end to end: the slow tier (pyproject.toml).

PHOTO = (96, 128)  # (H, W) of the photos: 3:4, as a phone's.
BOX = (0, 108, 20, 128)  # (top, left, bottom, right): the top-right corner.
SETTINGS = ("--k_images=2", "--k_image_score=2", "--resize=64")


def photo(seed: int, shape=PHOTO, defect: bool = False) -> np.ndarray:
  """Smooth diagonal stripes with a little noise; a red square in the corner if defect."""
  rng = np.random.default_rng(seed)
  h, w = shape
  y, x = np.mgrid[:h, :w]
  gray = 128 + 50 * np.sin((x + y) / 5.0)
  image = np.clip(gray[..., None] + rng.normal(0, 3, (h, w, 3)), 0, 255).astype(np.uint8)
  if defect:
    top, left, bottom, right = BOX
    image[top:bottom, left:right] = (230, 30, 30)
  return image


def save(path: pathlib.Path, image: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  PIL.Image.fromarray(image).save(path)


@pytest.fixture(name="ws", scope="module")
def fixture_workspace(tmp_path_factory):
  """fit.py on 5 photos and one square image, predict.py --save_maps on three images."""
  root = tmp_path_factory.mktemp("whole_image")
  for i in range(5):
    save(root / "train" / f"{i}.png", photo(i))
  save(root / "train" / "z_square.png", photo(9, (96, 96)))  # Another aspect ratio.
  save(root / "test" / "good" / "a.png", photo(20))
  save(root / "test" / "defect" / "b.png", photo(21, defect=True))
  save(root / "test" / "other" / "c.png", photo(22, (80, 80)))
  index = root / "part.spade"
  fit = run_script("fit.py", f"--train_dir={root / 'train'}", f"--index={index}", *SETTINGS)
  assert fit.returncode == 0, fit.stderr[-3000:]
  out = root / "out"
  predict = run_script("predict.py", f"--index={index}", f"--images={root / 'test'}",
                       f"--output_dir={out}", "--save_maps")
  assert predict.returncode == 0, predict.stderr[-3000:]
  return types.SimpleNamespace(root=root, index=index, out=out, fit=fit, predict=predict)


def test_fit_takes_the_first_image_size_and_warns_about_other_aspects(ws):
  # 96 x 128 with its shorter side at 64: 64 x 85, the whole image (no crop).
  assert "6 images at 64x85" in ws.fit.stdout
  assert "1 of 6 images have another aspect ratio than the input size 64x85" in ws.fit.stderr


def test_corner_defect_is_found_and_its_map_peaks_on_it(ws):
  _, rows = read_scores(ws.out / "scores.csv")
  scores = {path: float(score) for path, score in rows}
  assert scores["defect/b.png"] > max(scores["good/a.png"], scores["other/c.png"])
  anomaly_map = np.load(ws.out / "maps" / "defect" / "b.png.npy")
  assert anomaly_map.dtype == np.float32 and anomaly_map.shape == PHOTO
  y, x = np.unravel_index(np.argmax(anomaly_map), anomaly_map.shape)
  top, left, bottom, right = BOX
  assert top <= y < bottom + 8 and left - 8 <= x < right, (y, x)


def test_outputs_are_at_each_image_size(ws):
  assert np.load(ws.out / "maps" / "other" / "c.png.npy").shape == (80, 80)
  assert not np.isnan(np.load(ws.out / "maps" / "good" / "a.png.npy")).any()
  figure = np.asarray(PIL.Image.open(ws.out / "heatmaps" / "defect" / "b.png.png"))
  assert figure.shape == (PHOTO[0], 2 * PHOTO[1] + 4, 3)  # photo | gap | overlay.
  assert "1 of 3 images have another aspect ratio" in ws.predict.stderr
  assert sorted(p.name for p in ws.out.iterdir()) == [
      ".predict-complete", ".predict.lock", "heatmaps", "maps", "scores.csv", "summary.png"]


@pytest.mark.parametrize("flag, needle", [
    ("--crop=64", "--crop=64 does not match the index"),
    ("--image_size=64,64", "--image_size=64,64 does not match the index"),
])
def test_predict_refuses_other_geometry(ws, flag, needle):
  proc = run_script("predict.py", f"--index={ws.index}", f"--images={ws.root / 'test'}",
                    f"--output_dir={ws.root / 'refused'}", flag)
  assert_clean_error(proc, "predict.py", needle, "fitted with")


@pytest.mark.parametrize("flag, needle", [
    ("--crop=full", "--crop must be a positive int or 'none'"),
    ("--image_size=64", "--image_size must be H,W"),
    ("--image_size=0,64", "--image_size must be H,W"),
])
def test_bad_geometry_flags_are_flag_errors(ws, flag, needle):
  proc = run_script("fit.py", f"--train_dir={ws.root / 'train'}",
                    f"--index={ws.root / 'never.spade'}", flag)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert needle in proc.stderr, proc.stderr[-2000:]


def test_tiled_fit_and_predict(ws):
  """fit.py --tile_size --calibrate: the index records the tiles and a threshold
  calibrated on whole images (6 of them, leave-one-out); predict.py tiles the same way
  and applies it; maps stitched at each image's size, the corner defect on top."""
  index = ws.root / "tiled.spade"
  fit = run_script("fit.py", f"--train_dir={ws.root / 'train'}", f"--index={index}",
                   *SETTINGS, "--tile_size=64", "--tile_overlap=16", "--calibrate")
  assert fit.returncode == 0, fit.stderr[-3000:]
  assert "images at 64x64" in fit.stdout  # Tiles, at their native resolution.
  assert "leave-one-out held-out scores of 6 normal images" in fit.stdout
  out = ws.root / "tiled_out"
  predict = run_script("predict.py", f"--index={index}", f"--images={ws.root / 'test'}",
                       f"--output_dir={out}", "--save_maps", "--num_summary=2")
  assert predict.returncode == 0, predict.stderr[-3000:]
  header, rows = read_scores(out / "scores.csv")
  assert header == ["path", "score", "anomalous"] and "anomalous:" in predict.stdout
  scores = {path: float(score) for path, score, _ in rows}
  assert scores["defect/b.png"] > max(scores["good/a.png"], scores["other/c.png"])
  anomaly_map = np.load(out / "maps" / "defect" / "b.png.npy")
  assert anomaly_map.shape == PHOTO
  y, x = np.unravel_index(np.argmax(anomaly_map), anomaly_map.shape)
  top, left, bottom, right = BOX
  assert top <= y < bottom + 8 and left - 8 <= x < right, (y, x)
  proc = run_script("predict.py", f"--index={index}", f"--images={ws.root / 'test'}",
                    f"--output_dir={ws.root / 'refused'}", "--tile_size=32")
  assert_clean_error(proc, "predict.py", "--tile_size=32 does not match the index",
                     "on tiles of 64")
  proc = run_script("predict.py", f"--index={index}", f"--images={ws.root / 'test'}",
                    f"--output_dir={ws.root / 'refused'}", "--tile_overlap=8")
  assert_clean_error(proc, "predict.py", "threshold calibrated on tiles with "
                     "--tile_overlap=16")


@pytest.mark.parametrize("flags, needle", [
    (("--tile_size=200",), "tile_size=200 is larger than the image (96x128)"),
    (("--tile_size=64", "--tile_overlap=64"), "tile_overlap=64 must be smaller than"),
    (("--tile_size=64", "--crop=56"), "it excludes --crop and --image_size"),
    (("--tile_size=64", "--tile_position_weight=-1"), "--tile_position_weight must be a "
                                                      "finite number >= 0"),
    (("--tile_position_weight=1",), "--tile_position_weight needs --tile_size"),
])
def test_bad_tile_flags_are_clear_errors(ws, flags, needle):
  proc = run_script("fit.py", f"--train_dir={ws.root / 'train'}",
                    f"--index={ws.root / 'never.spade'}", *SETTINGS, *flags)
  assert_clean_error(proc, "fit.py", needle)
