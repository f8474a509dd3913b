"""The performance suite behind experiments/benchmark.py: one function per section.

Every section takes sizes as keyword arguments (no flags here) and returns a JSON-able
dict; `markdown(results)` renders the tables. Sections that need a fresh process (the
NumPy reference with a clean BLAS environment, fake-device counts, peak RSS) run this
file as a subprocess:

  python experiments/bench_lib.py --worker NAME '{"kwarg": ...}'   # prints BENCH_RESULT {json}
  python experiments/bench_lib.py --serve numpy_matmul '{...}'      # one pass per stdin line

Timing: the first call (jit compile + run) is reported separately and excluded; the
figure is the median of `repeats` further calls, each ended by block_until_ready.
Figures compared with each other (knn vs the matmul references, precision variants,
sharded vs unsharded) are measured taking turns, so load drift on a shared machine
affects them alike.
"""

from __future__ import annotations

import datetime
import functools
import gc
import json
import os
import pathlib
import platform
import re
import resource
import statistics
import subprocess
import sys
import threading
import time
import traceback
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

_REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:  # Run from a checkout without `pip install -e`.
  sys.path.insert(0, str(_REPO_ROOT))

import spade_jax  # pylint: disable=g-import-not-at-top
from spade_jax import cpu_kernel  # pylint: disable=g-import-not-at-top
from spade_jax import distances  # pylint: disable=g-import-not-at-top
from spade_jax import neighbors  # pylint: disable=g-import-not-at-top

SECTIONS = ("backbone", "knn", "pixel", "scaling", "memory", "precision")
KNN_TARGET = 0.85  # issue 3: knn at >= 85% of the matmul rate.
MEMORY_FLAT_LIMIT = 1.5  # issue 5: working set within 1.5x when the gallery grows 8x.
# NumPy's reference runs with these unset: they can pin OpenBLAS to a slow kernel.
_BLAS_ENV_UNSET = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
_RESULT_PREFIX = "BENCH_RESULT "
_MIB = 2.0**20


# ----------------------------------------------------------------------------------
# Timing, inputs, machine.


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
  return flops / seconds / 1e9


def machine_info() -> dict[str, Any]:
  """Device kind, versions, CPU count, load: the header of every report."""
  import jaxlib  # pylint: disable=import-outside-toplevel
  dev = jax.devices()[0]
  return {
      "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "platform": dev.platform, "device_kind": dev.device_kind,
      "device_count": jax.device_count(), "jax": jax.__version__,
      "jaxlib": jaxlib.__version__, "numpy": np.__version__,
      "python": platform.python_version(), "cpu_count": os.cpu_count(),
      "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
      "cpu_model": _cpu_model(), "load_avg": list(os.getloadavg()),
      "git_head": _git_head(), "library_sha256": _library_digest(),
      "env": {name: os.environ.get(name) for name in
              ("XLA_FLAGS", "JAX_PLATFORMS", *_BLAS_ENV_UNSET, "OMP_NUM_THREADS",
               "OPENBLAS_NUM_THREADS")},
  }


def _git_head() -> str | None:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_REPO_ROOT,
                          capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


def _library_digest() -> str:
  """sha256 (12 hex) of spade_jax/**/*.py and *.cc as measured (the tree may be
  uncommitted)."""
  import hashlib  # pylint: disable=import-outside-toplevel
  digest = hashlib.sha256()
  root = _REPO_ROOT / "spade_jax"
  for path in sorted([*root.rglob("*.py"), *root.rglob("*.cc")]):
    digest.update(path.read_bytes())
  return digest.hexdigest()[:12]


def _cpu_model() -> str | None:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or None


# ----------------------------------------------------------------------------------
# Worker subprocesses.


def _worker_env(device_count: int | None, clean_blas: bool = False) -> dict[str, str]:
  """This process's environment, with the fake-device count replaced (or removed)."""
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                 env.get("XLA_FLAGS", "")).split()
  if device_count is not None:
    flags.append(f"--xla_force_host_platform_device_count={device_count}")
  env["XLA_FLAGS"] = " ".join(flags)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(_REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  if clean_blas:
    for name in _BLAS_ENV_UNSET:
      env.pop(name, None)
  return env


def run_worker(name: str, kwargs: dict[str, Any], *, device_count: int | None = None,
               clean_blas: bool = False, extra_env: dict[str, str] | None = None,
               timeout_s: float = 1800) -> dict[str, Any]:
  """Runs WORKERS[name](**kwargs) in a fresh Python; returns its dict or an error dict."""
  env = _worker_env(device_count, clean_blas)
  env.update(extra_env or {})
  cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", name,
         json.dumps(kwargs)]
  try:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s,
                          check=False)
  except subprocess.TimeoutExpired:
    return {"status": f"error: worker {name} timed out after {timeout_s:.0f} s"}
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith(_RESULT_PREFIX):
      return json.loads(line[len(_RESULT_PREFIX):])
  lines = (proc.stderr or proc.stdout).strip().splitlines() or ["(no output)"]
  cause = next((l for l in reversed(lines) if re.match(r"\w+(Error|Exception)\b", l)),
               lines[-1])
  return {"status": f"error: worker {name} exited {proc.returncode}: {cause[:300]}"}


# ----------------------------------------------------------------------------------
# 1. Backbone throughput.


def backbone_section(names: Sequence[str], batch: int, image_size: int,
                     repeats: int) -> dict[str, Any]:
  """images/s of a full forward pass (all features), random weights, float32 NHWC.

  GFLOP/image is XLA's own count (cost analysis of the lowered forward pass).
  """
  images = random_normal(0, (batch, image_size, image_size, 3))
  rows = []
  for name in names:
    backbone = spade_jax.load_backbone(name, weights=None)
    timing = time_calls(lambda b=backbone: b(images), repeats)
    flops = _xla_flops(backbone.apply, backbone.variables, images)
    rows.append({"backbone": name, "batch": batch, "image_size": image_size,
                 "images_per_s": batch / timing["median_s"],
                 "gflop_per_image": None if flops is None else flops / batch / 1e9,
                 "gflops": None if flops is None else gflops(flops, timing["median_s"]),
                 **timing})
    del backbone
  return {"rows": rows}


def _xla_flops(fn: Callable[..., Any], *args) -> float | None:
  try:
    cost = jax.jit(fn).lower(*args).cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost.get("flops") if cost else None


# ----------------------------------------------------------------------------------
# 2. knn against the matmul rate.


def _chunk_starts(m: int, chunk: int) -> list[tuple[int, int]]:
  return [(s, min(chunk, m - s)) for s in range(0, m, chunk)]


@functools.partial(jax.jit, static_argnames=("size",))
def _dot_chunk(q: jax.Array, g: jax.Array, start: jax.Array, size: int) -> jax.Array:
  """[Q, D] x rows [start, start + size) of g -> [Q, size]: one plain jnp.dot."""
  return jnp.dot(q, lax.dynamic_slice_in_dim(g, start, size).T)


def jax_dot_pass(q: jax.Array, g: jax.Array, chunk: int) -> jax.Array:
  """JAX's own matmul: q @ g.T chunk by chunk, each [Q, chunk] block materialised."""
  out = None
  for start, size in _chunk_starts(g.shape[0], chunk):
    out = _dot_chunk(q, g, jnp.int32(start), size)
    out.block_until_ready()  # One block alive at a time, like knn.
  return out


def _blas_info() -> list[dict[str, Any]] | str:
  try:
    import threadpoolctl  # pylint: disable=import-outside-toplevel
  except ImportError:
    return "unknown (pip install threadpoolctl)"
  keys = ("internal_api", "version", "architecture", "num_threads", "threading_layer")
  return [{k: info.get(k) for k in keys} for info in threadpoolctl.threadpool_info()
          if info.get("user_api") == "blas"]


def numpy_matmul_server(queries: int, gallery: int, dim: int, chunks: Sequence[int],
                        seed_queries: int, seed_gallery: int) -> None:
  """Child side of NumpyMatmul: NumPy q @ g.T in chunks into a preallocated block.

  Prints READY {blas info}; then each stdin line CHUNK runs one pass and answers DONE;
  an empty line or EOF ends it.
  """
  q = np.random.default_rng(seed_queries).standard_normal((queries, dim), np.float32)
  g = np.random.default_rng(seed_gallery).standard_normal((gallery, dim), np.float32)
  outs = {c: np.empty((queries, c), np.float32) for c in chunks}
  info = {"blas": _blas_info(), "env": {n: os.environ.get(n) for n in _BLAS_ENV_UNSET}}
  print("READY " + json.dumps(info), flush=True)
  for line in sys.stdin:
    if not line.strip():
      break
    chunk = int(line)
    for start, size in _chunk_starts(gallery, chunk):
      np.matmul(q, g[start:start + size].T, out=outs[chunk][:, :size])
    print("DONE", flush=True)


class NumpyMatmul:
  """NumPy's matmul rate, measured in a subprocess with a clean BLAS environment.

  The subprocess stays up so that its passes take turns with the JAX ones
  (time_interleaved); only one side computes at a time.
  """

  def __init__(self, **kwargs):
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--serve",
           "numpy_matmul", json.dumps(kwargs)]
    self._proc = subprocess.Popen(cmd, env=_worker_env(None, clean_blas=True),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self.info = json.loads(self._read("READY "))

  def _read(self, prefix: str) -> str:
    for line in self._proc.stdout:
      if line.startswith(prefix):
        return line[len(prefix):]
    raise RuntimeError(f"NumPy reference exited ({self._proc.wait()}) before {prefix!r}")

  def run(self, chunk: int) -> None:
    self._proc.stdin.write(f"{chunk}\n")
    self._proc.stdin.flush()
    self._read("DONE")

  def close(self) -> None:
    if self._proc.poll() is None:
      self._proc.stdin.close()
      self._proc.wait(timeout=60)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def knn_blocking(queries: int, gallery: int) -> dict[str, Any]:
  """knn's default blocking for this shape, for the report (its API has changed before)."""
  out: dict[str, Any] = {"chunk": None, "query_block": None}
  if hasattr(neighbors, "default_blocks"):
    chunk, query_block = neighbors.default_blocks(queries, gallery)
    out = {"chunk": int(chunk), "query_block": int(query_block)}
  elif hasattr(neighbors, "default_chunk_size"):
    out["chunk"] = int(neighbors.default_chunk_size(queries, gallery))
  return out


def cpu_kernel_info() -> dict[str, Any]:
  """Whether knn's default ("auto") path runs the CPU kernel here, and its blocking."""
  used = jax.default_backend() == "cpu" and cpu_kernel.available()
  return {"cpu_kernel": used, "why_not": "" if used else (
      cpu_kernel.unavailable_reason() or f"backend is {jax.default_backend()}"),
          "kernel_query_block": cpu_kernel.QUERY_BLOCK, "kernel_sub_chunk": cpu_kernel.SUB_CHUNK}


@functools.partial(jax.jit, static_argnames=("k", "query_block", "sub_chunk"))
def kernel_search(q: jax.Array, g: jax.Array, *, k: int, query_block: int,
                  sub_chunk: int) -> tuple[jax.Array, jax.Array]:
  """knn's CPU-kernel search (as in neighbors.local_knn, L2) with explicit sgemm blocks;
  for the blocking sweep only (proxies, no exact recompute)."""
  metric = distances.L2
  bank, extra = cpu_kernel.gallery_parts(metric, g)
  best = (jnp.full((q.shape[0], k), jnp.inf, jnp.float32),
          jnp.full((q.shape[0], k), -1, jnp.int32))
  return cpu_kernel.topk(metric.embed_queries(q), bank[None], extra[None],
                         jnp.zeros((1,), jnp.int32), *best, query_block=query_block,
                         sub_chunk=sub_chunk)


def _rate(timing: dict[str, Any], flops: float, **extra) -> dict[str, Any]:
  return {**extra, "gflops": gflops(flops, timing["median_s"]),
          "gflops_best": gflops(flops, timing["min_s"]), **timing}


def knn_section(queries: int, gallery: int, dim: int, k: int, repeats: int,
                ref_chunks: Sequence[int] | None = None,
                kernel_blocks: Sequence[tuple[int, int]] = ()) -> dict[str, Any]:
  """spade_jax.knn GFLOP/s vs NumPy's and jnp.dot's matmul rate, same shapes, same run.

  knn runs twice: its default path (the CPU kernel, when it is built and the backend is
  CPU) and kernel="xla". kernel_blocks: (query_block, sub_chunk) pairs of the CPU
  kernel to time as well (kernel_search). All of them take turns, so a load change on
  a shared machine hits all of them.
  """
  q, g = random_normal(1, (queries, dim)), random_normal(2, (gallery, dim))
  flops = 2.0 * queries * gallery * dim
  blocking = knn_blocking(queries, gallery)
  kernel = cpu_kernel_info()
  chunks = sorted({min(c, gallery) for c in (ref_chunks or (blocking["chunk"] or 2048, 8192))})
  sweep = [(qb, sc) for qb, sc in kernel_blocks if kernel["cpu_kernel"]]
  with NumpyMatmul(queries=queries, gallery=gallery, dim=dim, chunks=chunks,
                   seed_queries=1, seed_gallery=2) as ref:
    fns = {"knn": lambda: spade_jax.knn(q, g, k, check_finite_inputs=False),
           "knn_xla": lambda: spade_jax.knn(q, g, k, check_finite_inputs=False,
                                            kernel="xla")}
    fns.update({f"jax_dot/{c}": functools.partial(jax_dot_pass, q, g, c) for c in chunks})
    fns.update({f"numpy/{c}": functools.partial(ref.run, c) for c in chunks})
    fns.update({f"kernel/{qb}x{sc}": functools.partial(
        kernel_search, q, g, k=k, query_block=qb, sub_chunk=sc) for qb, sc in sweep})
    timings = time_interleaved(fns, repeats)
    blas = ref.info
  knn = _rate(timings["knn"], flops, **blocking, **kernel)
  knn_xla = _rate(timings["knn_xla"], flops, **blocking)
  dots = [_rate(timings[f"jax_dot/{c}"], flops, chunk=c) for c in chunks]
  nps = [_rate(timings[f"numpy/{c}"], flops, chunk=c) for c in chunks]
  jax_dot = max(dots, key=lambda d: d["gflops"])
  numpy_ref = {**max(nps, key=lambda d: d["gflops"]), **blas}
  swept = [_rate(timings[f"kernel/{qb}x{sc}"], flops, query_block=qb, sub_chunk=sc)
           for qb, sc in sweep]
  for row in swept:
    row["vs_numpy"] = row["gflops"] / numpy_ref["gflops"]
  return {"queries": queries, "gallery": gallery, "dim": dim, "k": k, "flops": flops,
          "knn": knn, "knn_xla": knn_xla, "jax_dot": jax_dot, "numpy": numpy_ref,
          "jax_dot_all": dots, "numpy_all": nps, "kernel_blocks": swept,
          "parent_blas_env": {n: os.environ.get(n) for n in _BLAS_ENV_UNSET},
          "target": KNN_TARGET,
          "knn_vs_numpy": knn["gflops"] / numpy_ref["gflops"],
          "knn_vs_numpy_best": knn["gflops_best"] / numpy_ref["gflops_best"],
          "knn_vs_jax_dot": knn["gflops"] / jax_dot["gflops"],
          "knn_xla_vs_numpy": knn_xla["gflops"] / numpy_ref["gflops"],
          "knn_xla_vs_jax_dot": knn_xla["gflops"] / jax_dot["gflops"],
          "jax_dot_vs_numpy": jax_dot["gflops"] / numpy_ref["gflops"],
          "meets_target": knn["gflops"] / numpy_ref["gflops"] >= KNN_TARGET,
          "meets_target_best": knn["gflops_best"] / numpy_ref["gflops_best"] >= KNN_TARGET}


# ----------------------------------------------------------------------------------
# 3. Pixel scoring.


def pyramid_shapes(grid: int, channels: Sequence[int]) -> dict[str, tuple[int, int, int]]:
  """{'layer1': (grid, grid, C1), 'layer2': (grid/2, grid/2, C2), ...} (WRN50-2 at 224)."""
  return {f"layer{i + 1}": (grid >> i, grid >> i, c) for i, c in enumerate(channels)}


def pyramid_features(num_images: int, shapes: dict[str, tuple[int, int, int]],
                     seed: int) -> dict[str, jax.Array]:
  return {level: random_normal(seed + i, (num_images, *shape))
          for i, (level, shape) in enumerate(shapes.items())}


def pixel_flops(shapes: dict[str, tuple[int, int, int]], k_images: int, combine: str) -> float:
  """Matmul FLOPs of one test image's pixel scores (2 * positions * gallery * depth)."""
  if combine == "cat":
    h, w, _ = max(shapes.values(), key=lambda s: s[0] * s[1])
    depth = sum(s[2] for s in shapes.values())
    return 2.0 * (h * w) * (k_images * h * w) * depth
  return sum(2.0 * (h * w) * (k_images * h * w) * c for h, w, c in shapes.values())


def make_pixel_fn(combine: str, k_images: int, num_test: int, shapes, image_size: int,
                  sigma: float, train_images: int | None = None) -> Callable[[], jax.Array]:
  """Inputs on the device + a call: pixel_scores of num_test images, then anomaly maps.

  The training set holds train_images (default k_images) images; each test image's K
  neighbours are spread evenly over it.
  """
  train_images = train_images or k_images
  test = pyramid_features(num_test, shapes, seed=10)
  train = pyramid_features(train_images, shapes, seed=20)
  nbrs = np.arange(k_images, dtype=np.int32) * (train_images // k_images)
  nbrs = jnp.asarray(np.tile(nbrs[None], (num_test, 1)))

  def run():
    scores = spade_jax.pixel_scores(test, train, nbrs, kappa=1, combine=combine,
                                    check_finite_inputs=False)
    return spade_jax.anomaly_maps(scores, (image_size, image_size), sigma=sigma)

  return run


def pixel_section(k_images: int, num_test: int, grid: int, channels: Sequence[int],
                  combine_modes: Sequence[str], repeats: int, image_size: int = 224,
                  sigma: float = 4.0) -> dict[str, Any]:
  """Seconds per test image of pixel_scores + anomaly_maps (no backbone), random features."""
  shapes = pyramid_shapes(grid, channels)
  rows = []
  for combine in combine_modes:
    run = make_pixel_fn(combine, k_images, num_test, shapes, image_size, sigma)
    timing = time_calls(run, repeats)
    flops = pixel_flops(shapes, k_images, combine)
    per_image = timing["median_s"] / num_test
    rows.append({"combine": combine, "k_images": k_images, "num_test": num_test,
                 "s_per_image": per_image, "gflop_per_image": flops / 1e9,
                 "gflops": gflops(flops, per_image), **timing})
    del run
    gc.collect()
  maps = random_normal(3, (num_test, grid, grid))
  map_timing = time_calls(
      lambda: spade_jax.anomaly_maps(maps, (image_size, image_size), sigma=sigma), repeats)
  return {"shapes": {k: list(v) for k, v in shapes.items()}, "image_size": image_size,
          "rows": rows, "anomaly_map_s_per_image": map_timing["median_s"] / num_test}


# ----------------------------------------------------------------------------------
# 4. Weak scaling over fake CPU devices.


def scaling_worker(devices: int, queries: int, rows_per_device: int, dim: int, k: int,
                   repeats: int) -> dict[str, Any]:
  """In a process with `devices` devices: knn on a sharded vs an unsharded gallery."""
  if jax.device_count() != devices:
    return {"status": f"error: expected {devices} devices, found {jax.device_count()}"}
  try:
    from spade_jax import sharding  # pylint: disable=import-outside-toplevel
  except ImportError:
    return {"status": "unavailable: spade_jax.sharding missing"}
  q = random_normal(1, (queries, dim))
  g = random_normal(2, (devices * rows_per_device, dim))
  mesh = jax.make_mesh((devices,), ("data",))
  sharded_gallery = sharding.shard_gallery(g, mesh, axis="data")
  search = lambda gallery: spade_jax.knn(q, gallery, k, check_finite_inputs=False)  # noqa: E731
  timings = time_interleaved({"sharded": lambda: search(sharded_gallery),
                              "unsharded": lambda: search(g)}, repeats)
  sharded, plain = timings["sharded"], timings["unsharded"]
  idx_sharded, idx_plain = np.asarray(search(sharded_gallery)[1]), np.asarray(search(g)[1])
  return {"status": "ok", "devices": devices, "gallery_rows": devices * rows_per_device,
          "sharded": sharded, "unsharded": plain,
          "indices_match": float(np.mean(idx_sharded == idx_plain))}


def scaling_section(device_counts: Sequence[int], queries: int, rows_per_device: int,
                    dim: int, k: int, repeats: int) -> dict[str, Any]:
  """Weak scaling: gallery = rows_per_device * N rows, N fake devices, one process each."""
  rows = []
  for n in device_counts:
    res = run_worker("scaling", {"devices": n, "queries": queries,
                                 "rows_per_device": rows_per_device, "dim": dim, "k": k,
                                 "repeats": repeats}, device_count=n,
                     extra_env={"JAX_PLATFORMS": "cpu"})  # Fake devices are CPU ones.
    res.setdefault("devices", n)
    rows.append(res)
    if res.get("status", "").startswith("unavailable"):
      return {"status": res["status"], "rows": rows}
  ok = [r for r in rows if r.get("status") == "ok"]
  t1 = next((r["sharded"]["median_s"] for r in ok if r["devices"] == 1), None)
  for r in ok:
    t_n = r["sharded"]["median_s"]
    r["sharded_over_unsharded"] = t_n / r["unsharded"]["median_s"]
    if t1 is not None:
      r["efficiency"] = t1 / t_n
      r["work_normalized_efficiency"] = r["devices"] * t1 / t_n
  status = "ok" if len(ok) == len(rows) else "partial"
  return {"status": status, "queries": queries, "rows_per_device": rows_per_device,
          "dim": dim, "k": k, "platform": jax.devices()[0].platform, "rows": rows}


# ----------------------------------------------------------------------------------
# 5. Peak memory while scoring.


def _current_rss() -> int:
  with open("/proc/self/statm", encoding="ascii") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB.


def _vm_hwm() -> int:
  """The address space's RSS high-water mark (VmHWM), which clear_refs resets.

  getrusage's ru_maxrss is max(VmHWM, the HWM recorded when any thread of the process
  exited); XLA's pools start and end threads, so after a reset ru_maxrss can still
  report an older, higher peak. VmHWM is the same counter without that term.
  """
  with open("/proc/self/status", encoding="ascii") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  return _maxrss()


def _reset_peak_rss() -> bool:
  """Resets the kernel's RSS high-water mark (VmHWM, ru_maxrss) to the current RSS."""
  try:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
      f.write("5")
    return True
  except OSError:
    return False


class _RssSampler:
  """Fallback when the high-water mark cannot be reset: polls RSS every millisecond."""

  def __init__(self):
    self.peak = _current_rss()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._poll, daemon=True)

  def _poll(self):
    while not self._stop.wait(0.001):
      self.peak = max(self.peak, _current_rss())

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, _current_rss())


def _device_bytes(key: str) -> int | None:
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  return None if not stats else stats.get(key)


MEMORY_KINDS = ("knn", "pixel", "pixel_k")


def memory_worker(kind: str, scale: int, queries: int, rows: int, dim: int,
                  k_images: int, train_images: int, grid: int, channels: Sequence[int]
                  ) -> dict[str, Any]:
  """Working set of one scoring call = peak RSS during it - RSS with inputs built.

  kind "knn": knn(queries [Q, D], gallery [scale * rows, D], 1).
  kind "pixel": ensemble pixel_scores + anomaly maps of one test image, K = k_images,
    against a training set (memory bank) of scale * train_images images.
  kind "pixel_k": the same with K = scale * k_images: the per-test gallery grows.
  The call runs once first (compile), so the measured call's peak holds only the
  scoring buffers.
  """
  if kind not in MEMORY_KINDS:
    raise ValueError(f"kind must be one of {MEMORY_KINDS}, got {kind!r}")
  if kind == "knn":
    q, g = random_normal(1, (queries, dim)), random_normal(2, (scale * rows, dim))
    gallery_bytes = g.nbytes
    run = lambda: spade_jax.knn(q, g, 1, check_finite_inputs=False)  # noqa: E731
  else:
    shapes = pyramid_shapes(grid, channels)
    k = scale * k_images if kind == "pixel_k" else k_images
    m = k if kind == "pixel_k" else scale * train_images
    run = make_pixel_fn("ensemble", k, 1, shapes, 224, 4.0, train_images=m)
    gallery_bytes = sum(m * h * w * c * 4 for h, w, c in shapes.values())
  jax.block_until_ready(run())
  gc.collect()
  inputs_rss = _current_rss()
  device_before = _device_bytes("bytes_in_use")
  reset = _reset_peak_rss()
  with _RssSampler() if not reset else _NullContext() as sampler:
    jax.block_until_ready(run())
  peak = _vm_hwm() if reset else sampler.peak
  device_peak = _device_bytes("peak_bytes_in_use")
  return {"kind": kind, "scale": scale, "gallery_bytes": gallery_bytes,
          "inputs_rss_bytes": inputs_rss, "peak_rss_bytes": peak,
          "working_set_bytes": peak - inputs_rss,
          "ru_maxrss_bytes": _maxrss(),
          "peak_method": "VmHWM after clear_refs reset" if reset else "RSS polling (1 ms)",
          "device_bytes_before": device_before, "device_peak_bytes": device_peak}


class _NullContext:

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def memory_section(kinds: Sequence[str], scales: Sequence[int], queries: int, rows: int,
                   dim: int, k_images: int, train_images: int, grid: int,
                   channels: Sequence[int]) -> dict[str, Any]:
  """Working set while scoring as the gallery grows; each point in a fresh process.

  MALLOC_MMAP_THRESHOLD_ fixes glibc's mmap threshold, so freed large buffers go back
  to the OS and RSS follows live allocations (otherwise the warm-up call's freed
  blocks stay cached in the heap and hide the working set).
  """
  out: dict[str, Any] = {"rows": [], "ratios": {}}
  for kind in kinds:
    points = []
    for scale in scales:
      res = run_worker("memory", {"kind": kind, "scale": scale, "queries": queries,
                                  "rows": rows, "dim": dim, "k_images": k_images,
                                  "train_images": train_images, "grid": grid,
                                  "channels": list(channels)},
                       device_count=None, extra_env={"MALLOC_MMAP_THRESHOLD_": "131072"})
      res.setdefault("kind", kind)
      res.setdefault("scale", scale)
      points.append(res)
    good = [p for p in points if "working_set_bytes" in p]
    if len(good) >= 2:
      # Largest over smallest working set at any two sizes (stricter than last / first).
      sets = [max(p["working_set_bytes"], 1) for p in good]
      scales_ok = [p["scale"] for p in good]
      ratio = max(sets) / min(sets)
      out["ratios"][kind] = {"gallery_growth": max(scales_ok) / min(scales_ok),
                             "working_set_ratio": ratio,
                             "last_over_first": sets[-1] / sets[0],
                             "flat": ratio <= MEMORY_FLAT_LIMIT}
    out["rows"].extend(points)
  out["limit"] = MEMORY_FLAT_LIMIT
  return out


# ----------------------------------------------------------------------------------
# 6. Precision options: bfloat16 distances, approx_min_k.


def _bf16_terms(x: jax.Array) -> jax.Array:
  """[N, 1] float32 -> [N, 3] bfloat16 whose float32 sum is x (to ~2^-24 relative)."""
  hi = x.astype(jnp.bfloat16)
  rest = x - hi.astype(jnp.float32)
  mid = rest.astype(jnp.bfloat16)
  lo = (rest - mid.astype(jnp.float32)).astype(jnp.bfloat16)
  return jnp.concatenate([hi, mid, lo], axis=-1)


def _l2_bf16_embed_queries(q: jax.Array) -> jax.Array:
  """[-2q, 1, 1, 1] in bfloat16 (the ones pick up the three terms of |g|^2)."""
  ones = jnp.ones(q.shape[:-1] + (3,), jnp.bfloat16)
  return jnp.concatenate([(-2.0 * q).astype(jnp.bfloat16), ones], axis=-1)


def _l2_bf16_embed_gallery(g: jax.Array) -> jax.Array:
  """[g, |g|^2 as three bf16 terms]: only q.g is rounded, the norm stays float32-exact."""
  g = g.astype(jnp.float32)
  norms = jnp.sum(g * g, axis=-1, keepdims=True)
  return jnp.concatenate([g.astype(jnp.bfloat16), _bf16_terms(norms)], axis=-1)


def _round_to_bf16(x: jax.Array) -> jax.Array:
  return x.astype(jnp.bfloat16).astype(jnp.float32)


@functools.lru_cache(maxsize=None)
def bf16_metrics() -> dict[str, distances.Metric]:
  """Two L2 variants registered through the Metric interface (cached: one jit each).

  Both embed in bfloat16, so Metric.pairwise (a dot with float32 accumulation) runs
  as a bf16 matmul; the float32 sum of three bf16 terms carries |g|^2 exactly.
  * l2_bf16_matmul: only the ranking matmul is bf16; the selected neighbours'
    distances are recomputed exactly in float32 (Metric.exact on f32 rows).
  * l2_bf16_inputs: the features are rounded to bf16 first (as if stored in bf16), so
    ranking and reported distances both see the rounded values.
  """
  l2 = distances.get_metric("l2")
  matmul = distances.Metric("l2_bf16_matmul", l2.prepare, _l2_bf16_embed_queries,
                            _l2_bf16_embed_gallery, l2.finalize, l2.exact)
  inputs = distances.Metric("l2_bf16_inputs", _round_to_bf16, _l2_bf16_embed_queries,
                            _l2_bf16_embed_gallery, l2.finalize, l2.exact)
  return {m.name: distances.register_metric(m, overwrite=True) for m in (matmul, inputs)}


def _merge(vals_a, idx_a, vals_b, idx_b, k):
  vals, idx = lax.sort((jnp.concatenate([vals_a, vals_b], 1),
                        jnp.concatenate([idx_a, idx_b], 1)), dimension=1, num_keys=2)
  return vals[:, :k], idx[:, :k]


@functools.partial(jax.jit, static_argnames=("k", "chunk", "recall_target"))
def approx_knn(q: jax.Array, g: jax.Array, *, k: int, chunk: int,
               recall_target: float) -> tuple[jax.Array, jax.Array]:
  """Streamed L2 search with lax.approx_min_k per chunk; exact f32 recompute at the end.

  q: [Q, D], g: [M, D] -> (distances [Q, k] ascending, indices [Q, k] int32).
  """
  m = g.shape[0]
  num_full, tail = divmod(m, chunk)

  def select(rows, offset, best):
    proxy = jnp.sum(rows * rows, 1)[None, :] - 2.0 * jnp.dot(q, rows.T)
    vals, idx = lax.approx_min_k(proxy, k, recall_target=recall_target)
    return _merge(*best, vals, idx.astype(jnp.int32) + offset, k)

  best = (jnp.full((q.shape[0], k), jnp.inf), jnp.full((q.shape[0], k), -1, jnp.int32))
  best = lax.fori_loop(
      0, num_full,
      lambda j, b: select(lax.dynamic_slice_in_dim(g, j * chunk, chunk), j * chunk, b), best)
  if tail:
    best = select(g[num_full * chunk:], num_full * chunk, best)
  idx = best[1]
  dist = jnp.sqrt(jnp.sum((q[:, None, :] - g[jnp.maximum(idx, 0)]) ** 2, axis=-1))
  return lax.sort((dist, idx), dimension=1, num_keys=2)


def accuracy(exact: tuple[Any, Any], approx: tuple[Any, Any]) -> dict[str, float]:
  """recall@k of indices and relative error of the j-th distances vs exact search."""
  d_e, i_e = (np.asarray(a) for a in exact)
  d_a, i_a = (np.asarray(a) for a in approx)
  recall = np.mean(np.sum(i_a[:, :, None] == i_e[:, None, :], axis=(1, 2)) / i_e.shape[1])
  rel = np.abs(d_a.astype(np.float64) - d_e) / np.maximum(d_e, 1e-12)
  return {"recall_at_k": float(recall), "max_rel_dist_err": float(rel.max()),
          "mean_rel_dist_err": float(rel.mean())}


def precision_section(queries: int, gallery: int, dim: int, k: int, repeats: int,
                      recall_target: float = 0.95) -> dict[str, Any]:
  """Speed and accuracy loss of bf16 distances and approx_min_k vs exact f32 knn."""
  q, g = random_normal(1, (queries, dim)), random_normal(2, (gallery, dim))
  flops = 2.0 * queries * gallery * dim
  chunk = min(gallery, max(128, (1 << 23) // queries // 128 * 128))  # ~32 MiB blocks.
  metrics = bf16_metrics()
  variants = {
      "exact_f32": lambda: spade_jax.knn(q, g, k, check_finite_inputs=False),
      "bf16_matmul": lambda: spade_jax.knn(q, g, k, metrics["l2_bf16_matmul"],
                                           check_finite_inputs=False),
      "bf16_inputs": lambda: spade_jax.knn(q, g, k, metrics["l2_bf16_inputs"],
                                           check_finite_inputs=False),
      "approx_min_k": lambda: approx_knn(q, g, k=k, chunk=chunk,
                                         recall_target=recall_target),
  }
  timings = time_interleaved(variants, repeats)
  exact = jax.device_get(variants["exact_f32"]())
  rows = [{"variant": name, **_rate(timings[name], flops),
           **accuracy(exact, jax.device_get(fn()))} for name, fn in variants.items()]
  base = rows[0]["median_s"]
  for row in rows:
    row["speedup_vs_exact"] = base / row["median_s"]
  return {"queries": queries, "gallery": gallery, "dim": dim, "k": k, "chunk": chunk,
          "recall_target": recall_target, "platform": jax.devices()[0].platform,
          "approx_lowering": _approx_lowering(k, recall_target), "rows": rows}


def _approx_lowering(k: int, recall_target: float) -> str:
  """'fallback (exact)' where XLA lowers approx_min_k to an exact top-k (CPU, GPU)."""
  text = jax.jit(lambda x: lax.approx_min_k(x, k, recall_target=recall_target)).lower(
      jnp.zeros((8, 1024), jnp.float32)).as_text()
  return "fallback (exact top-k)" if "is_fallback = true" in text else "native"


# ----------------------------------------------------------------------------------
# The suite and its Markdown.

SECTION_FUNCTIONS: dict[str, Callable[..., dict[str, Any]]] = {
    "backbone": backbone_section, "knn": knn_section, "pixel": pixel_section,
    "scaling": scaling_section, "memory": memory_section, "precision": precision_section,
}


def run_suite(section_kwargs: dict[str, dict[str, Any]],
              log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs the named sections in SECTIONS order; an exception is recorded, not raised."""
  unknown = sorted(set(section_kwargs) - set(SECTIONS))
  if unknown:
    raise ValueError(f"unknown sections {unknown}; valid: {', '.join(SECTIONS)}")
  results: dict[str, Any] = {"machine": machine_info(), "sections": {}}
  for name in SECTIONS:
    if name not in section_kwargs:
      continue
    log(f"[benchmark] {name} ...")
    start = time.perf_counter()
    try:
      res = SECTION_FUNCTIONS[name](**section_kwargs[name])
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      res = {"status": f"error: {type(e).__name__}: {e}"}
    res["params"] = section_kwargs[name]
    res["wall_s"] = time.perf_counter() - start
    results["sections"][name] = res
    log(f"[benchmark] {name} done in {res['wall_s']:.1f} s")
  results["machine"]["load_avg_end"] = list(os.getloadavg())
  return results


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return lines


def _f(x: Any, digits: int = 3) -> str:
  if x is None:
    return "-"
  if isinstance(x, bool):
    return "yes" if x else "NO"
  if isinstance(x, float):
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:.0f}"
  return str(x)


def _mib(x: int | None) -> str:
  return "-" if x is None else f"{x / _MIB:.1f}"


def _md_backbone(r):
  rows = [[x["backbone"], x["batch"], x["image_size"], _f(x["images_per_s"]),
           _f(x["median_s"]), _f(x["gflop_per_image"]), _f(x["gflops"]),
           _f(x["first_call_s"])] for x in r["rows"]]
  return _table(["backbone", "batch", "image", "images/s", "s / batch (median)",
                 "GFLOP / image (XLA)", "GFLOP/s", "first call s (compile)"], rows)


def _md_knn(r):
  knn, dot, ref = r["knn"], r["jax_dot"], r["numpy"]
  qb = f" x {knn['query_block']} queries" if knn.get("query_block") else ""
  knn_xla = r.get("knn_xla")
  if knn.get("cpu_kernel"):
    name = "spade_jax.knn (CPU kernel)"
    block = (f"whole gallery; sgemm blocks {knn['kernel_query_block']} queries x "
             f"{knn['kernel_sub_chunk']} rows")
  else:
    name = "spade_jax.knn" + (f" (no CPU kernel: {knn['why_not']})" if "why_not" in knn else "")
    block = f"{knn['chunk']}{qb}"
  rows = [[name, block, _f(knn["median_s"]), _f(knn["gflops"]), _f(knn["gflops_best"]),
           _f(r["knn_vs_numpy"]), _f(r["knn_vs_jax_dot"])]]
  if knn_xla:
    rows.append(['spade_jax.knn kernel="xla"', f"{knn_xla['chunk']}{qb}",
                 _f(knn_xla["median_s"]), _f(knn_xla["gflops"]), _f(knn_xla["gflops_best"]),
                 _f(r["knn_xla_vs_numpy"]), _f(r["knn_xla_vs_jax_dot"])])
  rows += [["jnp.dot in chunks (jit)", dot["chunk"], _f(dot["median_s"]), _f(dot["gflops"]),
            _f(dot["gflops_best"]), _f(r["jax_dot_vs_numpy"]), "1"],
           ["NumPy q @ g.T in chunks", ref["chunk"], _f(ref["median_s"]), _f(ref["gflops"]),
            _f(ref["gflops_best"]), "1", _f(1 / r["jax_dot_vs_numpy"])]]
  blas = ref["blas"]
  if isinstance(blas, list):
    blas = ", ".join(f"{b['internal_api']} {b['version']}, kernel {b['architecture']}, "
                     f"{b['num_threads']} threads" for b in blas)
  lines = [f"Q={r['queries']} M={r['gallery']} D={r['dim']} k={r['k']}; FLOPs = 2QMD = "
           f"{r['flops'] / 1e9:.1f} GFLOP per search; runs interleaved."]
  lines += _table(["kernel", "chunk", "median s", "GFLOP/s (median)", "GFLOP/s (best)",
                   "/ NumPy", "/ jnp.dot"], rows)
  lines.append(f"\nNumPy BLAS (subprocess, {' and '.join(_BLAS_ENV_UNSET)} unset): {blas}. "
               f"knn / NumPy = {r['knn_vs_numpy']:.2f} from medians, "
               f"{r['knn_vs_numpy_best']:.2f} from the best run of each; target >= "
               f"{r['target']}: {'met' if r['meets_target'] else 'NOT met'} (median), "
               f"{'met' if r['meets_target_best'] else 'NOT met'} (best).")
  if r.get("kernel_blocks"):
    lines += ["", "CPU kernel blocking (kernel_search: the kernel's stream alone, no exact "
              "recompute; same run):", ""]
    lines += _table(["queries per sgemm", "gallery rows per sgemm", "block MiB",
                     "GFLOP/s (median)", "/ NumPy"],
                    [[b["query_block"], b["sub_chunk"],
                      _f(b["query_block"] * b["sub_chunk"] * 4 / _MIB, 2), _f(b["gflops"]),
                      _f(b["vs_numpy"])] for b in r["kernel_blocks"]])
  return lines


def _md_pixel(r):
  rows = [[x["combine"], x["k_images"], x["num_test"], _f(x["s_per_image"]),
           _f(x["gflop_per_image"]), _f(x["gflops"]), _f(x["first_call_s"])]
          for x in r["rows"]]
  lines = [f"Levels {r['shapes']}, kappa 1, maps upsampled to {r['image_size']}^2 + "
           "Gaussian sigma 4 (included)."]
  lines += _table(["combine", "K", "test images", "s / test image", "matmul GFLOP / image",
                   "GFLOP/s", "first call s"], rows)
  lines.append(f"\nAnomaly map alone (upsample + blur): "
               f"{r['anomaly_map_s_per_image'] * 1e3:.2f} ms / image.")
  return lines


def _md_scaling(r):
  if r.get("status") not in ("ok", "partial"):
    return [f"Status: {r.get('status')}"]
  rows = []
  for x in r["rows"]:
    if x.get("status") != "ok":
      rows.append([x["devices"], "-", "-", "-", "-", "-", "-", x.get("status")])
      continue
    rows.append([x["devices"], x["gallery_rows"], _f(x["sharded"]["median_s"]),
                 _f(x["unsharded"]["median_s"]), _f(x["sharded_over_unsharded"]),
                 _f(x.get("efficiency")), _f(x.get("work_normalized_efficiency")),
                 _f(x["indices_match"])])
  lines = [f"Status: {r['status']}. Queries {r.get('queries')} x D={r.get('dim')}, k="
           f"{r.get('k')}, {r.get('rows_per_device')} gallery rows per device."]
  lines += _table(["devices N", "gallery rows", "sharded s", "unsharded s (same gallery)",
                   "sharded / unsharded", "efficiency t1/tN", "N*t1/tN", "indices match"],
                  rows)
  return lines


def _md_memory(r):
  rows = [[x["kind"], x["scale"], _mib(x.get("gallery_bytes")), _mib(x.get("inputs_rss_bytes")),
           _mib(x.get("peak_rss_bytes")), _mib(x.get("working_set_bytes")),
           _mib(x.get("device_peak_bytes")), x.get("peak_method", x.get("status"))]
          for x in r["rows"]]
  lines = ["Working set = peak RSS during one scoring call - RSS with the inputs built "
           "(after a warm-up call). knn: gallery rows grow; pixel: training images in "
           "the memory bank grow, K fixed; pixel_k: K (the per-test-image gallery) grows."]
  lines += _table(["kind", "gallery scale", "gallery MiB", "RSS with inputs MiB",
                   "peak RSS MiB", "working set MiB", "device peak MiB", "method"], rows)
  for kind, ratio in r["ratios"].items():
    lines.append(f"\n{kind}: gallery x{ratio['gallery_growth']:.0f} -> working set "
                 f"max/min x{ratio['working_set_ratio']:.2f} (largest/smallest gallery "
                 f"x{ratio['last_over_first']:.2f}; limit {r['limit']}): "
                 f"{'flat' if ratio['flat'] else 'NOT flat'}.")
  return lines


def _md_precision(r):
  rows = [[x["variant"], _f(x["median_s"]), _f(x["gflops"]), _f(x["speedup_vs_exact"]),
           _f(x["recall_at_k"], 4), _f(x["max_rel_dist_err"]), _f(x["mean_rel_dist_err"])]
          for x in r["rows"]]
  lines = [f"Q={r['queries']} M={r['gallery']} D={r['dim']} k={r['k']}, random N(0,1) "
           f"features (a hard case: distances concentrate); approx_min_k recall_target="
           f"{r['recall_target']}, lowering on {r['platform']}: {r['approx_lowering']}."]
  if r["platform"] == "cpu":
    lines.append("On CPU the bf16 variants are emulated: the operands are rounded to bf16 "
                 "and multiplied in f32 (XLA, or the CPU kernel's sgemm), so they show the "
                 "accuracy loss of bf16 but no speedup (expect one on GPU/TPU).")
  lines += _table(["variant", "median s", "GFLOP/s", "speed vs exact", "recall@k",
                   "max rel dist err", "mean rel dist err"], rows)
  return lines


_MD_SECTIONS = {"backbone": ("Backbone throughput", _md_backbone),
                "knn": ("kNN vs matmul rate", _md_knn),
                "pixel": ("Pixel scoring (no backbone)", _md_pixel),
                "scaling": ("Weak scaling on fake devices", _md_scaling),
                "memory": ("Peak memory while scoring", _md_memory),
                "precision": ("Precision options", _md_precision)}


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
    title, render = _MD_SECTIONS[name]
    lines += ["", f"## {title}", ""]
    if str(res.get("status", "")).startswith("error"):
      lines.append(f"Status: {res['status']}")
      continue
    lines += render(res)
    lines.append(f"\n(section wall time {res['wall_s']:.0f} s)")
  return "\n".join(lines) + "\n"


def _load(avg) -> str:
  return "-" if not avg else "/".join(f"{a:.2f}" for a in avg)


WORKERS: dict[str, Callable[..., dict[str, Any]]] = {
    "scaling": scaling_worker,
    "memory": memory_worker,
}


SERVERS: dict[str, Callable[..., None]] = {"numpy_matmul": numpy_matmul_server}


def _worker_main(argv: Sequence[str]) -> int:
  """`--worker NAME JSON`: print BENCH_RESULT {json}; `--serve NAME JSON`: serve stdin."""
  table = {"--worker": WORKERS, "--serve": SERVERS}.get(argv[1] if len(argv) > 1 else "")
  if len(argv) != 4 or table is None or argv[2] not in table:
    print(f"usage: {argv[0]} --worker {{{','.join(WORKERS)}}} JSON | "
          f"--serve {{{','.join(SERVERS)}}} JSON", file=sys.stderr)
    return 2
  try:
    result = table[argv[2]](**json.loads(argv[3]))
  except Exception:  # pylint: disable=broad-except
    traceback.print_exc()
    return 1
  if argv[1] == "--worker":
    print(_RESULT_PREFIX + json.dumps(result), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(_worker_main(sys.argv))
