r"""Evaluates SPADE on data in the MVTec AD layout (default: the built-in benchmark).

  python experiments/evaluate.py                      # built-in benchmark, efficientnet_lite0
  python experiments/evaluate.py --data_dir=/data/mvtec_anomaly_detection \
      --backbone=wide_resnet50_2 --output_dir=results/mvtec_wrn50

Writes <output_dir>/results.json, heatmaps/<category>/*.png and prints a Markdown
table. A rerun with the same flags skips finished categories.

Several processes (jax.distributed; each reads its share of the images, process 0
writes the results), e.g. two CPU processes on this machine:

  python experiments/evaluate.py --coordinator_address=127.0.0.1:23456 \
      --num_processes=2 --process_id=0 --num_cpu_devices=2 &
  python experiments/evaluate.py --coordinator_address=127.0.0.1:23456 \
      --num_processes=2 --process_id=1 --num_cpu_devices=2
"""

from collections.abc import Sequence
import sys

from absl import app, flags, logging

from spade_jax import evaluation
from spade_jax.features.backbones import BACKBONES
from spade_jax.host import distributed

_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Folder in MVTec AD layout. Default: the built-in benchmark, "
    "generated into $SPADE_JAX_CACHE (~/.cache/spade_jax) on first use.")
_CATEGORIES = flags.DEFINE_list("categories", None, "Categories to evaluate (default: all found).")
_BACKBONE = flags.DEFINE_enum(
    "backbone", "efficientnet_lite0", list(BACKBONES),
    "Feature extractor; wide_resnet50_2 reproduces the paper.")
_WEIGHTS = flags.DEFINE_string(
    "weights", "imagenet", "'imagenet' (cached standard file), a .pth / converted file path, "
    "or 'none' for random weights.")
_DEFAULT = evaluation.EvalConfig(data_dir="")
_K_IMAGES = flags.DEFINE_integer(
    "k_images", _DEFAULT.k_images, "K: nearest normal images forming the pixel gallery.")
_K_IMAGE_SCORE = flags.DEFINE_integer(
    "k_image_score", _DEFAULT.k_image_score, "k of the image-level kNN score.")
_KAPPA = flags.DEFINE_integer("kappa", _DEFAULT.kappa, "kappa: nearest gallery features per pixel.")
_LAYERS = flags.DEFINE_list("layers", list(_DEFAULT.layers), "Pyramid levels.")
_COMBINE = flags.DEFINE_enum("combine", _DEFAULT.combine, ["ensemble", "cat"],
                             "How levels combine.")
_METRIC = flags.DEFINE_string("metric", _DEFAULT.metric, "Distance kernel (spade_jax.METRICS).")
_SIGMA = flags.DEFINE_float("sigma", _DEFAULT.sigma, "Gaussian smoothing of the anomaly maps.")
_RESIZE = flags.DEFINE_integer("resize", _DEFAULT.resize, "Shorter side is resized to this.")
_CROP = flags.DEFINE_integer("crop", _DEFAULT.crop, "Centre crop size.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Images per backbone call.")
_NUM_HEATMAPS = flags.DEFINE_integer("num_heatmaps", 4, "Heatmap PNGs per category.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "results/builtin", "Where results go.")
_SHARD = flags.DEFINE_bool("shard", False, "One process: shard the galleries over all "
                           "local devices (1-D mesh 'data'). Several processes always do.")
# jax.distributed.initialize (all three together, or none: a single process).
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0's coordinator.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process, in [0, num_processes).")
_LOCAL_DEVICE_IDS = flags.DEFINE_list("local_device_ids", None,
                                      "Accelerator ids this process uses (default: all).")
_NUM_CPU_DEVICES = flags.DEFINE_integer("num_cpu_devices", None,
                                        "CPU devices per process (CPU runs).")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  weights = None if _WEIGHTS.value.lower() == "none" else _WEIGHTS.value
  settings = {
      "backbone": _BACKBONE.value, "weights": weights, "k_images": _K_IMAGES.value,
      "k_image_score": _K_IMAGE_SCORE.value, "kappa": _KAPPA.value,
      "layers": tuple(_LAYERS.value), "combine": _COMBINE.value, "sigma": _SIGMA.value,
      "metric": _METRIC.value, "resize": _RESIZE.value, "crop": _CROP.value}
  try:
    # Settings first: a bad flag fails at once, before JAX, data or output are touched.
    evaluation.EvalConfig(data_dir=_DATA_DIR.value or "", **settings)
    if _BATCH_SIZE.value < 1:
      raise ValueError(f"--batch_size must be >= 1, got {_BATCH_SIZE.value}")
    ids = _LOCAL_DEVICE_IDS.value
    dist = distributed.DistributedConfig(
        coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value, num_cpu_devices=_NUM_CPU_DEVICES.value,
        local_device_ids=None if ids is None else tuple(int(i) for i in ids))
  except ValueError as e:
    sys.exit(f"evaluate.py: error: {e}")
  distributed.initialize(dist)  # Before JAX starts its backends.
  mesh = None
  if _SHARD.value and not dist.enabled:
    import jax  # pylint: disable=import-outside-toplevel
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
  try:
    data_dir = _DATA_DIR.value
    if data_dir is None:
      if not dist.enabled or dist.process_id == 0:
        evaluation.check_output_dir(_OUTPUT_DIR.value)  # Before generating the data.
      from spade_jax.data import builtin  # pylint: disable=import-outside-toplevel
      data_dir = str(builtin.builtin_benchmark_dir())
    config = evaluation.EvalConfig(data_dir=data_dir, **settings)
    results = evaluation.evaluate(
        config, output_dir=_OUTPUT_DIR.value, categories=_CATEGORIES.value,
        batch_size=_BATCH_SIZE.value, num_heatmaps=_NUM_HEATMAPS.value, mesh=mesh,
        log=logging.info)
  except (ValueError, OSError) as e:  # Bad input: a message, not a traceback.
    sys.exit(f"evaluate.py: error: {e}")
  if dist.enabled and dist.process_id != 0:
    return  # Process 0 reports.
  print(evaluation.format_table(results))
  print(f"\nresults: {_OUTPUT_DIR.value}/{evaluation.RESULTS_FILE}")


if __name__ == "__main__":
  app.run(main)
