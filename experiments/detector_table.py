r"""The README's detector x kernel x benchmark table, measured with the landed code.

Runs every row (a detector with its kernel) on each built-in benchmark through
spade_jax.evaluation.evaluate, one category at a time, and prints one Markdown table:
image AUROC, pixel AUROC and AU-PRO (means over the categories) and the fit and score
seconds per image. A category's fit seconds are fit() on its training images (features,
kernel, coreset, held-out folds) over their count; its score seconds are score() on its
test images (features, scores, maps) over theirs. Each figure is the median over the
categories, so the first category of a row, which compiles that row's programs, does
not set it (the persistent compilation cache is on, as in every script).

  python experiments/detector_table.py --output_dir=results/detector_table
  python experiments/detector_table.py --rows=spade:l2,patchcore:mahalanobis \
      --benchmarks=builtin_hard

Every category's results.json entry is kept under <output_dir>/<benchmark>/<row>/, with
its timings in timings.json beside it, so a rerun only computes what is missing; the
table goes to <output_dir>/table.md too.
"""

from collections.abc import Sequence
import json
import os
import pathlib
import sys
import time

from absl import app, flags, logging
import detector_flags
import numpy as np

from spade_jax import evaluation
from spade_jax.host import progress

DEFAULT_ROWS = ("spade:l2", "spade:mahalanobis", "spade:learned", "patchcore:l2",
                "patchcore:mahalanobis", "patchcore:learned", "padim", "ensemble")
_ROWS = flags.DEFINE_list("rows", list(DEFAULT_ROWS), "Rows, each METHOD[:METRIC] "
                          "(ensemble: the default ensemble).")
_BENCHMARKS = flags.DEFINE_list("benchmarks", ["builtin", "builtin_hard"],
                                "Built-in benchmarks (spade_jax.data.builtin.BENCHMARKS).")
_CATEGORIES = flags.DEFINE_list("categories", None, "Categories (default: all).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "results/detector_table", "Where it goes.")
_CACHE_DIR = detector_flags.define_compilation_cache_flag()


def parse_row(text: str) -> dict[str, str]:
  """EvalConfig settings of a row "METHOD[:METRIC]" (ValueError naming --rows)."""
  method, _, metric = text.partition(":")
  if method not in ("spade", "patchcore", "padim", "ensemble"):
    raise ValueError(f"--rows: {text!r} is not METHOD[:METRIC] with METHOD spade, "
                     "patchcore, padim or ensemble")
  if metric and method in ("padim", "ensemble"):
    raise ValueError(f"--rows: {text!r}: {method} takes no metric")
  return {"method": method, **({"metric": metric} if metric else {})}


def _row_name(text: str) -> str:
  return text.replace(":", "_")


def run_row(data_dir: pathlib.Path, row: str, out: pathlib.Path,
            categories: Sequence[str]) -> None:
  """Evaluates one row on the categories missing from out/timings.json."""
  config = evaluation.EvalConfig(data_dir=str(data_dir), **parse_row(row))
  timings_file = out / "timings.json"
  timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
  for category in categories:
    if category in timings:
      continue
    with progress.record_stages() as seconds:
      results = evaluation.evaluate(config, output_dir=out, categories=[category],
                                    num_heatmaps=0, log=logging.info)
    entry = results["categories"][category]
    timings[category] = {"fit": seconds.get("fit", 0.0), "score": seconds.get("score", 0.0),
                         "n_train": entry["n_train"], "n_test": entry["n_test"],
                         "loadavg": os.getloadavg()[0], "time": time.time()}
    tmp = timings_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(timings, indent=2) + "\n")
    tmp.replace(timings_file)


def table_rows(out: pathlib.Path, rows: Sequence[str],
               benchmarks: Sequence[str]) -> list[str]:
  """Markdown lines of the table from what run_row wrote."""
  lines = ["| detector | kernel | benchmark | image AUROC | pixel AUROC | AU-PRO | "
           "fit s / image | score s / image |", "|---|---|---|---|---|---|---|---|"]
  for row in rows:
    settings = parse_row(row)
    for benchmark in benchmarks:
      folder = out / benchmark / _row_name(row)
      results = json.loads((folder / evaluation.RESULTS_FILE).read_text())
      timings = json.loads((folder / "timings.json").read_text())
      mean = results["mean"]
      fit = np.median([t["fit"] / t["n_train"] for t in timings.values()])
      score = np.median([t["score"] / t["n_test"] for t in timings.values()])
      kernel = settings.get("metric", "l2" if settings["method"] != "padim" else "-")
      if settings["method"] == "ensemble":
        kernel = "default members"
      lines.append(f"| {settings['method']} | {kernel} | {benchmark} | "
                   f"{100 * mean['image_auroc']:.1f} | {100 * mean['pixel_auroc']:.1f} | "
                   f"{100 * mean['au_pro']:.1f} | {fit:.3f} | {score:.3f} |")
  return lines


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    for row in _ROWS.value:
      parse_row(row)
    from spade_jax.data import builtin  # pylint: disable=import-outside-toplevel
    for benchmark in _BENCHMARKS.value:
      if benchmark not in builtin.BENCHMARKS:
        raise ValueError(f"--benchmarks: {benchmark!r} is not one of "
                         f"{', '.join(builtin.BENCHMARKS)}")
  except ValueError as e:
    sys.exit(f"detector_table.py: error: {e}")
  detector_flags.enable_compilation_cache(_CACHE_DIR, "detector_table.py")
  out = pathlib.Path(_OUTPUT_DIR.value)
  for benchmark in _BENCHMARKS.value:
    data_dir = builtin.builtin_benchmark_dir(builtin.BENCHMARKS[benchmark])
    categories = _CATEGORIES.value or sorted(p.name for p in data_dir.iterdir() if p.is_dir())
    for row in _ROWS.value:
      logging.info("%s: %s", benchmark, row)
      run_row(data_dir, row, out / benchmark / _row_name(row), categories)
  lines = table_rows(out, _ROWS.value, _BENCHMARKS.value)
  (out / "table.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
