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
through fit.py, export.py, predict.py and run.py (efficientnet_lite0).

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


def tiny_backbone() -> spade_jax.Backbone:
  from spade_jax.features.backbones.backbone import FeatureInfo  # pylint: disable=import-outside-toplevel
  module = TinyPyramid()
  variables = module.init(jax.random.PRNGKey(0), np.zeros((1, SIZE, SIZE, 3), np.float32))
  features = {level: FeatureInfo(c, 4 * 2 ** i)
              for i, (level, c) in enumerate(TINY_CHANNELS.items())}
  return spade_jax.Backbone("tiny_pyramid", module, variables,
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


def assert_same_scores(expected, actual):
  (header, rows), (run_header, run_rows) = expected, actual
  assert run_header == header
  assert [r[0] for r in run_rows] == [r[0] for r in rows]
  for row, run_row in zip(rows, run_rows):
    assert float(run_row[1]) == pytest.approx(float(row[1]), rel=RTOL), row[0]
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


@pytest.mark.parametrize("case", ["patchcore", "tiled-spade-mean"])
def test_accelerator_export_is_checked_and_refused_on_cpu(case, fitted, tiled_fitted, tmp_path):
  """Exports for cuda and tpu, made on this CPU (a whole-image PatchCore, and a SPADE
  index fitted on tiles: its program of tiles), checked as test_export.py checks the
  library's."""
  if case.startswith("tiled-"):
    detector, index, _ = tiled_fitted(case.removeprefix("tiled-"))
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
