"""The MVTec-style evaluation loop behind experiments/evaluate.py.

Host-side orchestration only: read a category, fit the detector (SPADE, PatchCore or
PaDiM: the same fit / score interface) on its normal training images, score its test
images, compute the official metrics, write heatmaps and results.json. The script that
calls this stays a thin flags -> kwargs layer.
The settings and the checks made before any work are in config.py, results.json's
layout and its merge-on-write in results.py.

Several processes (after distributed.initialize): process p reads the training and
test images p::P of a category and computes their features; the training features
form one gallery sharded over every device of every process (a 1-D mesh "data"); the
test features, masks and labels are gathered on every process, which all score every
test image through the sharded search (the collectives need them all). PaDiM's
training embeddings are gathered too: its Gaussians need every image at each
position, and the mesh splits the positions instead. Process 0 alone writes
results.json and the heatmaps. With tiles (--tile_size) each process cuts its share of
the images into tiles; the gallery is all processes' training tiles, and the test
tiles' features are gathered image by image (an image's tiles stay together), so every
process scores and stitches every test image as one process would.

"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import contextlib
import os
import pathlib
import time
from typing import Any

import numpy as np

from spade_jax.detector import common, tiling
from spade_jax.detector.padim import Padim
from spade_jax.evaluation import config as config_lib
from spade_jax.evaluation import results as results_lib
from spade_jax.evaluation.config import EvalConfig
from spade_jax.host import progress


def _heatmap_indices(labels: np.ndarray, defects: Sequence[str], count: int) -> list[int]:
  """A few test images to draw: one per defect type first, then more anomalies, then good."""
  chosen, seen = [], set()
  for i, (label, defect) in enumerate(zip(labels, defects)):
    if label and defect not in seen:
      chosen.append(i)
      seen.add(defect)
  rest = [i for i in np.argsort(-labels, kind="stable") if i not in chosen]
  return (chosen + [int(i) for i in rest])[:count]


def _category_result(scores: np.ndarray, maps: np.ndarray, masks: np.ndarray,
                     labels: np.ndarray, n_train: int) -> dict[str, Any]:
  """The metrics of one category (host NumPy), timed as the stage "metrics"."""
  from spade_jax.evaluation import metrics  # pylint: disable=import-outside-toplevel
  with progress.stage("metrics"):
    return {
        "image_auroc": float(metrics.image_auroc(labels, scores)),
        "pixel_auroc": float(metrics.pixel_auroc(masks, maps)),
        "au_pro": float(metrics.au_pro(masks, maps)),
        "n_train": int(n_train),
        "n_test": int(len(labels)),
    }


def _finish(result: dict[str, Any], start: float, stages: dict[str, float]) -> dict[str, Any]:
  """result with its "seconds" (all of the category) and "stage_seconds"."""
  result["seconds"] = float(time.perf_counter() - start)
  result["stage_seconds"] = progress.stage_totals(stages, results_lib.STAGE_NAMES)
  return result


def _write_heatmaps(heatmap_dir: pathlib.Path | None, num_heatmaps: int,
                    images_of: Callable[[list[int]], np.ndarray], labels: np.ndarray,
                    defects: Sequence[str], paths: Sequence[str], masks: np.ndarray,
                    maps: np.ndarray, *, resize: int, crop: int | None,
                    image_size: tuple[int, int] | None = None) -> None:
  """A few heatmap PNGs; images_of(indices) -> those test images [n, H, W, 3] uint8."""
  from spade_jax.evaluation import heatmaps  # pylint: disable=import-outside-toplevel
  if heatmap_dir is None or num_heatmaps <= 0:
    return
  heatmap_dir.mkdir(parents=True, exist_ok=True)
  picks = _heatmap_indices(labels, defects, num_heatmaps)
  views = heatmaps.model_view(images_of(picks), resize=resize, crop=crop,
                              image_size=image_size)
  vmax = float(np.max(maps))
  vmin = float(np.min(maps))
  for view, i in zip(views, picks):
    name = pathlib.Path(paths[i]).with_suffix("").as_posix().replace("/", "_")
    heatmaps.save_heatmap_png(heatmap_dir / f"{name}.png", view, masks[i], maps[i],
                               vmin=vmin, vmax=vmax)


def evaluate_category(spade, category_data, *, crop: int | None, resize: int,
                      heatmap_dir: pathlib.Path | None, num_heatmaps: int,
                      log: Callable[[str], None], mesh=None,
                      tiles: tiling.TileConfig | None = None) -> dict[str, Any]:
  """Fits on one category's normal images, scores its test set, returns its metrics.

  crop=None: the whole images at one input size (the detector's image_size, else the
  first training image's, aspect kept), masks resized to it. tiles: native-resolution
  tiles (detector.tiling), the metrics at the masks' own resolution.

  The result also holds the seconds of the whole category ("seconds") and of each
  stage ("stage_seconds": backbone, search, maps, metrics; see results.py).
  """
  from spade_jax.features.preprocessing import preprocess_masks  # pylint: disable=import-outside-toplevel
  start = time.perf_counter()
  data = category_data
  if tiles is not None:  # Native-resolution tiles; metrics at the masks' own resolution.
    spade = tiling.Tiled(spade, tiles)
    resize = crop = image_size = None
  else:
    spade = common.with_whole_image_size(spade, *np.shape(data.train_images[0])[:2])
    # An Ensemble's maps are at its first member's size (Ensemble.output_size).
    image_size = getattr(spade, "members", (spade,))[0].config.image_size
  masks = preprocess_masks(data.test_masks, resize=resize, crop=crop, image_size=image_size)
  config_lib.check_masks(data.category, masks)  # Before the expensive part.
  with progress.record_stages() as stages:
    log(f"  fit on {len(data.train_images)} normal images")
    with progress.stage("fit"):
      index = spade.fit(data.train_images) if mesh is None else spade.fit(data.train_images,
                                                                            mesh=mesh)
    log(f"  score {len(data.test_images)} test images")
    with progress.stage("score"):
      scores, maps = spade.score(index, data.test_images)
    maps = np.stack(maps)  # Tiled: a list of maps at the images' (equal) size.
    labels = np.asarray(data.test_labels)
    result = _category_result(scores, maps, masks, labels, len(data.train_images))
  _write_heatmaps(heatmap_dir, num_heatmaps, lambda picks: data.test_images[picks], labels,
                  data.test_defects, data.test_paths, masks, maps, resize=resize, crop=crop,
                  image_size=image_size)
  return _finish(result, start, stages)


def evaluate_category_multiprocess(spade, data_dir: pathlib.Path, name: str, mesh, *,
                                   crop: int | None, resize: int,
                                   heatmap_dir: pathlib.Path | None, num_heatmaps: int,
                                   log: Callable[[str], None],
                                   tiles: tiling.TileConfig | None = None) -> dict[str, Any]:
  """evaluate_category as one of several processes; every process returns the result.

  Process p reads the images p::P; see the module docstring for the data flow. tiles:
  each process cuts its images into tiles (their features gathered image by image, all
  of an image's tiles together, as one process lists them), the gallery is every
  process's training tiles, and every process stitches every test image's tile maps
  (image score: the max over its tiles), as evaluate_category with tiles.
  """
  import jax  # pylint: disable=import-outside-toplevel

  from spade_jax.data import mvtec  # pylint: disable=import-outside-toplevel
  from spade_jax.features.preprocessing import preprocess_masks  # pylint: disable=import-outside-toplevel
  from spade_jax.host import distributed  # pylint: disable=import-outside-toplevel
  start = time.perf_counter()
  files = mvtec.scan_category(data_dir, name)
  _, count = distributed.process_index_and_count()
  if min(len(files.train), len(files.test)) < count:
    raise ValueError(f"{name}: {len(files.train)} train / {len(files.test)} test images "
                     f"cannot be shared by {count} processes (need >= 1 each)")
  train_files, test_items = distributed.share(files.train), distributed.share(files.test)
  tiled = None if tiles is None else tiling.Tiled(spade, tiles)
  if tiled is not None:  # Native-resolution tiles; metrics at the masks' own resolution.
    spade, resize, crop = tiled.detector, None, None

  def extract(images: np.ndarray, what: str):
    """(features: extract's output, tiles per image: None without tiles)."""
    if tiled is None:
      return spade.extract(images), None
    features, counts = tiled.extract(images)
    if len(set(counts)) != 1:
      raise ValueError(f"{name} {what}: images of several sizes (tiles per image "
                       f"{sorted(set(counts))}); a category's images share one size")
    return features, counts[0]

  def gather(features, total: int, per_image: int | None):
    """Every process's rows of images in image order (tiles: an image's rows together)."""
    if per_image is None:
      return jax.tree.map(lambda v: distributed.gather_shares(v, total), features)
    return jax.tree.map(
        lambda v: distributed.gather_shares(
            v.reshape((-1, per_image) + v.shape[1:]), total).reshape((-1,) + v.shape[1:]),
        features)

  with progress.record_stages() as stages:
    log(f"  fit on {len(files.train)} normal images ({len(train_files)} read here)")
    with progress.stage("fit"):
      train = mvtec.stack_split([mvtec.read_rgb(f) for f in train_files],
                                [files.relative(f) for f in train_files], f"{name} train")
      if tiled is None:
        # Every process reads its own first image: the category's images share one size.
        spade = common.with_whole_image_size(spade, *train.shape[1:3])
      image_size = None if tiled is not None else spade.config.image_size
      features, per_train = extract(train, "train")
      if _fits_on_all_images(spade):  # Every process fits on all the training embeddings.
        index = spade.fit_features(gather(features, len(files.train), per_train), mesh=mesh)
      else:
        index = spade.fit_features(*_feature_args(features), mesh=mesh, process_local=True)
    log(f"  score {len(files.test)} test images ({len(test_items)} read here)")
    with progress.stage("score"):
      examples = [mvtec.read_test_example(item) for item in test_items]
      test_paths = [files.relative(item.path) for item in test_items]
      test = mvtec.stack_split([image for image, _ in examples], test_paths, f"{name} test")
      local_masks = mvtec.stack_split([mask for _, mask in examples], test_paths,
                                      f"{name} test masks")
      n_test = len(files.test)
      local_features, per_test = extract(test, "test")
      features = gather(local_features, n_test, per_test)
      masks = distributed.gather_shares(preprocess_masks(local_masks, resize=resize, crop=crop,
                                                         image_size=image_size), n_test)
      config_lib.check_masks(name, masks)
      scores, maps = spade.score_features(index, *_feature_args(features))
      if tiled is not None:  # Every test image's tiles, stitched at the image's size.
        scores, maps = tiled.assemble(scores, maps, [test.shape[1:3]] * n_test)
        maps = np.stack(maps)
    labels = np.array([int(t.defect != mvtec.GOOD) for t in files.test], np.int32)
    result = _category_result(scores, maps, masks, labels, len(files.train))
  if jax_process_index() == 0:
    all_paths = [files.relative(t.path) for t in files.test]
    _write_heatmaps(
        heatmap_dir, num_heatmaps,
        lambda picks: np.stack([mvtec.read_test_example(files.test[i])[0] for i in picks]),
        labels, [t.defect for t in files.test], all_paths, masks, maps, resize=resize,
        crop=crop, image_size=image_size)
  return _finish(result, start, stages)


def _fits_on_all_images(detector) -> bool:
  """PaDiM: a Gaussian per position over every training image, its positions (not its
  images) split over the mesh, so each process needs all the embeddings."""
  return isinstance(detector, Padim)


def _feature_args(features) -> tuple:
  """A detector's extract() output as the arguments of its fit_features / score_features:
  Spade's (pool, {level: features}), or PatchCore's patch features (PaDiM's embeddings)
  alone."""
  return features if isinstance(features, tuple) else (features,)


def jax_process_index() -> int:
  """This process's index (0 without jax.distributed)."""
  import jax  # pylint: disable=import-outside-toplevel
  return jax.process_index()


def _categories_done(results: dict[str, Any] | None, todo: Sequence[str]) -> list[bool]:
  """Which of `todo` process 0's results.json already has, on every process.

  Raises:
    ValueError: on processes > 0 when process 0 could not read its results.json.
  """
  from spade_jax.host import distributed  # pylint: disable=import-outside-toplevel
  flags = np.zeros(len(todo) + 1, np.int32)
  if results is not None:
    flags[0] = 1
    flags[1:] = [name in results["categories"] for name in todo]
  flags = distributed.broadcast_from_first(flags)
  if not flags[0]:
    raise ValueError("process 0 refused its output_dir (see its error)")
  return [bool(f) for f in flags[1:]]


def evaluate(config: EvalConfig, *, output_dir: str | os.PathLike[str],
             categories: Sequence[str] | None = None, batch_size: int = 8,
             num_heatmaps: int = 4, mesh=None,
             log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs SPADE on every category of config.data_dir and writes results.json.

  Everything is checked before the first backbone call: the settings, every
  category's files (scan_category; both normal and anomalous test images; at least
  k_images training images), the output folder (created and written to) and an
  existing results.json (layout and config). Runs sharing output_dir merge their
  categories into its results.json (see the module docstring).

  Args:
    config: what determines the numbers (data, backbone, SPADE settings).
    output_dir: where results.json and heatmaps/<category>/*.png go (created).
    categories: names to evaluate; None means every category found.
    batch_size: images per backbone call (does not change the numbers).
    num_heatmaps: heatmap PNGs per category.
    mesh: optional jax.sharding.Mesh with an axis "data" for sharded galleries (see
      Spade.fit). Several processes (jax.distributed initialised): None means a 1-D
      mesh "data" over every device of every process.
    log: progress sink.

  Returns:
    The results dict as in <output_dir>/results.json when the run ends, i.e. with the
    categories of any other run sharing output_dir (several processes: process 0
    writes it and returns it; the others return the categories they ran).

  Raises:
    ValueError: a bad setting, category, data file, output_dir or results.json (the
      message names it and the fix). FileNotFoundError: missing data.
  """
  # Imports here keep `--help` and config errors fast.
  import jax  # pylint: disable=import-outside-toplevel

  from spade_jax.data import mvtec  # pylint: disable=import-outside-toplevel

  config.detector_config(batch_size)  # Checks batch_size.
  multiprocess = jax.process_count() > 1
  if multiprocess and config.method == "ensemble":
    raise ValueError("method 'ensemble' is not supported with several processes yet "
                     "(run one process; --shard spreads its members over the devices)")
  writer = jax.process_index() == 0
  data_dir = pathlib.Path(config.data_dir)
  found = mvtec.list_categories(data_dir)
  if categories:
    unknown = sorted(set(categories) - set(found))
    if unknown:
      raise ValueError(f"categories {unknown} are not in {data_dir}; found {found}")
    todo = list(dict.fromkeys(categories))
  else:
    todo = found
  for name in todo:  # Listing only (no image decoded): missing masks, labels, counts.
    files = mvtec.scan_category(data_dir, name)
    config_lib.check_test_labels(name, [t.defect != mvtec.GOOD for t in files.test],
                                 len(files.train),
                      config)
  out = pathlib.Path(output_dir)
  config_json = results_lib.recorded_config(config, None)
  results = results_lib.fresh_results(config_json)
  store = None
  if writer:
    try:
      store = results_lib.ResultsFile(results_lib.check_output_dir(out), config_json)
      results_lib.check_heatmaps_dir(out, num_heatmaps)
      store.read()  # A foreign results.json or another config: refused now.
    except ValueError:
      if multiprocess:
        _categories_done(None, todo)  # Tell the other processes, then fail here too.
      raise
  spade = config.make_detector(batch_size)
  if store is not None:
    try:
      results = store.claim()  # Under the lock: a concurrent run's config is refused here.
    except ValueError:
      if multiprocess:
        _categories_done(None, todo)
      raise
  done = _categories_done(results, todo) if multiprocess else [
      name in results["categories"] for name in todo]
  if multiprocess and mesh is None:
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
  try:
    for n, name in enumerate(todo, 1):
      if not done[n - 1] and store is not None and not multiprocess:
        done[n - 1] = name in store.read()["categories"]  # Another run finished it?
      if done[n - 1]:
        log(f"[{n}/{len(todo)}] {name}: already in {out / results_lib.RESULTS_FILE}, skipped")
        continue
      log(f"[{n}/{len(todo)}] {name}: loading")
      heatmap_dir = out / "heatmaps" / name
      if multiprocess:
        result = evaluate_category_multiprocess(
            spade, data_dir, name, mesh, crop=config.crop, resize=config.resize,
            heatmap_dir=heatmap_dir, num_heatmaps=num_heatmaps, log=log, tiles=config.tiles)
      else:
        data = mvtec.load_category(data_dir, name)
        kwargs = {} if mesh is None else {"mesh": mesh}
        result = evaluate_category(spade, data, crop=config.crop, resize=config.resize,
                                   heatmap_dir=heatmap_dir, num_heatmaps=num_heatmaps,
                                   log=log, tiles=config.tiles, **kwargs)
      if store is not None:
        results = store.merge(name, result)
      else:
        results["categories"][name] = result
        results["mean"] = results_lib.mean_metrics(results["categories"])
      stages = "".join(f", {k} {v:.1f} s" for k, v in result.get("stage_seconds", {}).items())
      log(f"[{n}/{len(todo)}] {name}: image AUROC {result['image_auroc']:.3f}, pixel "
          f"AUROC {result['pixel_auroc']:.3f}, AU-PRO {result['au_pro']:.3f} "
          f"({result['seconds']:.1f} s{stages})")
  except BaseException:
    if store is not None:
      with contextlib.suppress(Exception):
        store.release()
    raise
  return results if store is None else store.read()


def evaluate_loaded(config: EvalConfig, datasets: Mapping[str, Any], *,
                    output_dir: str | os.PathLike[str], batch_size: int = 8,
                    num_heatmaps: int = 4, mesh=None, log: Callable[[str], None] = print,
                    extra_config: dict[str, Any] | None = None) -> dict[str, Any]:
  """evaluate() for data sets already read (e.g. STC), in one process.

  Checks as evaluate() does (labels, output_dir, results.json) before any backbone
  call, and merges into a shared results.json the same way. A script that reads a
  large data set first should call results_lib.check_output_dir and load_results before reading
  it, so these errors come before the reading too.

  Args:
    config: the settings; config.data_dir is only recorded.
    datasets: name -> spade_jax.data.mvtec.CategoryData.
    output_dir, batch_size, num_heatmaps, mesh, log: as for evaluate().
    extra_config: further settings recorded in results.json's "config".

  Returns:
    The results dict, in evaluate()'s results.json layout (resumable the same way).

  Raises:
    ValueError: as evaluate().
  """
  config.detector_config(batch_size)  # Checks batch_size.
  for name, data in datasets.items():
    config_lib.check_test_labels(name, data.test_labels, len(data.train_images), config)
  out = pathlib.Path(output_dir)
  store = results_lib.ResultsFile(results_lib.check_output_dir(out),
                                  results_lib.recorded_config(config, extra_config))
  results_lib.check_heatmaps_dir(out, num_heatmaps)
  store.read()
  spade = config.make_detector(batch_size)
  store.claim()
  try:
    for name, data in datasets.items():
      if name in store.read()["categories"]:
        log(f"{name}: already in {out / results_lib.RESULTS_FILE}, skipped")
        continue
      result = evaluate_category(
          spade, data, crop=config.crop, resize=config.resize,
          heatmap_dir=out / "heatmaps" / name, num_heatmaps=num_heatmaps, log=log,
          tiles=config.tiles, **({} if mesh is None else {"mesh": mesh}))
      store.merge(name, result)
  except BaseException:
    with contextlib.suppress(Exception):
      store.release()
    raise
  return store.read()
