"""End to end: images/s of fit and of scoring per method, and the compilation cache.

In process, per method (METHODS): fit on random training images, then score random
test images (backbone + search + maps), first call (compiles) apart from the median
of the timed calls; a further recorded scoring call splits the time by stage
(spade_jax.host.progress.record_stages; it waits for the device at each stage's end,
so it is not the timed call). Speed does not depend on the weights: random ones.

The compilation cache: experiments/predict.py run twice as a subprocess with the same
index and image size and one new cache folder, first cold (it compiles and writes the
cache) then warm (it loads), plus a run without the cache for reference. The index
comes from fit.py run without the cache, so the cold run finds nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import functools
import pathlib
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np
import PIL.Image

import spade_jax
from spade_jax.host import compilation_cache, progress

from . import EXPERIMENTS_DIR, common

TITLE = "Pipeline end to end (fit, score, compilation cache)"


def _spade(backbone, *, k_images: int, batch_size: int, resize: int, crop: int
           ) -> tuple[Callable[[np.ndarray], Any], Callable[[Any, np.ndarray], Any]]:
  config = spade_jax.SpadeConfig(k_images=k_images, k_image_score=min(5, k_images),
                                 batch_size=batch_size, resize=resize, crop=crop)
  detector = spade_jax.Spade(backbone, config)
  return detector.fit, detector.score


def _patchcore(backbone, *, k_images: int, batch_size: int, resize: int, crop: int,
               metric: str = "l2"
               ) -> tuple[Callable[[np.ndarray], Any], Callable[[Any, np.ndarray], Any]]:
  del k_images  # PatchCore scores against its whole coreset memory bank.
  config = spade_jax.PatchCoreConfig(batch_size=batch_size, resize=resize, crop=crop,
                                     metric=metric)
  detector = spade_jax.PatchCore(backbone, config)
  return detector.fit, detector.score


def _padim(backbone, *, k_images: int, batch_size: int, resize: int, crop: int
           ) -> tuple[Callable[[np.ndarray], Any], Callable[[Any, np.ndarray], Any]]:
  del k_images  # One Gaussian per position over every training image.
  config = spade_jax.PadimConfig(batch_size=batch_size, resize=resize, crop=crop)
  detector = spade_jax.Padim(backbone, config)
  return detector.fit, detector.score


# method -> make(backbone, k_images=, batch_size=, resize=, crop=) -> (fit, score), with
# fit(train_images) -> index and score(index, test_images) -> (scores, maps). The kernel
# rows (issue 18) compare with PatchCore's L2 in the same run: the kernel is fitted on the
# training patches and the coreset selected in its space, inside fit.
METHODS: dict[str, Callable[..., tuple[Callable, Callable]]] = {
    "spade": _spade, "patchcore": _patchcore,
    "patchcore_mahalanobis": functools.partial(_patchcore, metric="mahalanobis"),
    "patchcore_learned": functools.partial(_patchcore, metric="learned"),
    "padim": _padim}


def index_bytes(index: Any) -> int:
  """Bytes of a fitted index's arrays (what the method keeps after fit: SPADE's
  galleries, PatchCore's bank and kernel, PaDiM's means and precisions)."""
  return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(index)
                 if hasattr(x, "nbytes")))


def _images(seed: int, count: int, size: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), np.uint8)


def _time(fn: Callable[[], Any], repeats: int) -> dict[str, Any]:
  """common.time_calls, returning the last call's result too."""
  out = {}

  def call():
    out["value"] = fn()
    return out["value"]

  return {**common.time_calls(call, repeats), "value": out["value"]}


def _method_row(method: str, backbone, train: np.ndarray, test: np.ndarray, *,
                k_images: int, batch_size: int, resize: int, crop: int,
                repeats: int) -> dict[str, Any]:
  fit, score = METHODS[method](backbone, k_images=k_images, batch_size=batch_size,
                               resize=resize, crop=crop)
  fitted = _time(lambda: fit(train), repeats)
  index = fitted.pop("value")
  scored = _time(lambda: score(index, test), repeats)
  scored.pop("value")
  with progress.record_stages() as stages:
    score(index, test)
  return {
      "method": method, "num_train": len(train), "num_test": len(test),
      "fit_images_per_s": len(train) / fitted["median_s"],
      "score_images_per_s": len(test) / scored["median_s"],
      "fit": fitted, "score": scored, "index_bytes": index_bytes(index),
      "stage_s_per_image": {k: v / len(test) for k, v in stages.items()},
  }


def _write_pngs(folder: pathlib.Path, images: np.ndarray) -> None:
  folder.mkdir(parents=True, exist_ok=True)
  for i, image in enumerate(images):
    PIL.Image.fromarray(image).save(folder / f"{i:03d}.png")


def _run(script: str, args: Sequence[str], timeout_s: float) -> dict[str, Any]:
  """Runs experiments/<script>; its wall time, and predict.py's own 'in X s' figure."""
  cmd = [sys.executable, str(EXPERIMENTS_DIR / script), *args]
  start = time.perf_counter()
  proc = subprocess.run(cmd, env=common.worker_env(None), capture_output=True, text=True,
                        timeout=timeout_s, check=False)
  wall = time.perf_counter() - start
  if proc.returncode != 0:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
    raise RuntimeError(f"{script} exited {proc.returncode}: {tail[0][:300]}")
  own = re.search(r"scored \d+ images in ([0-9.]+) s", proc.stdout)
  return {"wall_s": wall, "script_s": float(own.group(1)) if own else None}


def _cache_runs(backbone: str, *, num_images: int, k_images: int, batch_size: int,
                resize: int, crop: int, timeout_s: float = 1800) -> dict[str, Any]:
  """predict.py's wall time without the cache, with a cold and with a warm one."""
  with tempfile.TemporaryDirectory(prefix="spade_jax_bench_cache_") as tmp:
    root = pathlib.Path(tmp)
    _write_pngs(root / "train", _images(1, max(num_images, k_images), resize))
    _write_pngs(root / "test", _images(2, num_images, resize))
    common_flags = [f"--backbone={backbone}", "--weights=none", f"--k_images={k_images}",
                    f"--k_image_score={min(5, k_images)}", f"--resize={resize}",
                    f"--crop={crop}", f"--batch_size={batch_size}"]
    _run("fit.py", [f"--train_dir={root / 'train'}", f"--index={root / 'index.spade'}",
                    *common_flags, "--compilation_cache_dir=none"], timeout_s)
    cache = root / "cache"
    runs = {}
    for name, cache_flag in (("off", "none"), ("cold", str(cache)), ("warm", str(cache))):
      runs[name] = _run("predict.py", [
          f"--index={root / 'index.spade'}", f"--images={root / 'test'}",
          f"--output_dir={root / ('out_' + name)}", "--weights=none",
          f"--k_images={k_images}", f"--k_image_score={min(5, k_images)}",
          f"--batch_size={batch_size}",
          f"--compilation_cache_dir={cache_flag}"], timeout_s)
      if name == "cold":
        entries = compilation_cache.cache_entries(cache)
        runs[name]["cache_entries"] = len(entries)
        runs[name]["cache_bytes"] = sum(p.stat().st_size for p in entries)
  return {"num_images": num_images, "backbone": backbone, "runs": runs,
          "warm_over_cold": runs["warm"]["wall_s"] / runs["cold"]["wall_s"],
          "saved_s": runs["cold"]["wall_s"] - runs["warm"]["wall_s"]}


def section(backbone: str, methods: Sequence[str], num_train: int, num_test: int,
            image_size: int, k_images: int, batch_size: int, repeats: int,
            cache_images: int = 0) -> dict[str, Any]:
  """images/s of fit and score per method; predict.py with a cold and a warm cache.

  Args:
    backbone: a spade_jax backbone name (random weights).
    methods: names in METHODS.
    num_train, num_test: random images fitted on and scored (num_train >= k_images).
    image_size: the crop (the images are generated at the resize, crop * 256 / 224).
    k_images: K.
    batch_size: images per backbone call and scoring step.
    repeats: timed calls after the first.
    cache_images: test images of the cache measurement (0: not measured).
  """
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    raise ValueError(f"unknown methods {unknown}; known: {sorted(METHODS)}")
  crop, resize = image_size, round(image_size * 256 / 224)
  model = spade_jax.load_backbone(backbone, weights=None)
  train, test = _images(10, num_train, resize), _images(11, num_test, resize)
  rows = [_method_row(m, model, train, test, k_images=k_images, batch_size=batch_size,
                      resize=resize, crop=crop, repeats=repeats) for m in methods]
  result: dict[str, Any] = {"backbone": backbone, "resize": resize, "crop": crop,
                            "k_images": k_images, "batch_size": batch_size, "rows": rows}
  if cache_images:
    result["cache"] = _cache_runs(backbone, num_images=cache_images, k_images=k_images,
                                  batch_size=batch_size, resize=resize, crop=crop)
  return result


def markdown(r: dict[str, Any]) -> list[str]:
  """The section's tables."""
  f = common.fmt
  lines = [f"{r['backbone']} (random weights), images {r['resize']}^2 cropped to "
           f"{r['crop']}^2, K = {r['k_images']}, batch {r['batch_size']}; per method: fit "
           "(backbone on the training images, gallery) and score (backbone, search, maps) "
           "of random images.", ""]
  stage_names = ("backbone", "search", "maps")
  rows = [[x["method"], x["num_train"], f(x["fit_images_per_s"]), f(x["fit"]["first_call_s"]),
           x["num_test"], f(x["score_images_per_s"]), f(x["score"]["first_call_s"]),
           *[f(x["stage_s_per_image"].get(s)) for s in stage_names],
           common.mib(x.get("index_bytes"))] for x in r["rows"]]
  lines += common.table(["method", "train images", "fit images/s", "fit first call s",
                         "test images", "score images/s", "score first call s",
                         *[f"{s} s / test image" for s in stage_names], "index MiB"], rows)
  cache = r.get("cache")
  if cache:
    runs = cache["runs"]
    lines += ["", f"experiments/predict.py on {cache['num_images']} images with the same "
              "index and image size, as a subprocess (wall time, Python start included; "
              "'in script' = the script's own figure, after the backbone is loaded):", ""]
    lines += common.table(
        ["compilation cache", "wall s", "in script s", "programs in cache", "cache MiB"],
        [[name, f(run["wall_s"]), f(run["script_s"]), run.get("cache_entries", "-"),
          common.mib(run.get("cache_bytes"))] for name, run in runs.items()])
    lines += ["", f"Warm cache: {f(cache['saved_s'])} s less than cold "
              f"({f(cache['warm_over_cold'])} of its wall time)."]
  return lines
