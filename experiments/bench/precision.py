"""Precision options: speed and accuracy (recall@k, distance error) of bfloat16
distances and lax.approx_min_k against exact float32 knn, timed taking turns."""

from __future__ import annotations

import functools
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

import spade_jax
from spade_jax.search import distances  # Internal module: get_metric.

from . import common

TITLE = "Precision options"


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
  """x rounded to bfloat16, back in float32."""
  return x.astype(jnp.bfloat16).astype(jnp.float32)


@functools.cache
def bf16_metrics() -> dict[str, spade_jax.Metric]:
  """Two L2 variants registered through the Metric interface (cached: one jit each).

  Both embed in bfloat16, so Metric.pairwise (a dot with float32 accumulation) runs
  as a bf16 matmul; the float32 sum of three bf16 terms carries |g|^2 exactly.
  * l2_bf16_matmul: only the ranking matmul is bf16; the selected neighbours'
    distances are recomputed exactly in float32 (Metric.exact on f32 rows).
  * l2_bf16_inputs: the features are rounded to bf16 first (as if stored in bf16), so
    ranking and reported distances both see the rounded values.
  """
  l2 = distances.get_metric("l2")
  matmul = spade_jax.Metric("l2_bf16_matmul", l2.prepare, _l2_bf16_embed_queries,
                            _l2_bf16_embed_gallery, l2.finalize, l2.exact)
  inputs = spade_jax.Metric("l2_bf16_inputs", _round_to_bf16, _l2_bf16_embed_queries,
                            _l2_bf16_embed_gallery, l2.finalize, l2.exact)
  return {m.name: spade_jax.register_metric(m, overwrite=True) for m in (matmul, inputs)}


def _merge(vals_a, idx_a, vals_b, idx_b, k):
  """The k smallest (value, index) pairs of two [Q, k] candidate lists."""
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
    proxy = (jnp.sum(rows * rows, 1)[None, :]
             - 2.0 * jnp.dot(q, rows.T, precision=lax.Precision.HIGHEST))
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


def section(queries: int, gallery: int, dim: int, k: int, repeats: int,
            recall_target: float = 0.95) -> dict[str, Any]:
  """Speed and accuracy loss of bf16 distances and approx_min_k vs exact f32 knn."""
  q, g = common.random_normal(1, (queries, dim)), common.random_normal(2, (gallery, dim))
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
      # knn's own options: the CPU blocking on every platform (the default before the
      # per-platform blocking), and precision="bf16" (bf16 proxies, float32 re-ranking
      # of a shortlist).
      "exact_f32_cpu_blocking": lambda: spade_jax.knn(q, g, k, check_finite_inputs=False,
                                                      blocking="cpu", kernel="xla"),
      "knn_bf16_shortlist": lambda: spade_jax.knn(q, g, k, check_finite_inputs=False,
                                                  precision="bf16"),
  }
  timings = common.time_interleaved(variants, repeats)
  exact = jax.device_get(variants["exact_f32"]())
  rows = [{"variant": name, **common.rate(timings[name], flops),
           **accuracy(exact, jax.device_get(fn()))} for name, fn in variants.items()]
  base = rows[0]["median_s"]
  for row in rows:
    row["speedup_vs_exact"] = base / row["median_s"]
  return {"queries": queries, "gallery": gallery, "dim": dim, "k": k, "chunk": chunk,
          "recall_target": recall_target, "platform": jax.devices()[0].platform,
          "approx_lowering": _approx_lowering(k, recall_target), "rows": rows,
          "structured": structured_recall(min(queries, 1000), min(gallery, 20000), dim)}


def structured_features(n: int, dim: int, seed: int, rank: int = 32) -> np.ndarray:
  """[n, dim] CNN-like features: ReLU of a rank-`rank` map (fixed, seed 0) of N(0, 1)
  codes plus a bias, and N(0, 0.1^2) noise; rows of seed `seed`."""
  basis = np.random.default_rng(0)
  w = basis.normal(size=(rank, dim)).astype(np.float32) / np.sqrt(rank)
  bias = 0.5 * basis.normal(size=dim).astype(np.float32)
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(n, rank)).astype(np.float32)
  return np.maximum(z @ w + bias, 0) + 0.1 * rng.normal(size=(n, dim)).astype(np.float32)


def structured_recall(queries: int, gallery: int, dim: int,
                      ks: tuple[int, ...] = (1, 5, 50)) -> list[dict[str, Any]]:
  """recall@k of knn(precision="bf16") and of plain bf16 proxies (bf16_matmul: no
  shortlist) against exact search on structured_features."""
  q, g = structured_features(queries, dim, 1), structured_features(gallery, dim, 2)
  bf16 = bf16_metrics()["l2_bf16_matmul"]
  rows = []
  for k in ks:
    exact = jax.device_get(spade_jax.knn(q, g, k))
    for name, fn in (("knn_bf16_shortlist", lambda: spade_jax.knn(q, g, k, precision="bf16")),
                     ("bf16_matmul", lambda: spade_jax.knn(q, g, k, bf16))):
      rows.append({"variant": name, "k": k, "queries": queries, "gallery": gallery,
                   **accuracy(exact, jax.device_get(fn()))})
  return rows


def _approx_lowering(k: int, recall_target: float) -> str:
  """'fallback (exact)' where XLA lowers approx_min_k to an exact top-k (CPU, GPU)."""
  text = jax.jit(lambda x: lax.approx_min_k(x, k, recall_target=recall_target)).lower(
      jnp.zeros((8, 1024), jnp.float32)).as_text()
  return "fallback (exact top-k)" if "is_fallback = true" in text else "native"


def markdown(r: dict[str, Any]) -> list[str]:
  """The setting, the CPU emulation note and the per-variant table."""
  f = common.fmt
  rows = [[x["variant"], f(x["median_s"]), f(x["gflops"]), f(x["speedup_vs_exact"]),
           f(x["recall_at_k"], 4), f(x["max_rel_dist_err"]), f(x["mean_rel_dist_err"])]
          for x in r["rows"]]
  lines = [f"Q={r['queries']} M={r['gallery']} D={r['dim']} k={r['k']}, random N(0,1) "
           f"features (a hard case: distances concentrate); approx_min_k recall_target="
           f"{r['recall_target']}, lowering on {r['platform']}: {r['approx_lowering']}."]
  if r["platform"] == "cpu":
    lines.append("On CPU the bf16 variants are emulated: the operands are rounded to bf16 "
                 "and multiplied in f32 (XLA, or the CPU kernel's sgemm), so they show the "
                 "accuracy loss of bf16 but no speedup (expect one on GPU/TPU).")
  lines += common.table(["variant", "median s", "GFLOP/s", "speed vs exact", "recall@k",
                         "max rel dist err", "mean rel dist err"], rows)
  structured = r.get("structured") or []
  if structured:
    x0 = structured[0]
    lines += ["", f"Recall on structured features (structured_features: ReLU of a rank-32 "
              f"map plus noise, Q={x0['queries']} M={x0['gallery']} D={r['dim']}):"]
    lines += common.table(["variant", "k", "recall@k", "max rel dist err"],
                          [[x["variant"], x["k"], f(x["recall_at_k"], 4),
                            f(x["max_rel_dist_err"])] for x in structured])
  return lines
