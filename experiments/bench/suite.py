"""The whole suite: runs the selected sections in order and renders their Markdown.

Every section module has TITLE, section(**sizes) -> a JSON-able dict, and
markdown(result) -> lines; sizes are keyword arguments (the flags live in
experiments/benchmark.py).
"""

from __future__ import annotations

from collections.abc import Callable
import os
import time
import traceback
from typing import Any

from . import (
  backbone,
  coreset,
  end_to_end,
  kernels,
  knn,
  machine,
  memory,
  pipeline,
  pixel,
  precision,
  scaling,
)

_MODULES = {"backbone": backbone, "knn": knn, "pixel": pixel, "scaling": scaling,
            "memory": memory, "precision": precision, "pipeline": pipeline,
            "coreset": coreset, "kernels": kernels, "end_to_end": end_to_end}
SECTIONS = tuple(_MODULES)  # The order they run and are reported in.


def run_suite(section_kwargs: dict[str, dict[str, Any]],
              log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs the named sections in SECTIONS order; an exception is recorded, not raised."""
  unknown = sorted(set(section_kwargs) - set(SECTIONS))
  if unknown:
    raise ValueError(f"unknown sections {unknown}; valid: {', '.join(SECTIONS)}")
  results: dict[str, Any] = {"machine": machine.machine_info(), "sections": {}}
  for name in SECTIONS:
    if name not in section_kwargs:
      continue
    log(f"[benchmark] {name} ...")
    start = time.perf_counter()
    try:
      res = _MODULES[name].section(**section_kwargs[name])
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      res = {"status": f"error: {type(e).__name__}: {e}"}
    res["params"] = section_kwargs[name]
    res["wall_s"] = time.perf_counter() - start
    results["sections"][name] = res
    log(f"[benchmark] {name} done in {res['wall_s']:.1f} s")
  results["machine"]["load_avg_end"] = list(os.getloadavg())
  return results


def markdown(results: dict[str, Any]) -> str:
  """The suite's tables, with a header describing the machine."""
  m = results["machine"]
  lines = ["# spade_jax benchmark", "",
           f"- {m['date_utc']}; device: {m['platform']} / {m['device_kind']} x "
           f"{m['device_count']}; jax {m['jax']} (jaxlib {m['jaxlib']}), numpy {m['numpy']}, "
           f"Python {m['python']}; spade_jax at git {m.get('git_head')} + working tree "
           f"(sha256 of spade_jax/**/*.py: {m.get('library_sha256')})",
           f"- CPU: {m['cpu_model']}, os.cpu_count() = {m['cpu_count']}; load average "
           f"(1/5/15 min) at start {_load(m['load_avg'])}, at end "
           f"{_load(m.get('load_avg_end'))}"]
  for name, res in results["sections"].items():
    module = _MODULES[name]
    lines += ["", f"## {module.TITLE}", ""]
    if str(res.get("status", "")).startswith("error"):
      lines.append(f"Status: {res['status']}")
      continue
    lines += module.markdown(res)
    lines.append(f"\n(section wall time {res['wall_s']:.0f} s)")
  return "\n".join(lines) + "\n"


def _load(avg) -> str:
  """A load-average triple as 'a/b/c' ('-' when missing)."""
  return "-" if not avg else "/".join(f"{a:.2f}" for a in avg)
