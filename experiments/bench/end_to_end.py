"""evaluate.py end to end against the PyTorch references, and where its seconds go.

One built-in category (MVTec layout, real photos, default gravel: 60 training and 30
test images), as users run it: each program a fresh subprocess, its wall time.
  * spade_jax: `evaluate.py --method=spade`, then `--method=patchcore`, each first with
    an empty compilation cache ("cold": what a first run costs, compilation included),
    then again with that cache ("warm").
  * PyTorch SPADE (bench/torch_spade.py, torch.cdist; with `torch_python`) and anomalib
    2.7's PatchCore on the same images and features (../shared/tools/anomalib's
    run_anomalib.py; with `anomalib_python` and `anomalib_script`), run between the
    spade_jax runs so that load drift on a shared machine touches both alike.
  ratio = reference wall s / spade_jax wall s (> 1: spade_jax is faster).

The profile splits each spade_jax run: start-up (Python, JAX and the backbone's load,
reading and decoding the images: wall - the category's own seconds), then the
category's stage_seconds from results.json (backbone = preprocessing + features,
search, maps, metrics) and the rest of the category (fit's gallery or coreset, host
copies, writing results.json). Compilation = cold wall - warm wall.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any

from . import EXPERIMENTS_DIR, common

TITLE = "End to end against PyTorch, and a profile of evaluate.py (issue 20)"
_TORCH_SPADE = pathlib.Path(__file__).with_name("torch_spade.py")
_STAGES = ("backbone", "search", "maps", "metrics")


def _timed(cmd: list[str], env: dict[str, str], timeout_s: float) -> tuple[float, str]:
  start = time.perf_counter()
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s,
                        check=False)
  wall = time.perf_counter() - start
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{proc.stderr[-3000:]}")
  return wall, proc.stdout


def _spade_jax(method: str, data_dir: pathlib.Path, category: str, cache: pathlib.Path,
               out: pathlib.Path, flags: Sequence[str], timeout_s: float) -> dict[str, Any]:
  cmd = [sys.executable, str(EXPERIMENTS_DIR / "evaluate.py"), f"--method={method}",
         f"--data_dir={data_dir}", f"--categories={category}", "--num_heatmaps=0",
         f"--output_dir={out}", f"--compilation_cache_dir={cache}", *flags]
  wall, _ = _timed(cmd, common.worker_env(None), timeout_s)
  entry = json.loads((out / "results.json").read_text())["categories"][category]
  stages = {s: float(entry["stage_seconds"].get(s, 0.0)) for s in _STAGES}
  return {"wall_s": wall, "category_s": entry["seconds"], "stage_s": stages,
          "startup_s": wall - entry["seconds"],
          "other_s": entry["seconds"] - sum(stages.values()),
          "image_auroc": entry["image_auroc"], "pixel_auroc": entry["pixel_auroc"],
          "au_pro": entry["au_pro"]}


def _torch_spade(python: str, category_dir: pathlib.Path, timeout_s: float
                 ) -> dict[str, Any]:
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  wall, stdout = _timed([python, str(_TORCH_SPADE), f"--category_dir={category_dir}"], env,
                        timeout_s)
  return {"wall_s": wall, **json.loads(stdout.strip().splitlines()[-1])}


def _anomalib(python: str, script: str, category_dir: pathlib.Path, tmp: pathlib.Path,
              timeout_s: float) -> dict[str, Any]:
  root = tmp / "anomalib_set"
  root.mkdir()
  (root / category_dir.name).symlink_to(category_dir)
  out = tmp / "anomalib.json"
  env = dict(os.environ, TQDM_DISABLE="1")
  wall, _ = _timed([python, script, f"--set=builtin={root}", "--methods", "patchcore",
                    f"--out={out}", f"--workdir={tmp / 'anomalib_work'}"], env, timeout_s)
  run = json.loads(out.read_text())["sets"]["builtin"]["patchcore"][category_dir.name]
  return {"wall_s": wall, "fit_s": run["fit_s"], "test_s": run["test_s"],
          "image_auroc": run["raw"]["image_auroc"], "pixel_auroc": run["raw"]["pixel_auroc"],
          "au_pro": run["raw"]["aupro"]}


def section(category: str, torch_python: str | None = None,
            anomalib_python: str | None = None, anomalib_script: str | None = None,
            methods: Sequence[str] = ("spade", "patchcore"), data_dir: str | None = None,
            evaluate_flags: Sequence[str] = (), timeout_s: float = 3600.0) -> dict[str, Any]:
  """Wall seconds of evaluate.py (cold and warm compilation cache) per method on one
  category, with the references when their Pythons are given.

  Args:
    category: the category's folder name.
    torch_python, anomalib_python, anomalib_script: the references (see the module).
    methods: evaluate.py's --method values, among "spade" and "patchcore".
    data_dir: an MVTec-layout folder (default: the built-in benchmark's).
    evaluate_flags: more flags of evaluate.py (the references use their defaults, so a
      ratio is only meaningful without any).
    timeout_s: per program.
  """
  from spade_jax.data import builtin  # pylint: disable=import-outside-toplevel
  bench_dir = pathlib.Path(data_dir) if data_dir else builtin.builtin_benchmark_dir()
  category_dir = bench_dir / category
  if not category_dir.is_dir():
    raise ValueError(f"no category {category!r} in {bench_dir}")
  result: dict[str, Any] = {"category": category, "runs": {}}
  runs = result["runs"]
  with tempfile.TemporaryDirectory(prefix="spade_jax_end_to_end_") as tmp_name:
    tmp = pathlib.Path(tmp_name)
    if torch_python:
      runs["torch_spade"] = _torch_spade(torch_python, category_dir, timeout_s)
    for method in methods:
      cache = tmp / f"cache_{method}"
      for state in ("cold", "warm"):
        runs[f"{method}_{state}"] = _spade_jax(method, bench_dir, category, cache,
                                               tmp / f"out_{method}_{state}", evaluate_flags,
                                               timeout_s)
      if method == methods[0] and anomalib_python and anomalib_script:
        runs["anomalib_patchcore"] = _anomalib(anomalib_python, anomalib_script,
                                               category_dir, tmp, timeout_s)
  for method in methods:
    runs[f"{method}_cold"]["compile_s"] = (runs[f"{method}_cold"]["wall_s"]
                                           - runs[f"{method}_warm"]["wall_s"])
  for ours, ref in (("spade", "torch_spade"), ("patchcore", "anomalib_patchcore")):
    if ref in runs and f"{ours}_cold" in runs:
      for state in ("cold", "warm"):
        result[f"{ours}_{state}_ratio"] = runs[ref]["wall_s"] / runs[f"{ours}_{state}"]["wall_s"]
  return result


def markdown(r: dict[str, Any]) -> list[str]:
  """The section's tables."""
  f = common.fmt
  runs = r["runs"]
  lines = [f"Built-in category `{r['category']}`, each program a fresh process (wall s, "
           "start-up included); ratio = the reference's wall s / spade_jax's.", ""]
  rows = []
  for name, run in runs.items():
    ratio = ""
    if name.startswith(("spade_", "patchcore_")):
      ratio = f(r.get(f"{name}_ratio"))
    rows.append([name, f(run["wall_s"]), f(run.get("image_auroc")),
                 f(run.get("pixel_auroc")), f(run.get("au_pro")), ratio])
  lines += common.table(["run", "wall s", "image AUROC", "pixel AUROC", "AU-PRO",
                         "ratio to reference"], rows)
  lines += ["", "Where spade_jax's seconds go (s):", ""]
  prof = []
  for name, run in runs.items():
    if "stage_s" not in run:
      continue
    prof.append([name, f(run["wall_s"]), f(run["startup_s"]),
                 *[f(run["stage_s"][s]) for s in _STAGES], f(run["other_s"]),
                 f(run.get("compile_s"))])
  lines += common.table(["run", "wall", "start-up + reading", *_STAGES, "other",
                         "compilation (cold - warm)"], prof)
  return lines
