r"""Evaluates SPADE on data in the MVTec AD layout (default: the built-in benchmark).

  python experiments/evaluate.py                      # built-in benchmark, efficientnet_lite0
  python experiments/evaluate.py --benchmark=builtin_hard  # its hard variant: faint defects
  python experiments/evaluate.py --benchmark=builtin_hard --benchmark_seed=1  # another draw
  python experiments/evaluate.py --data_dir=/data/mvtec_anomaly_detection \
      --backbone=wide_resnet50_2 --output_dir=results/mvtec_wrn50

Writes <output_dir>/results.json, heatmaps/<category>/*.png and prints a Markdown
table. A rerun with the same flags skips finished categories.

Kernelized SPADE: --metric names a fixed distance (l2, sqeuclidean, cosine) or a kernel
fitted per layer on each category's training images (mahalanobis, learned, linear, rbf,
laplacian, polynomial, rff, nystrom), and --aggregate=mean|softmin|kde (with
--bandwidth, default the median heuristic) how the nearest distances become a score,
e.g.

  python experiments/evaluate.py --metric=mahalanobis --aggregate=softmin \
      --output_dir=results/builtin_mahalanobis_softmin

results.json's "config" records metric, aggregate and bandwidth (a file written
before they existed resumes as "mean"). --method=patchcore takes the same metrics and
kernels (one kernel fitted on the training patches, the coreset selected in its space)
but not --aggregate / --bandwidth (its patch score is the nearest bank entry's
distance); --method=padim (PaDiM: --num_features, --feature_seed, --regularization,
--epsilon) has no metric (Mahalanobis distances to per-position Gaussians), and its
"config" records its own settings instead. --method=ensemble fuses several detectors
(README "Ensembles"): --ensemble_members=METHOD:METRIC:BACKBONE[:LAYERS],... (default:
the README's choice for faint defects), --ensemble_combine=mean|max,
--ensemble_statistics=mean_std|median_mad, --ensemble_folds; "config" records the
members and these settings.

Geometry: by default the MVTec protocol (--resize=256 --crop=224: the centre crop, and
the masks cropped alike), so the tables compare with the papers'. --crop=none inspects
the whole image instead: each category's images are resized to one input size
(--image_size=H,W, or the first training image's with its shorter side at --resize),
and the pixel metrics (pixel AUROC, AU-PRO) are computed at that input resolution, the
masks resized to it (nearest): the same common resolution for every method.
results.json's "config" then records "crop": null and "image_size". --tile_size=T
(--tile_overlap, --tile_merge) fits and scores native-resolution tiles instead (see
fit.py), with the pixel metrics at the masks' own resolution, on one process or several.

Several processes (jax.distributed; each reads its share of the images, process 0
writes the results), e.g. two CPU processes on this machine:

  python experiments/evaluate.py --coordinator_address=127.0.0.1:23456 \
      --num_processes=2 --process_id=0 --num_cpu_devices=2 &
  python experiments/evaluate.py --coordinator_address=127.0.0.1:23456 \
      --num_processes=2 --process_id=1 --num_cpu_devices=2

The detector's flags (--backbone, --k_images, ...) are shared with fit.py and
predict.py (detector_flags.py). Compiled programs are kept in JAX's persistent
compilation cache, so a rerun with the same shapes starts without compiling:
--compilation_cache_dir (default $SPADE_JAX_CACHE/jax_compilation_cache; 'none': off).
Progress lines (images done / total, rate, time left) go to the log; results.json
records per category the seconds of each stage (backbone, search, maps, metrics).
"""

from collections.abc import Sequence
import sys

from absl import app, flags, logging
import detector_flags

from spade_jax import evaluation
from spade_jax.host import distributed

_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Folder in MVTec AD layout. Default: the built-in benchmark, "
    "generated into $SPADE_JAX_CACHE (~/.cache/spade_jax) on first use.")
_BENCHMARKS = ("builtin", "builtin_hard")  # spade_jax.data.builtin.BENCHMARKS
_BENCHMARK = flags.DEFINE_string(
    "benchmark", None, "Without --data_dir: the built-in benchmark to use, builtin "
    "(default) or builtin_hard (the same images with smaller, fainter defects), each "
    "generated into its own folder of $SPADE_JAX_CACHE on first use.")
_BENCHMARK_SEED = flags.DEFINE_integer(
    "benchmark_seed", 0, "Without --data_dir: the built-in benchmark's seed (0: the "
    "README's; another seed draws other views and defects into its own cache folder, "
    "to see how much a figure owes to one draw).")
_CATEGORIES = flags.DEFINE_list("categories", None, "Categories to evaluate (default: all found).")
_DETECTOR = detector_flags.define_detector_flags()
_CACHE_DIR = detector_flags.define_compilation_cache_flag()
flags.adopt_module_key_flags(detector_flags)  # --help lists them with this script's.
_NUM_HEATMAPS = flags.DEFINE_integer("num_heatmaps", 4, "Heatmap PNGs per category.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "results/builtin", "Where results go "
                                  "(default: results/<benchmark>, e.g. results/builtin_hard).")
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
  settings = _DETECTOR.settings()
  batch_size = _DETECTOR.batch_size.value
  try:
    # Settings first: a bad flag fails at once, before JAX, data or output are touched.
    detector_flags.check_method_flags(_DETECTOR.method.value, _DETECTOR.given())
    tiles = _DETECTOR.tiles()
    if tiles is not None:  # Native-resolution tiles: no crop.
      settings.update(crop=None, tile_size=tiles.tile_size, tile_overlap=tiles.tile_overlap,
                      tile_merge=tiles.merge, tile_position_weight=tiles.position_weight)
    evaluation.EvalConfig(data_dir=_DATA_DIR.value or "", **settings)
    benchmark = _BENCHMARK.value or "builtin"
    if _BENCHMARK.value is not None and _DATA_DIR.value is not None:
      raise ValueError("--benchmark and --data_dir exclude each other (--benchmark picks "
                       "a built-in benchmark, used only without --data_dir)")
    if _BENCHMARK_SEED.present and _DATA_DIR.value is not None:
      raise ValueError("--benchmark_seed and --data_dir exclude each other (the seed is "
                       "the built-in benchmark's)")
    if _BENCHMARK_SEED.value < 0:
      raise ValueError(f"--benchmark_seed must be >= 0, got {_BENCHMARK_SEED.value}")
    if benchmark not in _BENCHMARKS:
      raise ValueError(f"--benchmark must be one of {', '.join(_BENCHMARKS)}, got "
                       f"{benchmark!r}")
    seed_suffix = f"_seed{_BENCHMARK_SEED.value}" if _BENCHMARK_SEED.value else ""
    output_dir = (_OUTPUT_DIR.value if _OUTPUT_DIR.present
                  else f"results/{benchmark}{seed_suffix}")
    if batch_size < 1:
      raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    ids = _LOCAL_DEVICE_IDS.value
    dist = distributed.DistributedConfig(
        coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value, num_cpu_devices=_NUM_CPU_DEVICES.value,
        local_device_ids=None if ids is None else tuple(int(i) for i in ids))
  except ValueError as e:
    sys.exit(f"evaluate.py: error: {e}")
  detector_flags.enable_compilation_cache(_CACHE_DIR, "evaluate.py")
  distributed.initialize(dist)  # Before JAX starts its backends.
  mesh = None
  if _SHARD.value and not dist.enabled:
    import jax  # pylint: disable=import-outside-toplevel
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
  try:
    data_dir = _DATA_DIR.value
    if data_dir is None:
      if not dist.enabled or dist.process_id == 0:
        evaluation.check_output_dir(output_dir)  # Before generating the data.
      from spade_jax.data import builtin  # pylint: disable=import-outside-toplevel
      data_dir = str(builtin.builtin_benchmark_dir(builtin.BENCHMARKS[benchmark],
                                                   seed=_BENCHMARK_SEED.value))
    config = evaluation.EvalConfig(data_dir=data_dir, **settings)
    results = evaluation.evaluate(
        config, output_dir=output_dir, categories=_CATEGORIES.value,
        batch_size=batch_size, num_heatmaps=_NUM_HEATMAPS.value, mesh=mesh,
        log=logging.info)
  except (ValueError, OSError) as e:  # Bad input: a message, not a traceback.
    sys.exit(f"evaluate.py: error: {e}")
  if dist.enabled and dist.process_id != 0:
    return  # Process 0 reports.
  print(evaluation.format_table(results))
  print(f"\nresults: {output_dir}/{evaluation.RESULTS_FILE}")


if __name__ == "__main__":
  app.run(main)
