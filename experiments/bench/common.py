"""What the sections share: how a figure is timed, inputs, table cells, subprocesses.

Timing: the first call (jit compile + run) is reported separately and excluded; the
figure is the median of `repeats` further calls, each ended by block_until_ready.
Figures compared with each other (knn vs the matmul references, precision variants,
sharded vs unsharded) are measured taking turns (time_interleaved), so load drift on
a shared machine affects them alike.

Sections that need a fresh process (the NumPy reference with a clean BLAS
environment, fake-device counts, peak RSS) run `python -m bench.worker` (see
worker.py) through run_worker or worker_command.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import json
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Any

import jax
import numpy as np

from . import EXPERIMENTS_DIR, REPO_ROOT

# NumPy's reference runs with these unset: they can pin OpenBLAS to a slow kernel.
BLAS_ENV_UNSET = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
RESULT_PREFIX = "BENCH_RESULT "  # A worker's result line: prefix + JSON.
MIB = 2.0**20


# ----------------------------------------------------------------------------------
# Timing and inputs.


def time_calls(fn: Callable[[], Any], repeats: int) -> dict[str, Any]:
  """First call (compile + run) timed apart, then the median of `repeats` calls."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - start
  times = []
  for _ in range(max(1, repeats)):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return summarize(first, times)


def summarize(first: float, times: Sequence[float]) -> dict[str, Any]:
  """The timing dict of every figure: first call, median, best and all timed calls."""
  return {"first_call_s": first, "median_s": statistics.median(times), "min_s": min(times),
          "times_s": list(times)}


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int
                     ) -> dict[str, dict[str, Any]]:
  """Like time_calls for several functions, taking turns (call 1 of each, call 2, ...).

  On a shared machine the load drifts over a run; taking turns exposes every function
  to the same drift, so ratios between them stay meaningful.
  """
  firsts, times = {}, {name: [] for name in fns}
  for name, fn in fns.items():
    start = time.perf_counter()
    jax.block_until_ready(fn())
    firsts[name] = time.perf_counter() - start
  for _ in range(max(1, repeats)):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return {name: summarize(firsts[name], times[name]) for name in fns}


def random_normal(seed: int, shape: Sequence[int]) -> jax.Array:
  """[shape] float32 N(0, 1) on the default device.

  Drawn on the host: jax.random compiles once per shape (~1 s on CPU), NumPy does not.
  """
  host = np.random.default_rng(seed).standard_normal(tuple(shape), np.float32)
  return jax.block_until_ready(jax.device_put(host))


def gflops(flops: float, seconds: float) -> float:
  """FLOPs in `seconds` -> GFLOP/s."""
  return flops / seconds / 1e9


def rate(timing: dict[str, Any], flops: float, **extra) -> dict[str, Any]:
  """A timing with its GFLOP/s from the median and from the best call."""
  return {**extra, "gflops": gflops(flops, timing["median_s"]),
          "gflops_best": gflops(flops, timing["min_s"]), **timing}


# ----------------------------------------------------------------------------------
# Markdown cells and tables.


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
  """The lines of a Markdown table."""
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return lines


def fmt(x: Any, digits: int = 3) -> str:
  """A table cell: '-' for None, yes/NO for bools, `digits` significant digits."""
  if x is None:
    return "-"
  if isinstance(x, bool):
    return "yes" if x else "NO"
  if isinstance(x, float):
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:.0f}"
  return str(x)


def mib(x: int | None) -> str:
  """Bytes -> a MiB table cell ('-' for None)."""
  return "-" if x is None else f"{x / MIB:.1f}"


# ----------------------------------------------------------------------------------
# Worker subprocesses.


def worker_env(device_count: int | None, clean_blas: bool = False) -> dict[str, str]:
  """This process's environment, with the fake-device count replaced (or removed)."""
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                 env.get("XLA_FLAGS", "")).split()
  if device_count is not None:
    flags.append(f"--xla_force_host_platform_device_count={device_count}")
  env["XLA_FLAGS"] = " ".join(flags)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(REPO_ROOT), str(EXPERIMENTS_DIR)]
      + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  if clean_blas:
    for name in BLAS_ENV_UNSET:
      env.pop(name, None)
  return env


def worker_command(mode: str, name: str, kwargs: dict[str, Any]) -> list[str]:
  """`python -m bench.worker MODE NAME JSON` (mode: --worker or --serve)."""
  return [sys.executable, "-m", f"{__package__}.worker", mode, name, json.dumps(kwargs)]


def run_worker(name: str, kwargs: dict[str, Any], *, device_count: int | None = None,
               clean_blas: bool = False, extra_env: dict[str, str] | None = None,
               timeout_s: float = 1800) -> dict[str, Any]:
  """Runs worker.WORKERS[name](**kwargs) in a fresh Python: its dict, or an error dict."""
  env = worker_env(device_count, clean_blas)
  env.update(extra_env or {})
  cmd = worker_command("--worker", name, kwargs)
  try:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s,
                          check=False)
  except subprocess.TimeoutExpired:
    return {"status": f"error: worker {name} timed out after {timeout_s:.0f} s"}
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith(RESULT_PREFIX):
      return json.loads(line[len(RESULT_PREFIX):])
  lines = (proc.stderr or proc.stdout).strip().splitlines() or ["(no output)"]
  cause = next((l for l in reversed(lines) if re.match(r"\w+(Error|Exception)\b", l)),
               lines[-1])
  return {"status": f"error: worker {name} exited {proc.returncode}: {cause[:300]}"}
