"""results.json: its layout, validation, and merge-on-write under a lock.

results.json layout (a contract; fractions in [0, 1]):
  {"config": {...},
   "categories": {"<name>": {"image_auroc": f, "pixel_auroc": f, "au_pro": f,
                             "n_train": i, "n_test": i, "seconds": f,
                             "stage_seconds": {"backbone": f, "search": f, "maps": f,
                                               "metrics": f}}, ...},
   "mean": {"image_auroc": f, "pixel_auroc": f, "au_pro": f}}

"seconds" is the whole category (fit, score, metrics, heatmaps); "stage_seconds" splits
it by stage: backbone (preprocessing and feature extraction, training and test
images), search (the image kNN and the pixel scores), maps (upsampling and blur),
metrics (AUROC, AU-PRO). Files written before stage_seconds existed have none and are
still read.

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
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
import contextlib
import json
import math
import numbers
import os
import pathlib
import tempfile
from typing import Any

import numpy as np

from spade_jax.evaluation.config import EvalConfig
from spade_jax.host import atomic, locks

METRIC_NAMES = ("image_auroc", "pixel_auroc", "au_pro")
RESULTS_FILE = "results.json"
LOCK_FILE = ".results.lock"
STAGE_NAMES = ("backbone", "search", "maps", "metrics")
_ENTRY_FLOATS = (*METRIC_NAMES, "seconds")
_ENTRY_INTS = ("n_train", "n_test")


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


def check_heatmaps_dir(out: pathlib.Path, num_heatmaps: int) -> None:
  heatmaps = out / "heatmaps"
  if num_heatmaps > 0 and heatmaps.exists() and not heatmaps.is_dir():
    raise ValueError(f"{str(heatmaps)!r} is a file, but heatmaps go in a folder of that "
                     "name; move it away, pass --num_heatmaps=0 or choose another "
                     "output_dir (--output_dir)")


def _config_key(config_json: Mapping[str, Any]) -> dict[str, Any]:
  """A config as compared: equivalent data_dir spellings ('data/', './data', an absolute
  path to the same folder) compare equal, also in files written before they were
  normalised, files written before "method" was recorded are SPADE's, and SPADE files
  written before "aggregate" / "bandwidth" were recorded are "mean"'s (no bandwidth)."""
  key = dict(config_json)
  key.setdefault("method", "spade")  # Files written before PatchCore were SPADE's.
  if key["method"] == "spade":  # Files written before soft scores averaged (no bandwidth).
    key.setdefault("aggregate", "mean")
    key.setdefault("bandwidth", None)
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
    stages = entry.get("stage_seconds", {})  # Optional: older files have none.
    if not isinstance(stages, dict) or not all(
        isinstance(k, str) and _is_real(v) and v >= 0 for k, v in stages.items()):
      raise bad(f"category {name!r} has stage_seconds={stages!r:.200}, not an object of "
                "stage names -> seconds")
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
  config_json = recorded_config(config, extra_config)
  results = _read_results(pathlib.Path(output_dir) / RESULTS_FILE, config_json)
  return fresh_results(config_json) if results is None else results


def recorded_config(config: EvalConfig, extra_config: Mapping[str, Any] | None
                    ) -> dict[str, Any]:
  """The "config" object results.json records: the EvalConfig plus extra settings."""
  return {**config.to_json(), **(extra_config or {})}


def fresh_results(config_json: Mapping[str, Any]) -> dict[str, Any]:
  """A results.json object without categories."""
  return {"config": dict(config_json), "categories": {}, "mean": {}}


class ResultsFile:
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
    with locks.exclusive(self.out / LOCK_FILE):  # Waits for the other run's merge.
      yield

  def read(self) -> dict[str, Any]:
    """The validated file (a fresh dict if there is none); no lock needed (atomic writes)."""
    results = _read_results(self.path, self.config_json)
    return fresh_results(self.config_json) if results is None else results

  def claim(self) -> dict[str, Any]:
    """Checks the file again under the lock and creates it if absent (no categories).

    Raises:
      ValueError: another run claimed the folder for another config meanwhile.
    """
    with self._locked():
      results = _read_results(self.path, self.config_json)
      if results is None:
        results = fresh_results(self.config_json)
        _write_json_atomic(self.path, results)
        self.claimed = True
    return results

  def merge(self, name: str, result: dict[str, Any]) -> dict[str, Any]:
    """Adds one finished category to the file; returns the merged results."""
    with self._locked():
      results = _read_results(self.path, self.config_json) or fresh_results(self.config_json)
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
    lines.append(f"| **mean** | {100 * mean['image_auroc']:.1f} | "
                 f"{100 * mean['pixel_auroc']:.1f} | "
                 f"{100 * mean['au_pro']:.1f} | | | |")
  return "\n".join(lines)
