r"""spade_jax performance suite: prints Markdown tables and writes a JSON file.

  python experiments/benchmark.py                              # whole suite (over 13 min, 2 CPUs)
  python experiments/benchmark.py --sections=knn,memory --output_md=/tmp/bench.md

Sections (see BENCHMARKS.md for what each figure means):
  backbone   images/s of resnet50 / wide_resnet50_2 / efficientnet_lite0, batch 8, 224^2
  knn        spade_jax.knn GFLOP/s on the K=50 layer1 shape vs NumPy and jnp.dot matmul
  pixel      seconds per test image of pixel scoring + anomaly maps (WRN50-2 shapes, K=50)
  scaling    weak scaling of knn on a sharded gallery over 1, 2, 4, 8 fake CPU devices
  memory     scoring working set (peak RSS - RSS with inputs) as the gallery grows 8x,
             and of one image scored tile by tile from 256 x 256 to 8000 x 2000
  precision  bfloat16 distances and lax.approx_min_k: speed and accuracy vs exact search
  kernels    spade_jax.kernels against L2: knn and pixel scoring seconds, ratios to L2
  coreset    PatchCore: coreset seconds and memory as N grows to 1M, scoring s / image
             against SPADE, a sharded memory bank against one device (fake devices)
  pipeline   end to end: images/s of fit and of scoring (backbone + search + maps) per
             method, and predict.py's wall time with a cold, then a warm compilation cache
             (about 8 min of the suite on 2 busy CPU cores at its defaults)
  end_to_end evaluate.py on one built-in category (spade, patchcore; cold and warm
             compilation cache) against a PyTorch SPADE (--end_to_end_torch_python) and
             anomalib's PatchCore (--end_to_end_anomalib_python), with its profile

JAX's persistent compilation cache is on, as in every script (--compilation_cache_dir,
default $SPADE_JAX_CACHE/jax_compilation_cache; 'none' turns it off). With a warm
cache the "first call (compile)" columns time a load from the cache, not a
compilation: pass --compilation_cache_dir=none (or an empty folder) to measure
compilation. The report's header says which. The pipeline section measures the cache
itself, in folders of its own.
"""

from collections.abc import Sequence
import json
import pathlib
import sys

from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench import (
  memory,  # pylint: disable=g-import-not-at-top,wrong-import-position
  pipeline,  # pylint: disable=g-import-not-at-top,wrong-import-position
  suite,  # pylint: disable=g-import-not-at-top,wrong-import-position
)
import detector_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

_SECTIONS = flags.DEFINE_list("sections", list(suite.SECTIONS),
                              f"Sections to run, from {', '.join(suite.SECTIONS)}.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", "results/benchmark.json",
                                   "Where the full results (JSON) go.")
_OUTPUT_MD = flags.DEFINE_string("output_md", None, "Also write the Markdown tables here.")
_CACHE_DIR = detector_flags.define_compilation_cache_flag()
flags.adopt_module_key_flags(detector_flags)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per figure (median); the "
                                "first, compiling call is excluded.")
# backbone
_BACKBONES = flags.DEFINE_list("backbones", ["resnet50", "wide_resnet50_2",
                                             "efficientnet_lite0"], "Backbones to time.")
_BACKBONE_BATCH = flags.DEFINE_integer("backbone_batch", 8, "Images per forward pass.")
_BACKBONE_TORCH = flags.DEFINE_string(
    "backbone_torch_python", None, "A Python with torch (a throwaway venv): also time "
    "PyTorch's forward pass of each backbone in the same run (bench/torch_backbone.py).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Input / anomaly-map side.")
# knn (the K = 50 layer1 gallery of wide_resnet50_2: 50 * 56 * 56 rows of 256)
_KNN_QUERIES = flags.DEFINE_integer("knn_queries", 3136, "Q: query rows (56 * 56).")
_KNN_GALLERY = flags.DEFINE_integer("knn_gallery", 156800, "M: gallery rows (50 * 56 * 56).")
_KNN_DIM = flags.DEFINE_integer("knn_dim", 256, "D: feature size.")
_KNN_K = flags.DEFINE_integer("knn_k", 1, "Neighbours (SPADE's kappa = 1).")
_KNN_REPEATS = flags.DEFINE_integer("knn_repeats", 5, "Timed rounds of the knn section "
                                    "(knn, jnp.dot and NumPy take turns each round).")
_KERNEL_BLOCKS = flags.DEFINE_list(
    "knn_kernel_blocks", ["256x2048", "512x512", "512x1024", "1024x256", "1568x256"],
    "QUERIESxROWS sgemm blocks of the CPU kernel to time beside knn (empty: none).")
_REF_CHUNKS = flags.DEFINE_list("knn_ref_chunks", None, "Gallery rows per matmul block of "
                                "the NumPy / jnp.dot references (best is reported). "
                                "Default: knn's own chunk and 8192.")
# pixel
_PIXEL_K = flags.DEFINE_integer("pixel_k_images", 50, "K: training images in the gallery.")
_PIXEL_TEST = flags.DEFINE_integer("pixel_num_test", 1, "Test images per scoring call.")
_PIXEL_GRID = flags.DEFINE_integer("pixel_grid", 56, "layer1 side; layer2/3 are /2, /4.")
_PIXEL_CHANNELS = flags.DEFINE_list("pixel_channels", ["256", "512", "1024"],
                                    "Channels of layer1, layer2, layer3.")
_PIXEL_COMBINE = flags.DEFINE_list("pixel_combine", ["ensemble", "cat"], "Combine modes.")
_PIXEL_REPEATS = flags.DEFINE_integer("pixel_repeats", 2, "Timed calls per combine mode.")
# scaling
_SCALING_DEVICES = flags.DEFINE_list("scaling_devices", ["1", "2", "4", "8"],
                                     "Fake CPU device counts (one subprocess each).")
_SCALING_ROWS = flags.DEFINE_integer("scaling_rows_per_device", 19600,
                                     "Gallery rows per device (weak scaling).")
# memory
_MEMORY_KINDS = flags.DEFINE_list(
    "memory_kinds", list(memory.KINDS), "What is scored as the gallery grows: "
    "knn (gallery rows), pixel (training images in the memory bank, K fixed), pixel_k "
    "(K, the per-test-image gallery).")
_MEMORY_SCALES = flags.DEFINE_list("memory_scales", ["1", "2", "4", "8"],
                                   "Gallery sizes, in multiples of the base size.")
_MEMORY_ROWS = flags.DEFINE_integer("memory_knn_rows", 19600, "knn gallery rows at scale 1.")
_MEMORY_K = flags.DEFINE_integer("memory_pixel_k_images", 6,
                                 "K for pixel; K at scale 1 for pixel_k.")
_MEMORY_TILE_IMAGES = flags.DEFINE_list(
    "memory_tile_images", ["256x256", "928x928", "2000x2000", "8000x2000"],
    "Images (HxW) scored tile by tile, one fresh process each: the working set must not "
    "grow with the image (issue 19; 928x928 is 16 tiles of 256 overlap 32: one tile "
    "batch at --batch_size 4). Empty: skip.")
_MEMORY_TILE_SIZE = flags.DEFINE_integer("memory_tile_size", 256, "Tile side of "
                                         "--memory_tile_images.")
_MEMORY_TILE_OVERLAP = flags.DEFINE_integer("memory_tile_overlap", 32, "Tile overlap of "
                                            "--memory_tile_images.")
_MEMORY_TRAIN = flags.DEFINE_integer("memory_pixel_train_images", 25,
                                     "Training images at scale 1 for pixel.")
# precision
_PRECISION_GALLERY = flags.DEFINE_integer("precision_gallery", 156800, "Gallery rows.")
_PRECISION_K = flags.DEFINE_integer("precision_k", 1, "Neighbours (recall@k).")
_RECALL_TARGET = flags.DEFINE_float("approx_recall_target", 0.95,
                                    "lax.approx_min_k recall_target.")
# coreset (PatchCore)
_CORESET_NS = flags.DEFINE_list("coreset_ns", ["62500", "125000", "250000", "500000",
                                               "1000000"], "Feature rows N of the coreset "
                                "points (one process each).")
_CORESET_DIM = flags.DEFINE_integer("coreset_dim", 128, "D of the coreset features.")
_CORESET_SIZE = flags.DEFINE_integer("coreset_size", 200, "Greedy steps (points selected) "
                                     "per coreset call.")
_CORESET_PROFILES = flags.DEFINE_list("coreset_profiles", ["wide_resnet50_2",
                                                           "efficientnet_lite0"],
                                      "Pyramid shapes of the PatchCore vs SPADE scoring.")
_CORESET_TRAIN = flags.DEFINE_integer("coreset_train_images", 200,
                                      "Training images of the scoring comparison (>= K).")
_CORESET_TEST = flags.DEFINE_integer("coreset_num_test", 2, "Test images per scoring call.")
_CORESET_DEVICES = flags.DEFINE_integer("coreset_sharded_devices", 8,
                                        "Fake CPU devices of the sharded comparison.")
_CORESET_SHARDED_N = flags.DEFINE_integer("coreset_sharded_n", 200000,
                                          "N of the sharded coreset comparison.")
_CORESET_PRECISION_NS = flags.DEFINE_list(
    "coreset_precision_ns", ["200000", "1000000"], "N of the float32 vs bf16 coreset "
    "comparison (one process each; ms per step, same selection).")
_CORESET_PRECISION_SIZE = flags.DEFINE_integer(
    "coreset_precision_size", None, "Greedy steps of the float32 vs bf16 comparison "
    "(default --coreset_size; 100000 at N = 1M is a 10% coreset).")
_CORESET_PARTS = flags.DEFINE_list("coreset_parts", ["scaling", "scoring", "sharded",
                                                     "precision", "prune"],
                                   "Parts of the coreset section to run.")
_CORESET_PRUNE_SOURCES = flags.DEFINE_list(
    "coreset_prune_sources", ["gaussian:200000", "gaussian:1000000", "brick", "grass",
                              "gravel", "cup", "cat"],
    "Rows of the plain vs pruned coreset comparison (one process each): gaussian:N "
    "(N x --coreset_dim N(0, 1) rows, --coreset_precision_size steps) or a built-in "
    "category (its PatchCore patch features, efficientnet_lite0, a 10% coreset).")
_CORESET_PRUNE_TRAIN = flags.DEFINE_integer(
    "coreset_prune_train_images", 60, "Training images of a category's patch features "
    "in the pruning comparison (the built-in benchmark has 60).")
# pipeline
_PIPELINE_BACKBONE = flags.DEFINE_string("pipeline_backbone", "wide_resnet50_2",
                                         "Backbone of the end-to-end runs (random weights).")
_PIPELINE_METHODS = flags.DEFINE_list("pipeline_methods", list(pipeline.METHODS),
                                      "Detectors to run.")
_PIPELINE_TRAIN = flags.DEFINE_integer("pipeline_train", 50, "Training images (>= K).")
_PIPELINE_TEST = flags.DEFINE_integer("pipeline_test", 16, "Test images.")
_PIPELINE_K = flags.DEFINE_integer("pipeline_k_images", 50, "K.")
_PIPELINE_REPEATS = flags.DEFINE_integer("pipeline_repeats", 1,
                                         "Timed fit / score calls after the first.")
_PIPELINE_CACHE = flags.DEFINE_integer("pipeline_cache_images", 8, "Images predict.py "
                                       "scores in the compilation-cache runs (0: none).")
# kernels (spade_jax.kernels against L2: knn and pixel scoring, efficientnet_lite0 shapes)
_KERNELS = flags.DEFINE_list("kernels_names", ["l2", "mahalanobis", "linear", "rbf",
                                               "laplacian", "polynomial", "rff", "nystrom"],
                             "Kernels timed against L2 (l2 included).")
_KERNELS_CHANNELS = flags.DEFINE_list("kernels_channels", ["24", "40", "112"],
                                      "Channels of layer1..3 (efficientnet_lite0).")
_KERNELS_K = flags.DEFINE_integer("kernels_k_images", 50, "K of the kernels section.")


# end_to_end
_E2E_CATEGORY = flags.DEFINE_string("end_to_end_category", "gravel",
                                    "The built-in category evaluate.py runs on.")
_E2E_TORCH = flags.DEFINE_string(
    "end_to_end_torch_python", None, "A Python with torch, torchvision, scikit-learn and "
    "the efficientnet-lite0 weights (e.g. the anomalib venv): runs bench/torch_spade.py.")
_E2E_ANOMALIB = flags.DEFINE_string(
    "end_to_end_anomalib_python", None, "The anomalib 2.7 venv's Python "
    "(../shared/tools/anomalib): runs its PatchCore on the same category.")
_E2E_ANOMALIB_SCRIPT = flags.DEFINE_string(
    "end_to_end_anomalib_script", str(pathlib.Path(__file__).resolve().parents[2] / "shared"
                                      / "tools" / "anomalib" / "run_anomalib.py"),
    "anomalib's runner (run_anomalib.py).")


def _ints(values: Sequence[str]) -> list[int]:
  return [int(v) for v in values]


def _pair(value: str) -> tuple[int, int]:
  try:
    a, b = value.lower().split("x")
    return int(a), int(b)
  except ValueError as e:
    raise app.UsageError(f"expected QUERIESxROWS (e.g. 512x512), got {value!r}") from e


def section_kwargs() -> dict[str, dict]:
  """Flags -> keyword arguments of each selected section (bench.<name>.section)."""
  repeats = _REPEATS.value
  knn_shape = {"queries": _KNN_QUERIES.value, "dim": _KNN_DIM.value}
  pyramid = {"grid": _PIXEL_GRID.value, "channels": _ints(_PIXEL_CHANNELS.value)}
  every = {
      "backbone": {"names": _BACKBONES.value, "batch": _BACKBONE_BATCH.value,
                   "image_size": _IMAGE_SIZE.value, "repeats": repeats,
                   "torch_python": _BACKBONE_TORCH.value},
      "knn": {**knn_shape, "gallery": _KNN_GALLERY.value, "k": _KNN_K.value,
              "repeats": _KNN_REPEATS.value,
              "ref_chunks": _ints(_REF_CHUNKS.value) if _REF_CHUNKS.value else None,
              "kernel_blocks": [_pair(b) for b in _KERNEL_BLOCKS.value]},
      "pixel": {**pyramid, "k_images": _PIXEL_K.value, "num_test": _PIXEL_TEST.value,
                "combine_modes": _PIXEL_COMBINE.value, "repeats": _PIXEL_REPEATS.value,
                "image_size": _IMAGE_SIZE.value},
      "scaling": {**knn_shape, "device_counts": _ints(_SCALING_DEVICES.value),
                  "rows_per_device": _SCALING_ROWS.value, "k": _KNN_K.value,
                  "repeats": repeats},
      "memory": {**knn_shape, **pyramid, "kinds": _MEMORY_KINDS.value,
                 "scales": _ints(_MEMORY_SCALES.value), "rows": _MEMORY_ROWS.value,
                 "k_images": _MEMORY_K.value, "train_images": _MEMORY_TRAIN.value,
                 "tile_images": _MEMORY_TILE_IMAGES.value,
                 "tile_size": _MEMORY_TILE_SIZE.value,
                 "tile_overlap": _MEMORY_TILE_OVERLAP.value},
      "precision": {**knn_shape, "gallery": _PRECISION_GALLERY.value,
                    "k": _PRECISION_K.value, "repeats": repeats,
                    "recall_target": _RECALL_TARGET.value},
      "pipeline": {"backbone": _PIPELINE_BACKBONE.value, "methods": _PIPELINE_METHODS.value,
                   "num_train": _PIPELINE_TRAIN.value, "num_test": _PIPELINE_TEST.value,
                   "image_size": _IMAGE_SIZE.value, "k_images": _PIPELINE_K.value,
                   "batch_size": _BACKBONE_BATCH.value, "repeats": _PIPELINE_REPEATS.value,
                   "cache_images": _PIPELINE_CACHE.value},
  }
  every["coreset"] = {
      "ns": _ints(_CORESET_NS.value), "dim": _CORESET_DIM.value, "size": _CORESET_SIZE.value,
      "projection_dim": None, "profiles": _CORESET_PROFILES.value,
      "train_images": _CORESET_TRAIN.value, "k_images": _PIXEL_K.value,
      "num_test": _CORESET_TEST.value, "repeats": repeats,
      "sharded_devices": _CORESET_DEVICES.value, "sharded_n": _CORESET_SHARDED_N.value,
      "grid": _PIXEL_GRID.value, "image_size": _IMAGE_SIZE.value,
      "precision_ns": _ints(_CORESET_PRECISION_NS.value),
      "precision_size": _CORESET_PRECISION_SIZE.value, "parts": _CORESET_PARTS.value,
      "prune_sources": _CORESET_PRUNE_SOURCES.value,
      "prune_train_images": _CORESET_PRUNE_TRAIN.value}
  every["kernels"] = {"names": _KERNELS.value, "grid": _PIXEL_GRID.value,
                      "channels": _ints(_KERNELS_CHANNELS.value), "k_images": _KERNELS_K.value,
                      "num_test": 1, "knn_level": 0, "repeats": repeats,
                      "image_size": _IMAGE_SIZE.value}
  every["end_to_end"] = {"category": _E2E_CATEGORY.value, "torch_python": _E2E_TORCH.value,
                         "anomalib_python": _E2E_ANOMALIB.value,
                         "anomalib_script": _E2E_ANOMALIB_SCRIPT.value}
  unknown = sorted(set(_SECTIONS.value) - set(every))
  if unknown:
    raise app.UsageError(f"unknown --sections {unknown}; valid: {', '.join(every)}")
  return {name: every[name] for name in _SECTIONS.value}


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  kwargs = section_kwargs()
  detector_flags.enable_compilation_cache(_CACHE_DIR, "benchmark.py")
  cache = detector_flags.compilation_cache_note()
  results = suite.run_suite(kwargs)
  results["machine"]["compilation_cache"] = cache
  table = suite.markdown(results) + f"\nJAX compilation cache of this run: {cache}.\n"
  print(table)
  json_path = pathlib.Path(_OUTPUT_JSON.value)
  json_path.parent.mkdir(parents=True, exist_ok=True)
  json_path.write_text(json.dumps(results, indent=1) + "\n")
  print(f"wrote {_OUTPUT_JSON.value}")
  if _OUTPUT_MD.value:
    pathlib.Path(_OUTPUT_MD.value).write_text(table)
    print(f"wrote {_OUTPUT_MD.value}")


if __name__ == "__main__":
  app.run(main)
