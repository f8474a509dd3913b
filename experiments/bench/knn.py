"""kNN against the matmul rate: spade_jax.knn GFLOP/s vs NumPy's and jnp.dot's q @ g.T.

The references stream the same product over gallery chunks with one output block alive
at a time, as knn must: NumPy in a subprocess with a clean BLAS environment
(NumpyMatmul, served by numpy_matmul_server), and jnp.dot under jit. knn runs on its
default path and with kernel="xla"; kernel_search times the CPU kernel's stream alone
for other sgemm blockings. All of them take turns in the same rounds.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
import json
import os
import subprocess
import sys
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

import spade_jax

# Internal modules: knn's default blocking, the CPU kernel, the L2 Metric.
from spade_jax.search import cpu_kernel, distances, neighbors

from . import common

TITLE = "kNN vs matmul rate"
TARGET = 0.85  # issue 3: knn at >= 85% of the matmul rate.


def _chunk_starts(m: int, chunk: int) -> list[tuple[int, int]]:
  """(start, size) of the chunks of `chunk` rows covering m rows."""
  return [(s, min(chunk, m - s)) for s in range(0, m, chunk)]


@functools.partial(jax.jit, static_argnames=("size", "precision"))
def _dot_chunk(q: jax.Array, g: jax.Array, start: jax.Array, size: int,
               precision: lax.Precision | None = lax.Precision.HIGHEST) -> jax.Array:
  """[Q, D] x rows [start, start + size) of g -> [Q, size]: one plain jnp.dot, at full
  float32 precision as knn's (precision=None: the backend's default, TF32 on GPUs)."""
  return jnp.dot(q, lax.dynamic_slice_in_dim(g, start, size).T, precision=precision)


def jax_dot_pass(q: jax.Array, g: jax.Array, chunk: int,
                 precision: lax.Precision | None = lax.Precision.HIGHEST) -> jax.Array:
  """JAX's own matmul: q @ g.T chunk by chunk, each [Q, chunk] block materialised."""
  out = None
  for start, size in _chunk_starts(g.shape[0], chunk):
    out = _dot_chunk(q, g, jnp.int32(start), size, precision)
    out.block_until_ready()  # One block alive at a time, like knn.
  return out


def _blas_info() -> list[dict[str, Any]] | str:
  """The BLAS libraries threadpoolctl sees in this process (kernel, threads)."""
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
  info = {"blas": _blas_info(),
          "env": {n: os.environ.get(n) for n in common.BLAS_ENV_UNSET}}
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
    cmd = common.worker_command("--serve", "numpy_matmul", kwargs)
    self._proc = subprocess.Popen(cmd, env=common.worker_env(None, clean_blas=True),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self.info = json.loads(self._read("READY "))

  def _read(self, prefix: str) -> str:
    for line in self._proc.stdout:
      if line.startswith(prefix):
        return line[len(prefix):]
    raise RuntimeError(f"NumPy reference exited ({self._proc.wait()}) before {prefix!r}")

  def run(self, chunk: int) -> None:
    """One pass over the gallery in `chunk`-row blocks."""
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
  bank, extra, _ = cpu_kernel.gallery_parts(metric, g)
  best = (jnp.full((q.shape[0], k), jnp.inf, jnp.float32),
          jnp.full((q.shape[0], k), -1, jnp.int32))
  return cpu_kernel.topk(metric.embed_queries(q), bank[None], extra[None],
                         jnp.zeros((1,), jnp.int32), *best, query_block=query_block,
                         sub_chunk=sub_chunk)


def section(queries: int, gallery: int, dim: int, k: int, repeats: int,
            ref_chunks: Sequence[int] | None = None,
            kernel_blocks: Sequence[tuple[int, int]] = ()) -> dict[str, Any]:
  """spade_jax.knn GFLOP/s vs NumPy's and jnp.dot's matmul rate, same shapes, same run.

  knn runs twice: its default path (the CPU kernel, when it is built and the backend is
  CPU) and kernel="xla". kernel_blocks: (query_block, sub_chunk) pairs of the CPU
  kernel to time as well (kernel_search). All of them take turns, so a load change on
  a shared machine hits all of them.
  """
  q, g = common.random_normal(1, (queries, dim)), common.random_normal(2, (gallery, dim))
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
    if jax.default_backend() != "cpu":  # On CPUs the default is full float32 already.
      fns.update({f"jax_dot_default/{c}": functools.partial(jax_dot_pass, q, g, c,
                                                            precision=None) for c in chunks})
    fns.update({f"numpy/{c}": functools.partial(ref.run, c) for c in chunks})
    fns.update({f"kernel/{qb}x{sc}": functools.partial(
        kernel_search, q, g, k=k, query_block=qb, sub_chunk=sc) for qb, sc in sweep})
    timings = common.time_interleaved(fns, repeats)
    blas = ref.info
  rate = common.rate
  knn = rate(timings["knn"], flops, **blocking, **kernel)
  knn_xla = rate(timings["knn_xla"], flops, **blocking)
  dots = [rate(timings[f"jax_dot/{c}"], flops, chunk=c) for c in chunks]
  nps = [rate(timings[f"numpy/{c}"], flops, chunk=c) for c in chunks]
  jax_dot = max(dots, key=lambda d: d["gflops"])
  defaults = [rate(timings[f"jax_dot_default/{c}"], flops, chunk=c) for c in chunks
              if f"jax_dot_default/{c}" in timings]
  jax_dot_default = max(defaults, key=lambda d: d["gflops"]) if defaults else None
  numpy_ref = {**max(nps, key=lambda d: d["gflops"]), **blas}
  swept = [rate(timings[f"kernel/{qb}x{sc}"], flops, query_block=qb, sub_chunk=sc)
           for qb, sc in sweep]
  for row in swept:
    row["vs_numpy"] = row["gflops"] / numpy_ref["gflops"]
  return {"queries": queries, "gallery": gallery, "dim": dim, "k": k, "flops": flops,
          "knn": knn, "knn_xla": knn_xla, "jax_dot": jax_dot, "numpy": numpy_ref,
          "jax_dot_default_precision": jax_dot_default,
          "jax_dot_all": dots, "numpy_all": nps, "kernel_blocks": swept,
          "parent_blas_env": {n: os.environ.get(n) for n in common.BLAS_ENV_UNSET},
          "target": TARGET,
          "knn_vs_numpy": knn["gflops"] / numpy_ref["gflops"],
          "knn_vs_numpy_best": knn["gflops_best"] / numpy_ref["gflops_best"],
          "knn_vs_jax_dot": knn["gflops"] / jax_dot["gflops"],
          "knn_xla_vs_numpy": knn_xla["gflops"] / numpy_ref["gflops"],
          "knn_xla_vs_jax_dot": knn_xla["gflops"] / jax_dot["gflops"],
          "jax_dot_vs_numpy": jax_dot["gflops"] / numpy_ref["gflops"],
          "meets_target": knn["gflops"] / numpy_ref["gflops"] >= TARGET,
          "meets_target_best": knn["gflops_best"] / numpy_ref["gflops_best"] >= TARGET}


def markdown(r: dict[str, Any]) -> list[str]:
  """The rates table, the BLAS line and the CPU kernel's blocking table."""
  f = common.fmt
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
  rows = [[name, block, f(knn["median_s"]), f(knn["gflops"]), f(knn["gflops_best"]),
           f(r["knn_vs_numpy"]), f(r["knn_vs_jax_dot"])]]
  if knn_xla:
    rows.append(['spade_jax.knn kernel="xla"', f"{knn_xla['chunk']}{qb}",
                 f(knn_xla["median_s"]), f(knn_xla["gflops"]), f(knn_xla["gflops_best"]),
                 f(r["knn_xla_vs_numpy"]), f(r["knn_xla_vs_jax_dot"])])
  rows.append(["jnp.dot in chunks (jit, HIGHEST)", dot["chunk"], f(dot["median_s"]),
               f(dot["gflops"]), f(dot["gflops_best"]), f(r["jax_dot_vs_numpy"]), "1"])
  low = r.get("jax_dot_default_precision")
  if low:
    rows.append(["jnp.dot, the backend's default precision (TF32 on GPUs)", low["chunk"],
                 f(low["median_s"]), f(low["gflops"]), f(low["gflops_best"]),
                 f(low["gflops"] / ref["gflops"]), f(low["gflops"] / dot["gflops"])])
  rows += [["NumPy q @ g.T in chunks", ref["chunk"], f(ref["median_s"]), f(ref["gflops"]),
            f(ref["gflops_best"]), "1", f(1 / r["jax_dot_vs_numpy"])]]
  blas = ref["blas"]
  if isinstance(blas, list):
    blas = ", ".join(f"{b['internal_api']} {b['version']}, kernel {b['architecture']}, "
                     f"{b['num_threads']} threads" for b in blas)
  lines = [f"Q={r['queries']} M={r['gallery']} D={r['dim']} k={r['k']}; FLOPs = 2QMD = "
           f"{r['flops'] / 1e9:.1f} GFLOP per search; runs interleaved."]
  lines += common.table(["kernel", "chunk", "median s", "GFLOP/s (median)", "GFLOP/s (best)",
                         "/ NumPy", "/ jnp.dot"], rows)
  lines.append(f"\nNumPy BLAS (subprocess, {' and '.join(common.BLAS_ENV_UNSET)} unset): "
               f"{blas}. knn / NumPy = {r['knn_vs_numpy']:.2f} from medians, "
               f"{r['knn_vs_numpy_best']:.2f} from the best run of each; target >= "
               f"{r['target']}: {'met' if r['meets_target'] else 'NOT met'} (median), "
               f"{'met' if r['meets_target_best'] else 'NOT met'} (best).")
  if r.get("kernel_blocks"):
    lines += ["", "CPU kernel blocking (kernel_search: the kernel's stream alone, no exact "
              "recompute; same run):", ""]
    lines += common.table(["queries per sgemm", "gallery rows per sgemm", "block MiB",
                           "GFLOP/s (median)", "/ NumPy"],
                          [[b["query_block"], b["sub_chunk"],
                            f(b["query_block"] * b["sub_chunk"] * 4 / common.MIB, 2),
                            f(b["gflops"]), f(b["vs_numpy"])] for b in r["kernel_blocks"]])
  return lines
