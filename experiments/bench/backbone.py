"""Backbone throughput: images/s of a full forward pass, random weights, float32 NHWC."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax

import spade_jax

from . import common

TITLE = "Backbone throughput"


def section(names: Sequence[str], batch: int, image_size: int,
            repeats: int) -> dict[str, Any]:
  """images/s of a full forward pass (all features), random weights, float32 NHWC.

  GFLOP/image is XLA's own count (cost analysis of the lowered forward pass).
  """
  images = common.random_normal(0, (batch, image_size, image_size, 3))
  rows = []
  for name in names:
    backbone = spade_jax.load_backbone(name, weights=None)
    timing = common.time_calls(lambda b=backbone: b(images), repeats)
    flops = _xla_flops(backbone.apply, backbone.variables, images)
    rows.append({"backbone": name, "batch": batch, "image_size": image_size,
                 "images_per_s": batch / timing["median_s"],
                 "gflop_per_image": None if flops is None else flops / batch / 1e9,
                 "gflops": None if flops is None else common.gflops(flops, timing["median_s"]),
                 **timing})
    del backbone
  return {"rows": rows}


def _xla_flops(fn: Callable[..., Any], *args) -> float | None:
  """XLA's FLOP count of jit(fn)(*args), or None where cost analysis is unavailable."""
  try:
    cost = jax.jit(fn).lower(*args).cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost.get("flops") if cost else None


def markdown(r: dict[str, Any]) -> list[str]:
  """The section's table."""
  f = common.fmt
  rows = [[x["backbone"], x["batch"], x["image_size"], f(x["images_per_s"]),
           f(x["median_s"]), f(x["gflop_per_image"]), f(x["gflops"]),
           f(x["first_call_s"])] for x in r["rows"]]
  return common.table(["backbone", "batch", "image", "images/s", "s / batch (median)",
                       "GFLOP / image (XLA)", "GFLOP/s", "first call s (compile)"], rows)
