"""spade_jax.export_detector and the standalone run.py: predict.py's scores without
spade_jax, and the refusals.

The detectors run on a tiny spade_jax Backbone (a Flax module of average pools and 1x1
projections, the layout of spade_fake_backbone.py: an export carries a Backbone's
variables) on a tiny random category of 32 x 40 images (mvtec_fixtures): 6 training and
7 test images, an export batch of 4 (so the last batch is padded); the input is a 64 x 64
centre crop, or the whole image at 64 x 80 (fit.py's default geometry). The end-to-end
test (export.py on a whole-image index file, run.py without spade_jax) uses
efficientnet_lite0 with its packaged ImageNet weights (no network), as fit.py would.
run.py's maps are compared with predict.py's --save_maps, at each image's own size.
Tiled exports (an index fitted on 64 x 64 tiles, overlap 16 or 0, mean or max merge) are
compared with predict_folder(tiles=) on test images of five sizes, and end to end
through fit.py, export.py, predict.py and run.py (efficientnet_lite0). Ensembles
(spade_jax.Ensemble of two members on the tiny backbone; end to end: fit.py
--method=ensemble with efficientnet_lite0) are compared with Ensemble.score and
predict.py, their tolerance propagated through the standardisation (ensemble_tolerances).

Tolerance of run.py against predict.py: relative 2e-5 on the image scores (about 170
float32 ulps) and 2e-5 of the largest map value on the maps. Both compute the same
float32 operations on the same inputs (the same PIL resize, then the library's own
functions), but not in the same XLA programs: predict.py runs the backbone, the search
and the maps as separate jitted calls at the detector's batch size and, on CPU, the
proxies of the search in the C++ kernel; the export is one fused program at its own
batch size with the search in XLA. Fusion and blocking change the order of float32
sums in the backbone (hundreds of terms per output), which moves features by a few
ulps; the reported distances are recomputed exactly on both paths, so the selected
neighbours are the same and the scores differ by that rounding alone (observed: at most
3e-6 relative). A threshold's decision is compared exactly, with the threshold put
between two scores (no score within the tolerance of it).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import types

import flax.linen as nn
import jax
from mvtec_fixtures import write_category
import numpy as np
import pytest
import script_server
from test_export import ACCELERATOR_TARGETS, custom_call_targets, low_precision_dots

import spade_jax
from spade_jax.data import mvtec
from spade_jax.deploy import artifact, export, programs
from spade_jax.detector import calibration, tiling
from spade_jax.evaluation import folders
from spade_jax.features import geometry
from spade_jax.search import cpu_kernel

REPO = pathlib.Path(__file__).resolve().parents[1]
SIZE, BATCH = 64, 4
IMAGE_HW = (32, 40)  # The fixture images' (height, width) (mvtec_fixtures' default).
RTOL = 2e-5
# The packages run.py may import (jax needs jaxlib, ml_dtypes, opt_einsum and scipy;
# jax.export's deserialisation needs flatbuffers), and the vendored shared libraries
# of their wheels.
RUNTIME_PACKAGES = ("jax", "jaxlib", "ml_dtypes", "opt_einsum", "scipy", "numpy", "PIL",
                    "safetensors", "flatbuffers")

TINY_CHANNELS = {"layer1": 6, "layer2": 8, "layer3": 10, "layer4": 12}


class TinyPyramid(nn.Module):
  """images [N, H, W, 3] -> {'layer1'..'layer4': [N, H/s, W/s, C] (s = 4, 8, 16, 32),
  'pool': [N, 12]}: average pools, 1x1 projections and ReLU."""

  @nn.compact
  def __call__(self, x):
    out = {}
    for i, (level, channels) in enumerate(TINY_CHANNELS.items()):
      s = 4 if i == 0 else 2
      x = nn.avg_pool(x, (s, s), (s, s))
      # Full-precision products, as the library asks for its own (matmul.py): the cuda
      # export test then checks every product of the program.
      dense = nn.Dense(channels, name=level, precision=jax.lax.Precision.HIGHEST)
      x = nn.relu(dense(x)) + 0.1 * x.mean(-1, keepdims=True)
      out[level] = x
    out["pool"] = x.mean(axis=(1, 2))
    return out


def tiny_backbone(seed: int = 0, name: str = "tiny_pyramid") -> spade_jax.Backbone:
  """TinyPyramid with variables initialised from `seed`."""
  from spade_jax.features.backbones.backbone import FeatureInfo  # pylint: disable=import-outside-toplevel
  module = TinyPyramid()
  variables = module.init(jax.random.PRNGKey(seed), np.zeros((1, SIZE, SIZE, 3), np.float32))
  features = {level: FeatureInfo(c, 4 * 2 ** i)
              for i, (level, c) in enumerate(TINY_CHANNELS.items())}
  return spade_jax.Backbone(name, module, variables,
                            {**features, "pool": FeatureInfo(12, None)})


DETECTORS = {
    "spade": lambda bb: spade_jax.Spade(bb, spade_jax.SpadeConfig(
        k_images=3, k_image_score=2, resize=SIZE, crop=SIZE)),
    "spade-mahalanobis": lambda bb: spade_jax.Spade(bb, spade_jax.SpadeConfig(
        k_images=3, k_image_score=2, resize=SIZE, crop=SIZE, metric="mahalanobis")),
    "patchcore": lambda bb: spade_jax.PatchCore(bb, spade_jax.PatchCoreConfig(
        resize=SIZE, crop=SIZE, coreset_ratio=0.5)),
    "padim": lambda bb: spade_jax.Padim(bb, spade_jax.PadimConfig(resize=SIZE, crop=SIZE)),
    # The whole image, non-square: fit_folder's default (crop=None, image_size from the
    # first training image, its aspect kept: 32 x 40 -> 64 x 80).
    "spade-whole": lambda bb: spade_jax.Spade(bb, spade_jax.SpadeConfig(
        k_images=3, k_image_score=2, resize=SIZE, crop=None,
        image_size=geometry.aspect_size(SIZE, *IMAGE_HW))),
    "patchcore-mahalanobis": lambda bb: spade_jax.PatchCore(bb, spade_jax.PatchCoreConfig(
        resize=SIZE, crop=SIZE, coreset_ratio=0.5, metric="mahalanobis")),
}
# (detector, with a threshold): every detector, SPADE and PatchCore both ways (SPADE with
# a threshold: test_run_py_runs_without_spade_jax, through export.py and predict.py's
# own settings).
CASES = (("spade", False), ("spade-mahalanobis", True), ("patchcore", True),
         ("patchcore", False), ("padim", True), ("spade-whole", False),
         ("patchcore-mahalanobis", True))


def load_runner(folder: pathlib.Path) -> types.ModuleType:
  """The exported folder's run.py as a module (in this process)."""
  spec = importlib.util.spec_from_file_location(f"run_{folder.name}", folder / "run.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def read_scores(path: pathlib.Path) -> tuple[list[str], list[list[str]]]:
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.reader(f))
  return rows[0], rows[1:]


@pytest.fixture(name="data", scope="module")
def fixture_data(tmp_path_factory):
  root = tmp_path_factory.mktemp("deploy")
  write_category(root / "data", "alpha", n_train=6, n_good=3, defects={"crack": 2, "hole": 2},
                 seed=3)
  category = mvtec.load_category(root / "data", "alpha")
  return types.SimpleNamespace(root=root, train=category.train_images,
                               test_dir=root / "data" / "alpha" / "test")


@pytest.fixture(name="fitted", scope="module")
def fixture_fitted(data):
  """name -> (detector, index), fitted once per detector on first use ("lite0-spade-whole":
  "spade-whole" on efficientnet_lite0, the others on tiny_backbone())."""
  cache = {}
  tiny = tiny_backbone()

  def get(name):
    if name not in cache:
      if name.startswith("lite0-"):
        backbone = spade_jax.load_backbone("efficientnet_lite0", weights="imagenet")
        detector = DETECTORS[name.removeprefix("lite0-")](backbone)
      else:
        detector = DETECTORS[name](tiny)
      cache[name] = detector, detector.fit(data.train)
    return cache[name]

  return get


@pytest.fixture(name="scored", scope="module")
def fixture_scored(fitted, data):
  """name -> (test paths as predict.py writes them, scores [7], maps [7, 64, 64]) of
  detector.score, once per detector."""
  category = mvtec.load_category(data.root / "data", "alpha")
  cache = {}

  def get(name):
    if name not in cache:
      detector, index = fitted(name)
      scores, maps = detector.score(index, category.test_images)
      cache[name] = [p.removeprefix("test/") for p in category.test_paths], scores, maps
    return cache[name]

  return get


@pytest.fixture(name="exports", scope="module")
def fixture_exports(fitted, scored, tmp_path_factory):
  """(name, with a threshold) -> (exported folder, threshold), once per case."""
  cache = {}

  def get(name, with_threshold):
    if (name, with_threshold) not in cache:
      detector, index = fitted(name)
      threshold = (between_scores(scored(name)[1], detector.config) if with_threshold
                   else None)
      folder = spade_jax.export_detector(
          detector, index, tmp_path_factory.mktemp(name) / "export", batch_size=BATCH,
          image_size=detector.config.input_size, threshold=threshold)  # = the default.
      cache[name, with_threshold] = folder, threshold
    return cache[name, with_threshold]

  return get


def between_scores(scores: np.ndarray, config) -> calibration.Threshold:
  """A threshold halfway between the 4th and 5th largest scores (both decisions)."""
  ordered = np.sort(np.asarray(scores, np.float64))
  return calibration.Threshold(value=float((ordered[-4] + ordered[-5]) / 2), quantile=0.5,
                               folds=2, num_images=6, settings=config.score_settings())


def predict(detector, index, data, threshold, out: pathlib.Path, save_maps: bool = False):
  """predict.py's scoring (folders.predict_folder) -> (header, rows of scores.csv); with
  save_maps, its maps (out/maps/<path>.npy, at the images' own size) too."""
  folders.predict_folder(detector, index, data.test_dir, out, threshold=threshold,
                         write_heatmaps=False, num_summary=0, save_maps=save_maps)
  return read_scores(out / "scores.csv")


def assert_same_scores(expected, actual, atol: float = 0.0):
  (header, rows), (run_header, run_rows) = expected, actual
  assert run_header == header
  assert [r[0] for r in run_rows] == [r[0] for r in rows]
  for row, run_row in zip(rows, run_rows):
    assert float(run_row[1]) == pytest.approx(float(row[1]), rel=RTOL, abs=atol), row[0]
    assert run_row[2:] == row[2:], row[0]  # The decision, exactly.


@pytest.mark.parametrize("name,with_threshold", CASES,
                         ids=[f"{n}-{'threshold' if t else 'none'}" for n, t in CASES])
def test_run_py_gives_predict_py_scores_and_maps(name, with_threshold, fitted, scored, exports,
                                                 data, tmp_path):
  detector, index = fitted(name)
  paths, scores, maps = scored(name)
  threshold = between_scores(scores, detector.config) if with_threshold else None
  # predict.py first: an export clears jax's caches (cpu_kernel.xla_only), after which
  # the library's programs are compiled again.
  expected = predict(detector, index, data, threshold, tmp_path / "predict", save_maps=True)
  folder, exported_threshold = exports(name, with_threshold)
  assert exported_threshold == threshold
  if with_threshold:
    assert {r[2] for r in expected[1]} == {"0", "1"}
  runner = load_runner(folder)
  run_paths, _, skipped = runner.score_folder(
      runner.Artifact(folder), data.test_dir, tmp_path / "run", write_maps=True)
  assert not skipped and sorted(run_paths) == sorted(paths)
  assert_same_scores(expected, read_scores(tmp_path / "run" / "scores.csv"))
  # The maps: predict.py's --save_maps, at each image's own size (NaN outside a crop).
  cfg = detector.config
  for path in paths:
    run_map = np.load(tmp_path / "run" / "maps" / f"{path}.npy")
    predict_map = np.load(tmp_path / "predict" / "maps" / f"{path}.npy")
    assert run_map.shape == predict_map.shape == IMAGE_HW and run_map.dtype == np.float32
    assert np.isnan(run_map).any() == (cfg.crop is not None), path  # 32x40: cropped sides.
    np.testing.assert_allclose(run_map, predict_map, rtol=0,
                               atol=RTOL * float(np.abs(maps).max()), err_msg=path)
  manifest = json.loads((folder / "manifest.json").read_text())
  assert manifest["method"] == name.split("-")[0]
  assert manifest["platforms"] == ["cpu"] and manifest["custom_calls"] == []
  assert list(cfg.input_size) == ([SIZE, SIZE] if cfg.crop else [SIZE, SIZE * 5 // 4])
  assert manifest["input"]["shape"] == [BATCH, *cfg.input_size, 3]
  assert manifest["input"]["crop"] == cfg.crop
  assert manifest["input"]["image_size"] == (None if cfg.crop else list(cfg.input_size))
  if manifest["method"] == "patchcore":  # A fitted kernel's arrays are arguments.
    kernel = [n for n in manifest["array_shapes"] if n.startswith("program/kernel")]
    assert bool(kernel) == cfg.is_kernel, kernel
  assert manifest["jax_version"] and manifest["spade_jax_version"] == spade_jax.__version__
  assert (manifest["threshold"] is not None) == with_threshold
  for file, digest in manifest["files"].items():
    assert artifact.sha256_file(folder / file) == digest


def isolated_site(tmp_path: pathlib.Path) -> pathlib.Path:
  """A folder of links to RUNTIME_PACKAGES alone (not spade_jax, flax, optax, tfds)."""
  import numpy  # pylint: disable=import-outside-toplevel
  site_packages = pathlib.Path(numpy.__file__).resolve().parents[1]
  site = tmp_path / "site"
  site.mkdir()
  for name in RUNTIME_PACKAGES:
    (site / name).symlink_to(site_packages / name)
  for libs in site_packages.glob("*.libs"):  # Wheels' vendored shared libraries.
    (site / libs.name).symlink_to(libs)
  return site


def run_isolated(site: pathlib.Path, *args: str, cwd: pathlib.Path
                 ) -> subprocess.CompletedProcess:
  """python -S (no site-packages, no .pth files: no editable spade_jax) with only
  `site` on its path."""
  env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(site), "JAX_PLATFORMS": "cpu",
         "HOME": str(cwd)}
  return subprocess.run([sys.executable, "-S", *args], capture_output=True, text=True,
                        env=env, cwd=cwd, timeout=300, check=False)


@pytest.mark.slow
def test_run_py_runs_without_spade_jax(fitted, scored, data, tmp_path):
  """export.py (the command) on a saved index with a threshold, fitted as fit.py's
  defaults fit (the whole image, crop=None, a non-square image_size from the first
  training image), then run.py where spade_jax cannot be imported: predict.py's scores
  and maps; a tampered file is refused."""
  detector, index = fitted("lite0-spade-whole")
  threshold = between_scores(scored("lite0-spade-whole")[1], detector.config)
  index_path = tmp_path / "alpha.spade"
  spade_jax.save_index(index_path, index, threshold=threshold, settings={
      "method": "spade", "backbone": "efficientnet_lite0", "k_images": 3,
      "k_image_score": 2, "resize": SIZE, "crop": None,
      "image_size": list(detector.config.image_size)})
  proc = run_script("export.py", f"--index={index_path}", f"--output_dir={tmp_path / 'export'}",
                    f"--batch_size={BATCH}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  expected = predict(detector, index, data, threshold, tmp_path / "predict", save_maps=True)

  site = isolated_site(tmp_path)
  probe = run_isolated(site, "-c", "import spade_jax", cwd=tmp_path)
  assert probe.returncode != 0 and "No module named 'spade_jax'" in probe.stderr
  probe = run_isolated(site, "-c", "import flax", cwd=tmp_path)
  assert "No module named 'flax'" in probe.stderr

  run_py = tmp_path / "export" / "run.py"
  proc = run_isolated(site, str(run_py), f"--images={data.test_dir}",
                      f"--output_dir={tmp_path / 'run'}", "--maps", cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert_same_scores(expected, read_scores(tmp_path / "run" / "scores.csv"))
  maps = scored("lite0-spade-whole")[2]
  for path in scored("lite0-spade-whole")[0]:
    run_map = np.load(tmp_path / "run" / "maps" / f"{path}.npy")
    assert run_map.shape == IMAGE_HW, path
    np.testing.assert_allclose(run_map, np.load(tmp_path / "predict" / "maps" / f"{path}.npy"),
                               rtol=0, atol=RTOL * float(np.abs(maps).max()), err_msg=path)

  # One changed byte in the arrays: refused before any image is read.
  arrays = tmp_path / "export" / "arrays.safetensors"
  data_bytes = bytearray(arrays.read_bytes())
  data_bytes[-1] ^= 1
  arrays.write_bytes(bytes(data_bytes))
  proc = run_isolated(site, str(run_py), f"--images={data.test_dir}",
                      f"--output_dir={tmp_path / 'run2'}", cwd=tmp_path)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert "arrays.safetensors fails its checksum" in proc.stderr
  assert not (tmp_path / "run2").exists()


@pytest.fixture(name="cpu_export")
def fixture_cpu_export(exports):
  return exports("spade-mahalanobis", True)[0]


@pytest.mark.parametrize("name", ["manifest.json", "program.jaxexport", "run.py"])
def test_tampered_file_is_refused(cpu_export, tmp_path, name):
  folder = tmp_path / "export"
  shutil.copytree(cpu_export, folder)
  path = folder / name
  text = path.read_bytes()
  path.write_bytes(text.replace(b"cpu", b"tpu", 1) if name == "manifest.json"
                   else text[:-1] + bytes([text[-1] ^ 1]))
  runner = load_runner(cpu_export)
  with pytest.raises(runner.ArtifactError, match=f"{name} fails its checksum"):
    runner.read_manifest(folder)


def test_missing_file_is_refused(cpu_export, tmp_path):
  folder = tmp_path / "export"
  shutil.copytree(cpu_export, folder)
  (folder / "arrays.safetensors").unlink()
  runner = load_runner(cpu_export)
  with pytest.raises(runner.ArtifactError, match="'arrays.safetensors' is missing"):
    runner.read_manifest(folder)


def test_cpu_export_has_no_custom_call(cpu_export):
  # The pure-XLA path: with the CPU kernel built, the library's CPU lowering of the same
  # search calls it (test_export.py's control); the export's does not.
  exported = load_runner(cpu_export).load_program(
      (cpu_export / "program.jaxexport").read_bytes(), {})
  text = exported.mlir_module()
  assert cpu_kernel.TARGET not in text
  assert not custom_call_targets(text)


def test_other_jax_version_is_named(cpu_export):
  runner = load_runner(cpu_export)
  with pytest.raises(runner.ArtifactError, match=r"written by jax 99\.1\.0.*install "
                     r"jax==99\.1\.0"):
    runner.load_program(b"\x00" * 64, {"jax_version": "99.1.0"})


@pytest.mark.parametrize("case", ["patchcore", "tiled-spade-mean", "ensemble-mean"])
def test_accelerator_export_is_checked_and_refused_on_cpu(case, fitted, tiled_fitted,
                                                          stats_ensemble, tmp_path):
  """Exports for cuda and tpu, made on this CPU (a whole-image PatchCore, a SPADE index
  fitted on tiles: its program of tiles, and an ensemble of a SPADE, a PatchCore and a
  PaDiM),
  checked as test_export.py checks the library's."""
  if case.startswith("tiled-"):
    detector, index, _ = tiled_fitted(case.removeprefix("tiled-"))
  elif case.startswith("ensemble-"):
    detector, index, _ = stats_ensemble("mean")
  else:
    detector, index = fitted(case)
  folder = spade_jax.export_detector(detector, index, tmp_path / "export",
                                     platforms=("cuda", "tpu"), batch_size=BATCH)
  runner = load_runner(folder)
  manifest = runner.read_manifest(folder)
  assert manifest["platforms"] == ["cuda", "tpu"]
  exported = runner.load_program((folder / "program.jaxexport").read_bytes(), manifest)
  assert exported.platforms == ("cuda", "tpu")
  text = exported.mlir_module()
  targets = set(custom_call_targets(text))
  assert cpu_kernel.TARGET not in text
  assert not targets - ACCELERATOR_TARGETS, targets
  # Full float32 products: the search's (matmul.py) and every other dot of the program.
  assert "stablehlo.dot" in text and not low_precision_dots(text), low_precision_dots(text)[:3]
  if case.startswith("tiled-"):
    assert manifest["input"]["tiles"]["tile_size"] == 64
    assert manifest["input"]["shape"] == [BATCH, 64, 64, 3]
  if case.startswith("ensemble-"):
    assert manifest["method"] == "ensemble" and manifest["input"]["tiles"] is None
  with pytest.raises(runner.ArtifactError, match=r"exported for \['cuda', 'tpu'\], and jax "
                     r"runs on cpu here.*--platforms=cuda,tpu,cpu"):
    runner.Artifact(folder)


def test_image_of_another_size_is_refused(cpu_export, data, tmp_path):
  # An export for 30 x 40 images (export.py --fixed_image_size=30,40): the manifest's field,
  # re-checksummed as export_detector writes it.
  folder = tmp_path / "export"
  shutil.copytree(cpu_export, folder)
  manifest = json.loads((folder / "manifest.json").read_text())
  manifest["input"]["fixed_image_size"] = [30, 40]
  manifest["manifest_sha256"] = artifact.manifest_digest(manifest)
  (folder / "manifest.json").write_text(json.dumps(manifest))
  runner = load_runner(folder)
  artifact_ = runner.Artifact(folder)
  with pytest.raises(ValueError, match=r"is 32x40; this program was exported for 30x40"):
    runner.score_folder(artifact_, data.test_dir, tmp_path / "run")
  with pytest.raises(runner.ArtifactError, match=r"takes images \(4, 64, 64, 3\) uint8"):
    artifact_.check_batch(np.zeros((4, 32, 32, 3), np.uint8))


def test_batch_dimension_is_static(fitted, cpu_export):
  """The export's batch is static and run.py pads the last batch (test_run_py_...: 7
  images in batches of 4), rather than a symbolic batch (jax.export.symbolic_shape("b"))
  that would need no padding: the library's search chooses its query blocks from the
  query count (search/blocking.py, default_blocks / default_query_block: a block near
  2.4M / chunk entries that divides the count, no ragged last block), a Python decision on
  a static shape that a symbolic batch cannot make. Making it shape-independent would change the
  library's blocking for one padded batch per run (and a jitted polymorphic program
  still compiles once per distinct batch size, so the last short batch would cost a
  second compilation). If this trace starts to succeed, revisit the choice."""
  exported = load_runner(cpu_export).load_program(
      (cpu_export / "program.jaxexport").read_bytes(), {})
  assert exported.in_avals[-1].shape == (BATCH, SIZE, SIZE, 3)
  detector, index = fitted("spade")
  program = programs.build(detector, index)
  arrays, rebuild = artifact.flatten_arrays(programs.as_numpy_tree(program.arrays))
  specs = {name: jax.ShapeDtypeStruct(a.shape, a.dtype) for name, a in arrays.items()}
  batch, = jax.export.symbolic_shape("b")
  images = jax.ShapeDtypeStruct((batch, SIZE, SIZE, 3), np.float32)
  with cpu_kernel.xla_only(), pytest.raises(Exception, match="is inconclusive") as info:
    jax.export.export(jax.jit(lambda named, x: program.score(rebuild(named), x)),
                      platforms=("cpu",))(specs, images)
  assert any(entry.name in ("default_blocks", "default_query_block", "_query_block")
             for entry in info.traceback), [entry.name for entry in info.traceback]


def test_check_image_size():
  assert export.check_image_size(50) == (50, 50)
  assert export.check_image_size([30, 40]) == (30, 40)
  assert export.check_image_size(None) is None


def test_export_refuses_bad_arguments(fitted, tmp_path):
  detector, index = fitted("spade")
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("x")
  bad = [({"platforms": ("cpu", "gpu")}, "platforms must be among"),
         ({"platforms": ()}, "at least one"),
         ({"batch_size": 0}, "batch_size must be a positive int"),
         ({"fixed_image_size": (0, 3)}, "fixed_image_size must be"),
         ({"image_size": (0, 3)}, "^image_size must be"),
         ({"image_size": 17}, "not the detector's input size"),
         ({"threshold": 1.5}, "threshold must be a calibration.Threshold")]
  for kwargs, message in bad:
    with pytest.raises(ValueError, match=message):
      spade_jax.export_detector(detector, index, tmp_path / "out", **kwargs)
  with pytest.raises(ValueError, match="is not empty"):
    spade_jax.export_detector(detector, index, tmp_path / "full")
  other = calibration.Threshold(1.0, 0.5, 2, 6, {**detector.config.score_settings(),
                                                 "k_image_score": 3})
  with pytest.raises(ValueError, match="export_detector"):
    spade_jax.export_detector(detector, index, tmp_path / "out", threshold=other)
  patchcore, _ = fitted("patchcore")
  with pytest.raises(ValueError, match="index must be a PatchCoreIndex"):
    spade_jax.export_detector(patchcore, index, tmp_path / "out")
  assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_export_py_reports_bad_flags(tmp_path):
  proc = run_script("export.py", f"--index={tmp_path / 'missing.spade'}",
                    f"--output_dir={tmp_path / 'out'}", "--platforms=cpu,gpu")
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert "export.py: error: platforms must be among" in proc.stderr, proc.stderr[-2000:]


def test_export_refuses_a_backbone_without_variables(data, tmp_path):
  from spade_fake_backbone import FakeBackbone  # pylint: disable=import-outside-toplevel
  detector = spade_jax.Spade(FakeBackbone(), spade_jax.SpadeConfig(
      k_images=2, k_image_score=2, resize=SIZE, crop=SIZE))
  index = detector.fit(data.train)
  with pytest.raises(ValueError, match="needs a spade_jax Backbone"):
    spade_jax.export_detector(detector, index, tmp_path / "out")


def test_threshold_below_matches_the_float64_decision():
  rng = np.random.default_rng(0)
  for value in rng.uniform(-10, 10, 200):
    t32 = export.threshold_below(value)
    near = np.float32(value) + np.arange(-3, 4, dtype=np.float32) * np.spacing(np.float32(value))
    np.testing.assert_array_equal(near > t32, near.astype(np.float64) > value)


def test_runner_imports_no_spade_jax():
  import ast  # pylint: disable=import-outside-toplevel
  tree = ast.parse((REPO / "spade_jax" / "deploy" / "runner.py").read_text())
  imported = {alias.name.split(".")[0] for node in ast.walk(tree)
              if isinstance(node, ast.Import) for alias in node.names}
  imported |= {node.module.split(".")[0] for node in ast.walk(tree)
               if isinstance(node, ast.ImportFrom) and node.module}
  third_party = imported - set(sys.stdlib_module_names) - {"__future__"}
  assert third_party == {"jax", "numpy", "PIL", "safetensors"}


def test_xla_only_is_scoped():
  # Inside: no kernel, even for a search traced before (jax's caches are cleared);
  # after: the library's CPU lowerings call the kernel again.
  if not cpu_kernel.available():
    pytest.skip(f"CPU kernel unavailable: {cpu_kernel.unavailable_reason()}")
  args = (np.zeros((7, 16), np.float32), np.zeros((40, 16), np.float32))
  lowered = lambda: jax.jit(lambda q, g: spade_jax.knn(q, g, 2, "l2")).lower(*args).as_text()
  assert cpu_kernel.TARGET in lowered()
  with cpu_kernel.xla_only():
    assert not cpu_kernel.available() and "xla_only" in cpu_kernel.unavailable_reason()
    assert cpu_kernel.TARGET not in lowered()
  assert cpu_kernel.available() and cpu_kernel.TARGET in lowered()


# ----------------------------------------------------------------------------------
# Tiled exports (fit.py / predict.py --tile_size): the program scores batches of tiles;
# run.py cuts, stitches and takes the largest tile score as predict.py does.

TILE_TRAIN_HW = (80, 112)
# Test images of several sizes, none a multiple of the tile's step: 1 + 4 + 6 + 8 + 3 =
# 22 tiles of 64 with overlap 16, so batches of 4 tiles mix images and the last is padded.
TILE_TEST_HW = {"a_one_tile.png": (64, 64), "b_train_size.png": TILE_TRAIN_HW,
                "c/odd.png": (97, 150), "c/strip.png": (70, 200), "d_tall.png": (128, 64)}
TILED_CASES = {
    "spade-mean": ("spade", tiling.TileConfig(64, 16, "mean"), False),
    "patchcore-max-threshold": ("patchcore", tiling.TileConfig(64, 16, "max"), True),
    "padim-no-overlap-threshold": ("padim", tiling.TileConfig(64, 0, "mean"), True),
}


@pytest.fixture(name="tiled_data", scope="module")
def fixture_tiled_data(tmp_path_factory):
  """Training images of 80 x 112 and a test folder of TILE_TEST_HW (random RGB)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("tiled")
  rng = np.random.default_rng(5)
  train = [rng.integers(0, 256, (*TILE_TRAIN_HW, 3), np.uint8) for _ in range(3)]
  test = {}
  for name, hw in TILE_TEST_HW.items():
    image = rng.integers(0, 256, (*hw, 3), np.uint8)
    (root / "test" / name).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "test" / name)
    test[name] = image
  for i, image in enumerate(train):
    (root / "train").mkdir(exist_ok=True)
    Image.fromarray(image).save(root / "train" / f"{i}.png")
  return types.SimpleNamespace(root=root, train=train, test=test, test_dir=root / "test",
                               train_dir=root / "train")


@pytest.fixture(name="tiled_fitted", scope="module")
def fixture_tiled_fitted(tiled_data):
  """case -> (Tiled detector, index, scores of the test images (sorted by name)), fitted
  on the training images' tiles once per case."""
  cache, tiny = {}, tiny_backbone()

  def get(case):
    if case not in cache:
      name, tiles, _ = TILED_CASES[case]
      tiled = tiling.Tiled(DETECTORS[name](tiny), tiles)
      index = tiled.fit(tiled_data.train)
      scores, _ = tiled.score(index, [tiled_data.test[n] for n in sorted(tiled_data.test)])
      cache[case] = tiled, index, scores
    return cache[case]

  return get


@pytest.mark.slow
@pytest.mark.parametrize("case", list(TILED_CASES))
def test_tiled_run_py_gives_predict_py_scores_and_maps(case, tiled_fitted, tiled_data,
                                                       tmp_path):
  """run.py on a tiled export against predict.py with the same tiles (predict_folder
  tiles=): the same RTOL as the whole-image exports. Each tile is scored as a whole-image
  input is (same programs, same float32 rounding argument); the image score is the
  largest tile score (a max: exact, so within RTOL), and the stitched map a weighted
  average (or max) of tile maps each within the tolerance, computed by the same float64
  arithmetic on both sides (test_runner_tiles_match_the_library), so within it too."""
  _, tiles, with_threshold = TILED_CASES[case]
  tiled, index, scores = tiled_fitted(case)
  threshold = between_scores(scores, tiled.config) if with_threshold else None
  folders.predict_folder(tiled.detector, index, tiled_data.test_dir, tmp_path / "predict",
                         threshold=threshold, write_heatmaps=False, num_summary=0,
                         save_maps=True, tiles=tiles)
  expected = read_scores(tmp_path / "predict" / "scores.csv")
  if with_threshold:
    assert {r[2] for r in expected[1]} == {"0", "1"}
  folder = spade_jax.export_detector(tiled, index, tmp_path / "export", batch_size=BATCH,
                                     threshold=threshold)
  manifest = json.loads((folder / "manifest.json").read_text())
  assert manifest["input"]["tiles"] == {"tile_size": 64, "tile_overlap": tiles.tile_overlap,
                                        "merge": tiles.merge}
  assert manifest["input"]["shape"] == [BATCH, 64, 64, 3] and manifest["custom_calls"] == []
  runner = load_runner(folder)
  run_paths, _, skipped = runner.score_folder(runner.Artifact(folder), tiled_data.test_dir,
                                              tmp_path / "run", write_maps=True)
  assert not skipped and run_paths == sorted(TILE_TEST_HW)
  assert_same_scores(expected, read_scores(tmp_path / "run" / "scores.csv"))
  for name, hw in TILE_TEST_HW.items():
    run_map = np.load(tmp_path / "run" / "maps" / f"{name}.npy")
    predict_map = np.load(tmp_path / "predict" / "maps" / f"{name}.npy")
    assert run_map.shape == predict_map.shape == hw and run_map.dtype == np.float32, name
    assert np.isfinite(run_map).all(), name  # Every pixel is in a tile.
    np.testing.assert_allclose(run_map, predict_map, rtol=0,
                               atol=RTOL * float(np.abs(predict_map).max()), err_msg=name)


def test_runner_tiles_match_the_library():
  """run.py's own tiling arithmetic (it imports no spade_jax) against
  spade_jax.detector.tiling: the same tile positions for many sizes, tile sizes and
  overlaps, and the same stitched maps, bit for bit (mean and max)."""
  runner = load_runner_source()
  rng = np.random.default_rng(0)
  cases = [(h, w, t, o) for t in (32, 33, 64, 100) for o in sorted({0, 1, t // 4, t // 2, t - 1})
           for h in (t, t + 1, 2 * t - 1, 3 * t + 7) for w in (t, 2 * t + 5, 517)]
  cases += [(int(rng.integers(t, 900)), int(rng.integers(t, 900)), t, int(rng.integers(t // 8, t)))
            for t in rng.integers(32, 300, 200)]
  for h, w, t, o in cases:
    config = tiling.TileConfig(t, o)
    boxes = runner.tile_boxes(h, w, runner.TileSettings(t, o, "mean"))
    assert boxes == tiling.tile_boxes(h, w, config), (h, w, t, o)
  for h, w, t, o in [(97, 150, 64, 16), (70, 200, 64, 0), (64, 64, 64, 63), (129, 77, 33, 8)]:
    boxes = tiling.tile_boxes(h, w, tiling.TileConfig(t, o))
    maps = [rng.random((t, t), np.float32) for _ in boxes]
    for merge in tiling.MERGES:
      stitched = runner.Stitched("x", h, w, boxes, runner.TileSettings(t, o, merge))
      for m in maps:
        stitched.add(m, np.float32(m.max()), False)
      assert stitched.complete and stitched.score == max(m.max() for m in maps)
      np.testing.assert_array_equal(stitched.map(), tiling.stitch(maps, boxes, h, w, merge, o))
  with pytest.raises(ValueError, match=r"tile_size=64 is larger than the image \(63x100\)"):
    runner.tile_boxes(63, 100, runner.TileSettings(64, 0, "mean"))


def load_runner_source() -> types.ModuleType:
  """spade_jax/deploy/runner.py (run.py's source) as a module."""
  path = REPO / "spade_jax" / "deploy" / "runner.py"
  spec = importlib.util.spec_from_file_location("runner_source", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
  """experiments/<name> as a user runs it (without the tests' fake devices: no
  XLA_FLAGS), in a script server (tests/script_server.py): one process per script for
  this module's runs, not one per run."""
  return script_server.run_script(
      name, *args, env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, timeout=600)


@pytest.mark.slow
def test_tiled_index_from_fit_py_exports_and_runs_without_spade_jax(tiled_data, tmp_path):
  """The commands end to end: fit.py --tile_size (efficientnet_lite0, packaged weights),
  export.py (the index's tiling; a flag that contradicts it is refused, naming it),
  predict.py and run.py (where spade_jax cannot be imported) on images of several sizes:
  the same scores.csv within RTOL, the same maps; an image smaller than a tile is refused
  by run.py in one line."""
  index_path = tmp_path / "tiled.spade"
  proc = run_script("fit.py", f"--train_dir={tiled_data.train_dir}", f"--index={index_path}",
                    "--k_images=3", "--k_image_score=2", "--tile_size=64", "--tile_overlap=16",
                    "--tile_merge=max")
  assert proc.returncode == 0, proc.stderr[-3000:]
  for flag, message in [("--tile_size=32", "--tile_size=32 does not match the index"),
                        ("--tile_overlap=64", "--tile_overlap=64 must be smaller than")]:
    proc = run_script("export.py", f"--index={index_path}",
                      f"--output_dir={tmp_path / 'refused'}", flag)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.splitlines() if "export.py: error:" in l]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "refused").exists()
  proc = run_script("export.py", f"--index={index_path}", f"--output_dir={tmp_path / 'export'}",
                    f"--batch_size={BATCH}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "tiles of 64, overlap 16, merge max" in proc.stdout, proc.stdout
  proc = run_script("predict.py", f"--index={index_path}", f"--images={tiled_data.test_dir}",
                    f"--output_dir={tmp_path / 'predict'}", "--save_maps", "--noheatmaps",
                    "--num_summary=0", "--compilation_cache_dir=none")
  assert proc.returncode == 0, proc.stderr[-3000:]

  site = isolated_site(tmp_path)
  run_py = tmp_path / "export" / "run.py"
  proc = run_isolated(site, str(run_py), f"--images={tiled_data.test_dir}",
                      f"--output_dir={tmp_path / 'run'}", "--maps", cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert_same_scores(read_scores(tmp_path / "predict" / "scores.csv"),
                     read_scores(tmp_path / "run" / "scores.csv"))
  for name, hw in TILE_TEST_HW.items():
    predict_map = np.load(tmp_path / "predict" / "maps" / f"{name}.npy")
    run_map = np.load(tmp_path / "run" / "maps" / f"{name}.npy")
    assert run_map.shape == hw
    np.testing.assert_allclose(run_map, predict_map, rtol=0,
                               atol=RTOL * float(np.abs(predict_map).max()), err_msg=name)

  from PIL import Image  # pylint: disable=import-outside-toplevel
  small = tmp_path / "small"
  small.mkdir()
  Image.fromarray(np.zeros((40, 300, 3), np.uint8)).save(small / "thin.png")
  proc = run_isolated(site, str(run_py), f"--images={small}", f"--output_dir={tmp_path / 'r2'}",
                      cwd=tmp_path)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert "image 'thin.png': tile_size=64 is larger than the image (40x300)" in proc.stderr


# ----------------------------------------------------------------------------------
# Ensembles (spade_jax.Ensemble): one program runs the members' programs on the same
# input, standardises their outputs by the index's statistics and combines them as
# Ensemble.score does (programs.ensemble_program).

# case -> (its two members (DETECTORS names), the second on a backbone of its own (else
# both share one, carried once), EnsembleConfig, with a threshold).
ENSEMBLES = {
    "patchcore+padim-mean": (("patchcore", "padim"), False,
                             spade_jax.EnsembleConfig(folds=2), False),
    "patchcore-l2+mahalanobis-max": (
        ("patchcore", "patchcore-mahalanobis"), True,
        spade_jax.EnsembleConfig(combine="max", statistics="median_mad", folds=2), True),
}


def make_ensemble(case: str) -> spade_jax.Ensemble:
  names, own_backbone, config, _ = ENSEMBLES[case]
  tiny = tiny_backbone()
  second = tiny_backbone(1, "tiny_pyramid_b") if own_backbone else tiny
  return spade_jax.Ensemble([DETECTORS[names[0]](tiny), DETECTORS[names[1]](second)], config)


def ensemble_tolerances(index, member_scores, member_maps) -> tuple[float, float]:
  """(score, map) absolute tolerances of an exported ensemble against Ensemble.score.

  Each member's raw outputs are within RTOL (relative; of the largest map value for
  maps) of the library's, as a single detector's export is (module docstring); the
  standardisation divides them by the member's scale, so a standardised output is within
  RTOL x max|raw| / scale, and a mean or max over members stays within the largest
  member's bound. (The library computes the image z-scores in float64, the program in
  float32: a few ulps more, far below this.)"""
  score_tol = max(RTOL * float(np.abs(s).max()) / float(index.image_scale[m])
                  for m, s in enumerate(member_scores))
  map_tol = max(RTOL * float(np.abs(a).max()) / float(index.pixel_scale[m])
                for m, a in enumerate(member_maps))
  return score_tol, map_tol


def _statistics_index(ensemble, indices, member_scores, member_maps):
  """An EnsembleIndex of fitted member indices with statistics chosen here (the test
  images' mean and standard deviation, so that z-scores are of order 1): Ensemble.score
  and the export read whatever statistics the index holds."""
  stats = {"image_center": [np.mean(s) for s in member_scores],
           "image_scale": [np.std(s) + 0.1 for s in member_scores],
           "pixel_center": [np.mean(a) for a in member_maps],
           "pixel_scale": [np.std(a) + 0.1 for a in member_maps]}
  return spade_jax.EnsembleIndex(indices=tuple(indices), members=ensemble.names,
                                 **{k: np.asarray(v, np.float32) for k, v in stats.items()})


@pytest.fixture(name="stats_ensemble", scope="module")
def fixture_stats_ensemble(fitted, scored):
  """combine -> (Ensemble of the fitted "spade", "patchcore" and "padim" (one backbone),
  an EnsembleIndex of their indices with _statistics_index's statistics, tolerances)."""
  names = ("spade", "patchcore", "padim")

  def get(combine):
    ensemble = spade_jax.Ensemble([fitted(n)[0] for n in names],
                                  spade_jax.EnsembleConfig(combine=combine))
    scores, maps = [scored(n)[1] for n in names], [scored(n)[2] for n in names]
    index = _statistics_index(ensemble, [fitted(n)[1] for n in names], scores, maps)
    return ensemble, index, ensemble_tolerances(index, scores, maps)

  return get


@pytest.mark.parametrize("combine", ["mean", "max"])
def test_exported_ensemble_program_is_ensemble_score(combine, stats_ensemble, data, tmp_path):
  """The exported program (through jax.export and run.py's Artifact, batches of 4 with
  the last padded) on the images run.py prepares, against Ensemble.score on the same
  images: scores and maps."""
  ensemble, index, (score_tol, map_tol) = stats_ensemble(combine)
  images = mvtec.load_category(data.root / "data", "alpha").test_images
  scores, maps = ensemble.score(index, images)
  assert np.abs(scores).max() < 20  # z-scores of order 1 (not a degenerate comparison).
  folder = spade_jax.export_detector(ensemble, index, tmp_path / "export", batch_size=BATCH)
  runner = load_runner(folder)
  exported = runner.Artifact(folder)
  inputs = np.stack([exported.to_input(image) for image in images])
  out = [exported(inputs[i:i + BATCH]) for i in range(0, len(inputs), BATCH)]
  np.testing.assert_allclose(np.concatenate([o["scores"] for o in out]), scores, rtol=0,
                             atol=score_tol)
  got_maps = np.concatenate([o["maps"] for o in out])
  assert got_maps.shape == maps.shape == (len(images), SIZE, SIZE)
  np.testing.assert_allclose(got_maps, maps, rtol=0, atol=map_tol)
  manifest = runner.read_manifest(folder)
  assert manifest["method"] == "ensemble" and manifest["settings"]["combine"] == combine
  assert [m["name"] for m in manifest["settings"]["members"]] == list(ensemble.names)
  assert [m["method"] for m in manifest["settings"]["members"]] == ["spade", "patchcore",
                                                                    "padim"]
  assert manifest["index"]["ensemble_members"] == list(ensemble.names)
  assert manifest["input"]["shape"] == [BATCH, SIZE, SIZE, 3] and manifest["custom_calls"] == []
  # One backbone shared by the three members: its variables are carried once.
  backbones = {n.split("/")[2] for n in manifest["array_shapes"]
               if n.startswith("program/backbones/")}
  assert backbones == {"0"} and not any("/backbone/" in n for n in manifest["array_shapes"])
  np.testing.assert_array_equal(
      exported.arrays["program/image_scale"], np.asarray(index.image_scale, np.float32))


def test_ensemble_export_refusals(tmp_path):
  """Each refusal comes before any member index is used, or from the member's own check
  (named): unfitted detectors and placeholder member indices suffice."""
  tiny = tiny_backbone()
  patchcore, padim = DETECTORS["patchcore"](tiny), DETECTORS["padim"](tiny)
  ensemble = spade_jax.Ensemble([patchcore, padim])

  def index_of(ensemble, indices=("not an index", "not an index")):
    ones = np.ones(len(indices), np.float32)
    return spade_jax.EnsembleIndex(indices=tuple(indices), image_center=ones,
                                   image_scale=ones, pixel_center=ones, pixel_scale=ones,
                                   members=ensemble.names)

  index, out = index_of(ensemble), tmp_path / "out"
  # Members whose inputs differ (a crop, the whole image): named with their inputs.
  whole = spade_jax.Padim(tiny, spade_jax.PadimConfig(
      resize=SIZE, crop=None, image_size=(SIZE, SIZE * 5 // 4)))
  mixed = spade_jax.Ensemble([patchcore, whole])
  with pytest.raises(ValueError, match=r"members bring images to different inputs \("
                     r"patchcore:l2:tiny_pyramid:layer2\+layer3: resize 64, centre crop 64; "
                     r"padim::tiny_pyramid:layer1\+layer2\+layer3: the whole image resized "
                     r"to 64x80\)"):
    spade_jax.export_detector(mixed, index_of(mixed), out)
  # Tiles: refused when the tiled detector is made, and by the export.
  with pytest.raises(ValueError, match="tiles .* not supported with an ensemble"):
    tiling.Tiled(ensemble, tiling.TileConfig(SIZE))
  tiled = tiling.Tiled.__new__(tiling.Tiled)
  tiled.detector, tiled.tiles = ensemble, tiling.TileConfig(SIZE)
  with pytest.raises(ValueError, match="an ensemble cannot be exported with tiles"):
    spade_jax.export_detector(tiled, index, out)
  # Indices of other members, or not an ensemble's.
  with pytest.raises(ValueError, match="the index was fitted for members"):
    spade_jax.export_detector(spade_jax.Ensemble([padim, patchcore]), index, out)
  with pytest.raises(ValueError, match="index must be an EnsembleIndex, got str"):
    spade_jax.export_detector(ensemble, "not an index", out)
  # A member's index that does not fit it: the member's own check, naming the member.
  with pytest.raises(ValueError, match=r"ensemble member 0 \(patchcore:l2:.*index must be a "
                     "PatchCoreIndex, got str"):
    spade_jax.export_detector(ensemble, index, out)
  # Thresholds: one of a single detector, one calibrated with another combine.
  single = calibration.Threshold(1.0, 0.5, 2, 6, patchcore.config.score_settings())
  with pytest.raises(ValueError, match="calibrated for another detector"):
    spade_jax.export_detector(ensemble, index, out, threshold=single)
  other_combine = calibration.Threshold(1.0, 0.5, 2, 6, {
      **ensemble.config.score_settings(), "combine": "max"})
  with pytest.raises(ValueError, match="export_detector.*combine"):
    spade_jax.export_detector(ensemble, index, out, threshold=other_combine)
  with pytest.raises(ValueError, match=r"not the detector's input size \(64, 64\)"):
    spade_jax.export_detector(ensemble, index, out, image_size=32)
  # A member whose backbone is not a spade_jax Backbone (nothing to carry): named.
  from spade_fake_backbone import FakeBackbone  # pylint: disable=import-outside-toplevel
  fake = spade_jax.Padim(FakeBackbone(), spade_jax.PadimConfig(resize=SIZE, crop=SIZE))
  fake_ensemble = spade_jax.Ensemble([fake, patchcore])
  with pytest.raises(ValueError, match=r"ensemble member 0 \(padim::.*needs a spade_jax "
                     "Backbone"):
    spade_jax.export_detector(fake_ensemble, index_of(fake_ensemble), out)
  assert not out.exists()


@pytest.fixture(name="ensemble_fitted", scope="module")
def fixture_ensemble_fitted(data):
  """case -> namespace(ensemble, index (Ensemble.fit on the training images), paths,
  scores [7] and maps [7, 64, 64] of Ensemble.score on the test images, tolerances),
  once per case."""
  category = mvtec.load_category(data.root / "data", "alpha")
  cache = {}

  def get(case):
    if case not in cache:
      ensemble = make_ensemble(case)
      index = ensemble.fit(data.train)
      scores, maps = ensemble.score(index, category.test_images)
      raw = ensemble.member_outputs(index, category.test_images)
      cache[case] = types.SimpleNamespace(
          ensemble=ensemble, index=index, scores=scores, maps=maps,
          paths=[p.removeprefix("test/") for p in category.test_paths],
          tolerances=ensemble_tolerances(index, *raw))
    return cache[case]

  return get


@pytest.mark.slow  # Ensemble.fit: each member refitted over the folds.
@pytest.mark.parametrize("case", list(ENSEMBLES))
def test_ensemble_run_py_gives_predict_py_scores_and_maps(case, ensemble_fitted, data,
                                                          tmp_path):
  """An ensemble fitted by Ensemble.fit, exported (the threshold's decision too, for the
  max case), run by run.py on the test folder: predict.py's scores.csv (folders.
  predict_folder, which scores with Ensemble.score) and its maps at each image's size."""
  fitted_ = ensemble_fitted(case)
  ensemble, index = fitted_.ensemble, fitted_.index
  score_tol, map_tol = fitted_.tolerances
  threshold = (between_scores(fitted_.scores, ensemble.config) if ENSEMBLES[case][3]
               else None)
  expected = predict(ensemble, index, data, threshold, tmp_path / "predict", save_maps=True)
  if threshold is not None:
    assert {r[2] for r in expected[1]} == {"0", "1"}
  folder = spade_jax.export_detector(ensemble, index, tmp_path / "export", batch_size=BATCH,
                                     threshold=threshold)
  runner = load_runner(folder)
  run_paths, run_scores, skipped = runner.score_folder(
      runner.Artifact(folder), data.test_dir, tmp_path / "run", write_maps=True)
  assert not skipped and run_paths == sorted(fitted_.paths)
  assert_same_scores(expected, read_scores(tmp_path / "run" / "scores.csv"), atol=score_tol)
  order = [fitted_.paths.index(p) for p in run_paths]
  np.testing.assert_allclose(run_scores, fitted_.scores[order], rtol=0, atol=score_tol)
  for path in fitted_.paths:
    run_map = np.load(tmp_path / "run" / "maps" / f"{path}.npy")
    predict_map = np.load(tmp_path / "predict" / "maps" / f"{path}.npy")
    assert run_map.shape == predict_map.shape == IMAGE_HW and run_map.dtype == np.float32
    np.testing.assert_allclose(run_map, predict_map, rtol=0, atol=map_tol, err_msg=path)
  manifest = json.loads((folder / "manifest.json").read_text())
  assert manifest["method"] == "ensemble"
  assert manifest["settings"]["statistics"] == ensemble.config.statistics
  assert (manifest["threshold"] is not None) == (threshold is not None)
  backbones = {n.split("/")[2] for n in manifest["array_shapes"]
               if n.startswith("program/backbones/")}
  assert backbones == ({"0", "1"} if ENSEMBLES[case][1] else {"0"})


ENSEMBLE_MEMBERS = ("patchcore:l2:efficientnet_lite0", "padim::efficientnet_lite0:layer1+layer2")
ENSEMBLE_RESIZE = 48


@pytest.mark.slow
def test_ensemble_index_from_fit_py_exports_and_runs_without_spade_jax(data, tmp_path):
  """The commands end to end: fit.py --method=ensemble --calibrate (a PatchCore and a
  PaDiM on efficientnet_lite0 with its packaged weights, whole 32 x 40 images at 48 x 60),
  export.py --index=FOLDER (a tile flag is refused, naming it), predict.py, and run.py
  where spade_jax cannot be imported: predict.py's scores.csv (the threshold's decisions
  exactly) and maps, within ensemble_tolerances of the members' outputs."""
  index_path = tmp_path / "alpha.ensemble"
  proc = run_script("fit.py", f"--train_dir={data.root / 'data' / 'alpha' / 'train' / 'good'}",
                    f"--index={index_path}", "--method=ensemble", f"--resize={ENSEMBLE_RESIZE}",
                    f"--ensemble_members={','.join(ENSEMBLE_MEMBERS)}", "--ensemble_folds=3",
                    "--calibrate", "--calibration_quantile=0.5")
  assert proc.returncode == 0, proc.stderr[-3000:]
  proc = run_script("export.py", f"--index={index_path}", f"--output_dir={tmp_path / 'refused'}",
                    "--tile_size=32")
  assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if "export.py: error:" in l]
  assert len(lines) == 1 and "--tile_size: tiles are not supported with an ensemble" in lines[0]
  assert not (tmp_path / "refused").exists()
  proc = run_script("export.py", f"--index={index_path}", f"--output_dir={tmp_path / 'export'}",
                    f"--batch_size={BATCH}", "--platforms=cpu,cuda,tpu")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "exported ensemble of 2 members (mean) for cpu,cuda,tpu" in proc.stdout, proc.stdout
  proc = run_script("predict.py", f"--index={index_path}", f"--images={data.test_dir}",
                    f"--output_dir={tmp_path / 'predict'}", "--save_maps", "--noheatmaps",
                    "--num_summary=0", "--compilation_cache_dir=none")
  assert proc.returncode == 0, proc.stderr[-3000:]
  expected = read_scores(tmp_path / "predict" / "scores.csv")
  assert expected[0] == ["path", "score", "anomalous"]

  site = isolated_site(tmp_path)
  proc = run_isolated(site, str(tmp_path / "export" / "run.py"), f"--images={data.test_dir}",
                      f"--output_dir={tmp_path / 'run'}", "--maps", cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # The tolerances, from the members' own outputs (built in process as fit.py builds them).
  contents = spade_jax.load_ensemble_index_file(index_path)
  ensemble = spade_jax.Ensemble(
      spade_jax.Ensemble.from_specs(ENSEMBLE_MEMBERS, resize=ENSEMBLE_RESIZE, crop=None)
      .with_whole_image_size(*IMAGE_HW).members, spade_jax.EnsembleConfig(folds=3))
  images = mvtec.load_category(data.root / "data", "alpha").test_images
  score_tol, map_tol = ensemble_tolerances(
      contents.index, *ensemble.member_outputs(contents.index, images))
  assert_same_scores(expected, read_scores(tmp_path / "run" / "scores.csv"), atol=score_tol)
  manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
  assert manifest["method"] == "ensemble" and manifest["platforms"] == ["cpu", "cuda", "tpu"]
  assert manifest["threshold"] == json.loads(contents.threshold.to_json())
  assert manifest["input"]["image_size"] == [ENSEMBLE_RESIZE, ENSEMBLE_RESIZE * 5 // 4]
  for (path, *_) in expected[1]:
    run_map = np.load(tmp_path / "run" / "maps" / f"{path}.npy")
    predict_map = np.load(tmp_path / "predict" / "maps" / f"{path}.npy")
    assert run_map.shape == predict_map.shape == IMAGE_HW, path
    np.testing.assert_allclose(run_map, predict_map, rtol=0, atol=map_tol, err_msg=path)
