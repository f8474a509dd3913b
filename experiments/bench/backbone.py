"""Backbone throughput: images/s of a full forward pass, random weights, float32 NHWC.

With `torch_python` (a Python with torch, e.g. a throwaway venv, as for the goldens)
each backbone's PyTorch reference (bench/torch_backbone.py) is timed in the same run:
a server process, one forward pass per request, taking turns with spade_jax's calls
(common.time_interleaved's rule), so the ratio sees both under the same load.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import pathlib
import statistics
import subprocess
import time
from typing import Any

import jax

import spade_jax

from . import common

TITLE = "Backbone throughput"
_TORCH_SERVER = pathlib.Path(__file__).with_name("torch_backbone.py")


def section(names: Sequence[str], batch: int, image_size: int, repeats: int,
            torch_python: str | None = None) -> dict[str, Any]:
  """images/s of a full forward pass (all features), random weights, float32 NHWC.

  GFLOP/image is XLA's own count (cost analysis of the lowered forward pass). With
  `torch_python`, also PyTorch's images/s of the same network, batch and input, and
  torch_ratio = spade_jax images/s / PyTorch images/s (medians, calls interleaved).
  """
  images = common.random_normal(0, (batch, image_size, image_size, 3))
  rows = []
  for name in names:
    backbone = spade_jax.load_backbone(name, weights=None)
    call = lambda b=backbone: b(images)  # noqa: E731
    if torch_python:
      timing, torch_row = _time_with_torch(call, torch_python, name, batch, image_size,
                                           repeats)
    else:
      timing, torch_row = common.time_calls(call, repeats), {}
    flops = _xla_flops(backbone.apply, backbone.variables, images)
    rows.append({"backbone": name, "batch": batch, "image_size": image_size,
                 "images_per_s": batch / timing["median_s"],
                 "gflop_per_image": None if flops is None else flops / batch / 1e9,
                 "gflops": None if flops is None else common.gflops(flops, timing["median_s"]),
                 **timing, **torch_row})
    del backbone
  return {"rows": rows}


def _time_with_torch(call: Callable[[], Any], torch_python: str, name: str, batch: int,
                     image_size: int, repeats: int) -> tuple[dict[str, Any], dict[str, Any]]:
  """spade_jax's timing and the PyTorch columns, one call of each per round."""
  cmd = [torch_python, str(_TORCH_SERVER), "--name", name, "--batch", str(batch),
         "--image_size", str(image_size)]
  with subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as server:
    ready = server.stdout.readline().strip()
    if not ready.startswith("ready"):
      server.kill()
      return common.time_calls(call, repeats), {"torch_status": f"error: {ready!r}"}
    start = time.perf_counter()
    jax.block_until_ready(call())
    first = time.perf_counter() - start
    times, torch_times = [], []
    for _ in range(max(1, repeats)):
      start = time.perf_counter()
      jax.block_until_ready(call())
      times.append(time.perf_counter() - start)
      server.stdin.write("run\n")
      server.stdin.flush()
      torch_times.append(float(server.stdout.readline()))
    server.stdin.close()
  torch_median = statistics.median(torch_times)
  timing = common.summarize(first, times)
  return timing, {"torch_images_per_s": batch / torch_median, "torch_times_s": torch_times,
                  "torch_ratio": torch_median / timing["median_s"],
                  "torch_reference": ready.removeprefix("ready ")}


def _xla_flops(fn: Callable[..., Any], *args) -> float | None:
  """XLA's FLOP count of jit(fn)(*args), or None where cost analysis is unavailable."""
  try:
    cost = jax.jit(fn).lower(*args).cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost.get("flops") if cost else None


def markdown(r: dict[str, Any]) -> list[str]:
  """The section's table (and the PyTorch columns when they were measured)."""
  f = common.fmt
  with_torch = any("torch_ratio" in x for x in r["rows"])
  header = ["backbone", "batch", "image", "images/s", "s / batch (median)",
            "GFLOP / image (XLA)", "GFLOP/s", "first call s (compile)"]
  if with_torch:
    header += ["PyTorch images/s", "spade_jax / PyTorch"]
  rows = []
  for x in r["rows"]:
    row = [x["backbone"], x["batch"], x["image_size"], f(x["images_per_s"]),
           f(x["median_s"]), f(x["gflop_per_image"]), f(x["gflops"]), f(x["first_call_s"])]
    if with_torch:
      row += [f(x.get("torch_images_per_s")), f(x.get("torch_ratio"))]
    rows.append(row)
  lines = common.table(header, rows)
  references = sorted({x["torch_reference"] for x in r["rows"] if "torch_reference" in x})
  if references:
    lines += ["", "PyTorch reference (same run, calls interleaved): " + "; ".join(references)]
  return lines
