"""The MVTec-style evaluation loop behind experiments/evaluate.py.

Host-side orchestration only: read a category, fit SPADE on its normal training
images, score its test images, compute the official metrics, write heatmaps and
results.json. The script that calls this stays a thin flags -> kwargs layer.

results.json layout (a contract; fractions in [0, 1]):
  {"config": {...},
   "categories": {"<name>": {"image_auroc": f, "pixel_auroc": f, "au_pro": f,
                             "n_train": i, "n_test": i, "seconds": f}, ...},
   "mean": {"image_auroc": f, "pixel_auroc": f, "au_pro": f}}

A rerun with the same config skips the categories already in results.json, which
is rewritten atomically after every category, so an interrupted run loses at most
the category it was working on.

Several runs may share one output_dir (e.g. one per category, started at once): each
finished category is merged into results.json under an exclusive lock (fcntl.flock on
<output_dir>/.results.lock): re-read the file, add the category, write it atomically.
A run claims the folder for its config (writes a results.json without categories if
there is none) just before its first category, so a run with another config is
refused before it computes anything; a run that fails before any category is in the
file removes its claim again. Categories another run finished meanwhile are skipped,
and the results returned (and printed by the scripts) are the merged file's.

Everything a user can get wrong is checked before any expensive work: the settings
(EvalConfig), the data folder and each category's files (both normal and anomalous
test images, enough training images for k_images), the output folder (created and
written to), and an existing results.json (a JSON object in this layout, written
with this config).

Several processes (after distributed.initialize): process p reads the training and
test images p::P of a category and computes their features; the training features
form one gallery sharded over every device of every process (a 1-D mesh "data"); the
test features, masks and labels are gathered on every process, which all score every
test image through the sharded search (the collectives need them all). Process 0
alone writes results.json and the heatmaps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import numbers
import os
import pathlib
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from spade_jax import atomic
from spade_jax.detector import SpadeConfig

try:
  import fcntl
except ImportError:  # Not POSIX: runs sharing an output_dir are not serialised.
  fcntl = None

_DEFAULT = SpadeConfig()
METRIC_NAMES = ("image_auroc", "pixel_auroc", "au_pro")
RESULTS_FILE = "results.json"
LOCK_FILE = ".results.lock"
_ENTRY_FLOATS = (*METRIC_NAMES, "seconds")
_ENTRY_INTS = ("n_train", "n_test")


def _normalise_path(path: str | os.PathLike[str]) -> str:
  """`path` without trailing slashes, '.' parts or doubled slashes ('..' is kept)."""
  path = os.fspath(path)
  return str(pathlib.PurePath(path)) if path else path


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Everything that determines the numbers of an evaluation run.

  Validated on construction (SpadeConfig's checks, and sigma finite, >= 0 and at
  most crop, the anomaly map's side), so a bad setting fails before any work.
  data_dir is stored normalised (no trailing slash, no '.' parts), so equivalent
  spellings give equal configs.

  Raises:
    ValueError: a setting out of range (the message names it).
  """
  data_dir: str
  backbone: str = "efficientnet_lite0"
  weights: str | None = "imagenet"
  k_images: int = _DEFAULT.k_images
  k_image_score: int = _DEFAULT.k_image_score
  kappa: int = _DEFAULT.kappa
  layers: tuple[str, ...] = _DEFAULT.layers
  combine: str = _DEFAULT.combine
  sigma: float = _DEFAULT.sigma
  metric: str = _DEFAULT.metric
  resize: int = _DEFAULT.resize
  crop: int = _DEFAULT.crop

  def __post_init__(self):
    if not isinstance(self.data_dir, (str, os.PathLike)):
      raise ValueError(f"EvalConfig.data_dir must be a path, got {self.data_dir!r}")
    object.__setattr__(self, "data_dir", _normalise_path(self.data_dir))
    if isinstance(self.weights, os.PathLike):
      object.__setattr__(self, "weights", os.fspath(self.weights))
    if isinstance(self.layers, (list, tuple)):
      object.__setattr__(self, "layers", tuple(self.layers))
    sigma = self.sigma
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
      raise ValueError(f"EvalConfig.sigma must be a number, got {sigma!r}")
    if not math.isfinite(sigma) or sigma < 0:
      raise ValueError(f"EvalConfig.sigma must be finite and >= 0 (0: no blur), got {sigma!r}")
    if isinstance(self.crop, numbers.Real) and sigma > self.crop:
      raise ValueError(
          f"EvalConfig.sigma={sigma!r} is wider than the anomaly maps: it must be at most "
          f"crop={self.crop} pixels (a wider blur only flattens the maps)")
    self.spade_config(batch_size=1)  # SpadeConfig's checks (k's, layers, crop, ...).
    object.__setattr__(self, "sigma", float(sigma))

  def spade_config(self, batch_size: int) -> SpadeConfig:
    return SpadeConfig(k_images=self.k_images, k_image_score=self.k_image_score,
                       kappa=self.kappa, layers=tuple(self.layers), combine=self.combine,
                       sigma=self.sigma, metric=self.metric, resize=self.resize,
                       crop=self.crop, batch_size=batch_size)

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["layers"] = list(self.layers)
    return d


def _write_json_atomic(path: pathlib.Path, obj: Any) -> None:
  with atomic.atomic_path(path) as tmp:
    tmp.write_text(json.dumps(obj, indent=2) + "\n")


def mean_metrics(categories: dict[str, dict[str, Any]]) -> dict[str, float]:
  """Unweighted mean over categories, as in the paper's tables."""
  if not categories:
    return {}
  return {m: float(np.mean([c[m] for c in categories.values()])) for m in METRIC_NAMES}


def check_output_dir(output_dir: str | os.PathLike[str]) -> pathlib.Path:
  """Creates `output_dir` if needed and checks that files can be written in it.

  Really writes (and removes) a temporary file there, so a read-only folder, a full
  disk or a path through a file fails here, before any work, not after a category.

  Returns:
    The folder, as a pathlib.Path.

  Raises:
    ValueError: the folder cannot be created or written to (the message names it).
  """
  out = pathlib.Path(output_dir)
  fix = "choose another output_dir (--output_dir)"
  if out.exists() and not out.is_dir():
    raise ValueError(f"output_dir {str(out)!r} is a file, not a folder; {fix}")
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    why = (f"{str(blocker)!r} is a file, not a folder" if blocker is not None
           else e.strerror or str(e))
    raise ValueError(f"cannot create output_dir {str(out)!r}: {why}; {fix}") from e
  try:
    fd, probe = tempfile.mkstemp(dir=out, prefix=".write_test.")
    os.close(fd)
    os.unlink(probe)
  except OSError as e:
    raise ValueError(f"output_dir {str(out)!r} is not writable ({e.strerror or e}); "
                     f"{fix}") from e
  try:
    os.close(os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666))
  except OSError as e:
    raise ValueError(f"cannot open the lock file {str(out / LOCK_FILE)!r} "
                     f"({e.strerror or e}); move it away or {fix}") from e
  return out


def _check_heatmaps_dir(out: pathlib.Path, num_heatmaps: int) -> None:
  heatmaps = out / "heatmaps"
  if num_heatmaps > 0 and heatmaps.exists() and not heatmaps.is_dir():
    raise ValueError(f"{str(heatmaps)!r} is a file, but heatmaps go in a folder of that "
                     "name; move it away, pass --num_heatmaps=0 or choose another "
                     "output_dir (--output_dir)")


def _config_key(config_json: Mapping[str, Any]) -> dict[str, Any]:
  """A config as compared: equivalent data_dir spellings ('data/', './data', an absolute
  path to the same folder) compare equal, also in files written before they were
  normalised."""
  key = dict(config_json)
  data_dir = key.get("data_dir")
  if isinstance(data_dir, str) and data_dir:
    key["data_dir"] = os.path.realpath(data_dir)
  return key


def _is_real(value: Any) -> bool:
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value))


def _validate_results(results: Any, path: pathlib.Path,
                      config_json: Mapping[str, Any]) -> dict[str, Any]:
  """results.json's content checked against the layout and this run's config.

  Returns:
    The results with "mean" recomputed from "categories".

  Raises:
    ValueError: not in the layout, or written with another config (names the file).
  """
  def bad(why: str) -> ValueError:
    return ValueError(
        f"{path} is not a spade_jax results file: {why}. Move it away (or delete it) to "
        "start over, or choose another output_dir (--output_dir)")

  if not isinstance(results, dict):
    raise bad(f"expected a JSON object, found {type(results).__name__} "
              f"{json.dumps(results)[:60]}")
  if not isinstance(results.get("config"), dict):
    raise bad('its "config" is missing or not an object')
  if _config_key(results["config"]) != _config_key(config_json):
    raise ValueError(
        f"{path} was written with another config:\n  {results['config']}\n"
        f"this run's config is:\n  {dict(config_json)}\n"
        "Use another --output_dir (or move the file away) to evaluate this config.")
  categories = results.get("categories", {})
  if not isinstance(categories, dict):
    raise bad('its "categories" is not an object')
  for name, entry in categories.items():
    if not isinstance(entry, dict):
      raise bad(f'category {name!r} is not an object')
    for key in _ENTRY_FLOATS:
      if not _is_real(entry.get(key)):
        raise bad(f"category {name!r} has {key}={entry.get(key)!r}, not a finite number")
    for key in _ENTRY_INTS:
      value = entry.get(key)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise bad(f"category {name!r} has {key}={value!r}, not a count")
  if not isinstance(results.get("mean", {}), dict):
    raise bad('its "mean" is not an object')
  return {**results, "config": results["config"], "categories": categories,
          "mean": mean_metrics(categories)}


def _read_results(path: pathlib.Path,
                  config_json: Mapping[str, Any]) -> dict[str, Any] | None:
  """Validated content of results.json, None if there is none."""
  if not path.exists():
    return None
  move = "Move it away (or delete it) to start over, or choose another output_dir"
  try:
    text = path.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{path} is not a results file (not UTF-8 text: {e}). {move}") from e
  except OSError as e:
    raise ValueError(f"cannot read {path} ({e.strerror or e}). {move}") from e
  try:
    results = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}). {move}") from e
  return _validate_results(results, path, config_json)


def load_results(output_dir: str | os.PathLike[str], config: EvalConfig,
                 extra_config: dict[str, Any] | None = None) -> dict[str, Any]:
  """Reads <output_dir>/results.json for resuming; a fresh dict if there is none.

  Args:
    output_dir: the run's output folder.
    config: this run's config.
    extra_config: further settings recorded under "config" (e.g. a data set's own).

  Raises:
    ValueError: the file is not a results file in this module's layout (not JSON, not
      an object, wrong types), or was written with another config (its numbers would
      not be comparable); the message names the file and says what to do.
  """
  config_json = _config_json(config, extra_config)
  results = _read_results(pathlib.Path(output_dir) / RESULTS_FILE, config_json)
  return _fresh(config_json) if results is None else results


def _config_json(config: EvalConfig, extra_config: Mapping[str, Any] | None) -> dict[str, Any]:
  return {**config.to_json(), **(extra_config or {})}


def _fresh(config_json: Mapping[str, Any]) -> dict[str, Any]:
  return {"config": dict(config_json), "categories": {}, "mean": {}}


class _ResultsFile:
  """<output_dir>/results.json of one config, shared safely by concurrent runs.

  Every read-modify-write holds an exclusive flock on <output_dir>/.results.lock and
  re-reads the file, so no run's category is lost to another's write.
  """

  def __init__(self, out: pathlib.Path, config_json: Mapping[str, Any]):
    self.out = out
    self.path = out / RESULTS_FILE
    self.config_json = dict(config_json)
    self.claimed = False  # This run created the file (and may remove it on failure).

  @contextlib.contextmanager
  def _locked(self) -> Iterator[None]:
    if fcntl is None:
      yield
      return
    fd = os.open(self.out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX)
      yield
    finally:
      os.close(fd)  # Releases the lock.

  def read(self) -> dict[str, Any]:
    """The validated file (a fresh dict if there is none); no lock needed (atomic writes)."""
    results = _read_results(self.path, self.config_json)
    return _fresh(self.config_json) if results is None else results

  def claim(self) -> dict[str, Any]:
    """Checks the file again under the lock and creates it if absent (no categories).

    Raises:
      ValueError: another run claimed the folder for another config meanwhile.
    """
    with self._locked():
      results = _read_results(self.path, self.config_json)
      if results is None:
        results = _fresh(self.config_json)
        _write_json_atomic(self.path, results)
        self.claimed = True
    return results

  def merge(self, name: str, result: dict[str, Any]) -> dict[str, Any]:
    """Adds one finished category to the file; returns the merged results."""
    with self._locked():
      results = _read_results(self.path, self.config_json) or _fresh(self.config_json)
      results["config"] = self.config_json
      results["categories"][name] = result
      results["mean"] = mean_metrics(results["categories"])
      _write_json_atomic(self.path, results)
    return results

  def release(self) -> None:
    """Removes this run's claim if no category was added to it (after a failure)."""
    if not self.claimed:
      return
    with self._locked():
      try:
        results = _read_results(self.path, self.config_json)
      except ValueError:
        return  # Not ours any more: leave it.
      if results is not None and not results["categories"]:
        self.path.unlink(missing_ok=True)
    self.claimed = False


def format_table(results: dict[str, Any]) -> str:
  """Markdown table of per-category and mean metrics, in percent."""
  lines = ["| category | image AUROC | pixel AUROC | AU-PRO | train | test | seconds |",
           "|---|---|---|---|---|---|---|"]
  for name, c in sorted(results["categories"].items()):
    lines.append(f"| {name} | {100 * c['image_auroc']:.1f} | {100 * c['pixel_auroc']:.1f} | "
                 f"{100 * c['au_pro']:.1f} | {c['n_train']} | {c['n_test']} | {c['seconds']:.1f} |")
  mean = results.get("mean") or {}
  if mean:
    lines.append(f"| **mean** | {100 * mean['image_auroc']:.1f} | {100 * mean['pixel_auroc']:.1f} | "
                 f"{100 * mean['au_pro']:.1f} | | | |")
  return "\n".join(lines)


def _heatmap_indices(labels: np.ndarray, defects: Sequence[str], count: int) -> list[int]:
  """A few test images to draw: one per defect type first, then more anomalies, then good."""
  chosen, seen = [], set()
  for i, (label, defect) in enumerate(zip(labels, defects)):
    if label and defect not in seen:
      chosen.append(i)
      seen.add(defect)
  rest = [i for i in np.argsort(-labels, kind="stable") if i not in chosen]
  return (chosen + [int(i) for i in rest])[:count]


def _uint8_view(images_uint8: np.ndarray, resize: int, crop: int) -> np.ndarray:
  """The resized, centre-cropped images as uint8, i.e. what the maps are aligned to."""
  from spade_jax import preprocessing as pp  # pylint: disable=import-outside-toplevel
  x = pp.preprocess(images_uint8, resize=resize, crop=crop)
  x = x * np.asarray(pp.IMAGENET_STD, np.float32) + np.asarray(pp.IMAGENET_MEAN, np.float32)
  return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def check_test_labels(name: str, labels: Sequence[int], n_train: int,
                      config: EvalConfig) -> None:
  """Checks that a category's metrics are defined and its k's fit, before any work.

  AUROC and AU-PRO need both normal and anomalous test images; k_images and
  k_image_score need that many training images.

  Raises:
    ValueError: naming the category, the problem and the fix.
  """
  labels = np.asarray(labels)
  n_bad = int(np.count_nonzero(labels))
  n_good = int(labels.size - n_bad)
  leave_out = "or leave it out (--categories=...)"
  if n_bad == 0 or n_good == 0:
    missing, undefined = (("anomalous", "image AUROC, pixel AUROC and AU-PRO are")
                          if n_bad == 0 else ("normal ('good')", "image AUROC is"))
    raise ValueError(
        f"category {name!r} has no {missing} test image ({n_good} normal, {n_bad} "
        f"anomalous): {undefined} undefined; add {missing} test images {leave_out}")
  for key in ("k_images", "k_image_score"):
    if getattr(config, key) > n_train:
      raise ValueError(
          f"category {name!r} has {n_train} training images, fewer than {key}="
          f"{getattr(config, key)}; lower --{key} {leave_out}")


def _check_masks(name: str, masks: np.ndarray) -> None:
  """Pixel AUROC and AU-PRO need an anomalous pixel in the (cropped) masks."""
  if not np.any(masks):
    raise ValueError(
        f"category {name!r}: every test mask is empty after resize and crop (no anomalous "
        "pixel): pixel AUROC and AU-PRO are undefined; check its ground_truth masks (and "
        "--resize/--crop, which may cut the defects off) or leave it out")


def _category_result(scores: np.ndarray, maps: np.ndarray, masks: np.ndarray,
                     labels: np.ndarray, n_train: int) -> dict[str, Any]:
  """The metrics of one category (host NumPy)."""
  from spade_jax import metrics  # pylint: disable=import-outside-toplevel
  return {
      "image_auroc": float(metrics.image_auroc(labels, scores)),
      "pixel_auroc": float(metrics.pixel_auroc(masks, maps)),
      "au_pro": float(metrics.au_pro(masks, maps)),
      "n_train": int(n_train),
      "n_test": int(len(labels)),
  }


def _write_heatmaps(heatmap_dir: pathlib.Path | None, num_heatmaps: int,
                    images_of: Callable[[list[int]], np.ndarray], labels: np.ndarray,
                    defects: Sequence[str], paths: Sequence[str], masks: np.ndarray,
                    maps: np.ndarray, *, resize: int, crop: int) -> None:
  """A few heatmap PNGs; images_of(indices) -> those test images [n, H, W, 3] uint8."""
  from spade_jax import visualize  # pylint: disable=import-outside-toplevel
  if heatmap_dir is None or num_heatmaps <= 0:
    return
  heatmap_dir.mkdir(parents=True, exist_ok=True)
  picks = _heatmap_indices(labels, defects, num_heatmaps)
  views = _uint8_view(images_of(picks), resize, crop)
  vmax = float(np.max(maps))
  vmin = float(np.min(maps))
  for view, i in zip(views, picks):
    name = pathlib.Path(paths[i]).with_suffix("").as_posix().replace("/", "_")
    visualize.save_heatmap_png(heatmap_dir / f"{name}.png", view, masks[i], maps[i],
                               vmin=vmin, vmax=vmax)


def evaluate_category(spade, category_data, *, crop: int, resize: int,
                      heatmap_dir: pathlib.Path | None, num_heatmaps: int,
                      log: Callable[[str], None], mesh=None) -> dict[str, Any]:
  """Fits on one category's normal images, scores its test set, returns its metrics."""
  from spade_jax.preprocessing import preprocess_masks  # pylint: disable=import-outside-toplevel
  start = time.perf_counter()
  data = category_data
  masks = preprocess_masks(data.test_masks, resize=resize, crop=crop)
  _check_masks(data.category, masks)  # Before the expensive part.
  log(f"  fit on {len(data.train_images)} normal images")
  index = spade.fit(data.train_images) if mesh is None else spade.fit(data.train_images,
                                                                        mesh=mesh)
  log(f"  score {len(data.test_images)} test images")
  scores, maps = spade.score(index, data.test_images)
  labels = np.asarray(data.test_labels)
  result = _category_result(scores, maps, masks, labels, len(data.train_images))
  _write_heatmaps(heatmap_dir, num_heatmaps, lambda picks: data.test_images[picks], labels,
                  data.test_defects, data.test_paths, masks, maps, resize=resize, crop=crop)
  result["seconds"] = float(time.perf_counter() - start)
  return result


def evaluate_category_multiprocess(spade, data_dir: pathlib.Path, name: str, mesh, *,
                                   crop: int, resize: int,
                                   heatmap_dir: pathlib.Path | None, num_heatmaps: int,
                                   log: Callable[[str], None]) -> dict[str, Any]:
  """evaluate_category as one of several processes; every process returns the result.

  Process p reads the images p::P; see the module docstring for the data flow.
  """
  from spade_jax import distributed  # pylint: disable=import-outside-toplevel
  from spade_jax.data import mvtec  # pylint: disable=import-outside-toplevel
  from spade_jax.preprocessing import preprocess_masks  # pylint: disable=import-outside-toplevel
  start = time.perf_counter()
  files = mvtec.scan_category(data_dir, name)
  _, count = distributed.process_index_and_count()
  if min(len(files.train), len(files.test)) < count:
    raise ValueError(f"{name}: {len(files.train)} train / {len(files.test)} test images "
                     f"cannot be shared by {count} processes (need >= 1 each)")
  train_files, test_items = distributed.share(files.train), distributed.share(files.test)
  log(f"  fit on {len(files.train)} normal images ({len(train_files)} read here)")
  train = mvtec.stack_split([mvtec.read_rgb(f) for f in train_files],
                            [files.relative(f) for f in train_files], f"{name} train")
  pool, features = spade.extract(train)
  index = spade.fit_features(pool, features, mesh=mesh, process_local=True)
  log(f"  score {len(files.test)} test images ({len(test_items)} read here)")
  examples = [mvtec.read_test_example(item) for item in test_items]
  test_paths = [files.relative(item.path) for item in test_items]
  test = mvtec.stack_split([image for image, _ in examples], test_paths, f"{name} test")
  local_masks = mvtec.stack_split([mask for _, mask in examples], test_paths,
                                  f"{name} test masks")
  n_test = len(files.test)
  pool, features = spade.extract(test)
  pool = distributed.gather_shares(pool, n_test)
  features = {l: distributed.gather_shares(v, n_test) for l, v in features.items()}
  masks = distributed.gather_shares(preprocess_masks(local_masks, resize=resize, crop=crop),
                                    n_test)
  _check_masks(name, masks)
  scores, maps = spade.score_features(index, pool, features)
  labels = np.array([int(t.defect != mvtec.GOOD) for t in files.test], np.int32)
  result = _category_result(scores, maps, masks, labels, len(files.train))
  if jax_process_index() == 0:
    all_paths = [files.relative(t.path) for t in files.test]
    _write_heatmaps(
        heatmap_dir, num_heatmaps,
        lambda picks: np.stack([mvtec.read_test_example(files.test[i])[0] for i in picks]),
        labels, [t.defect for t in files.test], all_paths, masks, maps, resize=resize,
        crop=crop)
  result["seconds"] = float(time.perf_counter() - start)
  return result


def jax_process_index() -> int:
  """This process's index (0 without jax.distributed)."""
  import jax  # pylint: disable=import-outside-toplevel
  return jax.process_index()


def _categories_done(results: dict[str, Any] | None, todo: Sequence[str]) -> list[bool]:
  """Which of `todo` process 0's results.json already has, on every process.

  Raises:
    ValueError: on processes > 0 when process 0 could not read its results.json.
  """
  from spade_jax import distributed  # pylint: disable=import-outside-toplevel
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
  import spade_jax  # pylint: disable=import-outside-toplevel
  from spade_jax.data import mvtec  # pylint: disable=import-outside-toplevel

  spade_config = config.spade_config(batch_size)  # Checks batch_size.
  multiprocess = jax.process_count() > 1
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
    check_test_labels(name, [t.defect != mvtec.GOOD for t in files.test], len(files.train),
                      config)
  out = pathlib.Path(output_dir)
  config_json = _config_json(config, None)
  results = _fresh(config_json)
  store = None
  if writer:
    try:
      store = _ResultsFile(check_output_dir(out), config_json)
      _check_heatmaps_dir(out, num_heatmaps)
      store.read()  # A foreign results.json or another config: refused now.
    except ValueError:
      if multiprocess:
        _categories_done(None, todo)  # Tell the other processes, then fail here too.
      raise
  backbone = spade_jax.load_backbone(config.backbone, weights=config.weights)
  spade = spade_jax.Spade(backbone, spade_config)
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
        log(f"[{n}/{len(todo)}] {name}: already in {out / RESULTS_FILE}, skipped")
        continue
      log(f"[{n}/{len(todo)}] {name}: loading")
      heatmap_dir = out / "heatmaps" / name
      if multiprocess:
        result = evaluate_category_multiprocess(
            spade, data_dir, name, mesh, crop=config.crop, resize=config.resize,
            heatmap_dir=heatmap_dir, num_heatmaps=num_heatmaps, log=log)
      else:
        data = mvtec.load_category(data_dir, name)
        kwargs = {} if mesh is None else {"mesh": mesh}
        result = evaluate_category(spade, data, crop=config.crop, resize=config.resize,
                                   heatmap_dir=heatmap_dir, num_heatmaps=num_heatmaps,
                                   log=log, **kwargs)
      if store is not None:
        results = store.merge(name, result)
      else:
        results["categories"][name] = result
        results["mean"] = mean_metrics(results["categories"])
      log(f"[{n}/{len(todo)}] {name}: image AUROC {result['image_auroc']:.3f}, pixel "
          f"AUROC {result['pixel_auroc']:.3f}, AU-PRO {result['au_pro']:.3f} "
          f"({result['seconds']:.1f} s)")
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
  large data set first should call check_output_dir and load_results before reading
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
  import spade_jax  # pylint: disable=import-outside-toplevel
  spade_config = config.spade_config(batch_size)
  for name, data in datasets.items():
    check_test_labels(name, data.test_labels, len(data.train_images), config)
  out = pathlib.Path(output_dir)
  store = _ResultsFile(check_output_dir(out), _config_json(config, extra_config))
  _check_heatmaps_dir(out, num_heatmaps)
  store.read()
  spade = spade_jax.Spade(spade_jax.load_backbone(config.backbone, weights=config.weights),
                          spade_config)
  store.claim()
  try:
    for name, data in datasets.items():
      if name in store.read()["categories"]:
        log(f"{name}: already in {out / RESULTS_FILE}, skipped")
        continue
      result = evaluate_category(
          spade, data, crop=config.crop, resize=config.resize,
          heatmap_dir=out / "heatmaps" / name, num_heatmaps=num_heatmaps, log=log,
          **({} if mesh is None else {"mesh": mesh}))
      store.merge(name, result)
  except BaseException:
    with contextlib.suppress(Exception):
      store.release()
    raise
  return store.read()
