"""The public kNN search: one device, or a gallery sharded over a mesh.

`knn` runs the single-device search (neighbors.py) or, for a gallery sharded over a
mesh axis (spade_jax.shard_gallery), the sharded one (sharded_neighbors.py), which
returns the same neighbours. This module sits above both, so neither imports the other
back.
"""

from __future__ import annotations

import jax

from spade_jax.search import distances, neighbors, sharded_neighbors, sharding

Array = jax.Array


def knn(queries: Array, gallery: Array, k: int, metric: str | distances.Metric = "l2", *,
        chunk_size: int | None = None, query_block: int | None = None,
        check_finite_inputs: bool = True, kernel: str = "auto", blocking: str = "auto",
        precision: str = "float32") -> tuple[Array, Array]:
  """Exact k nearest gallery rows of each query, streamed over the gallery.

  Memory is O(Q * k + query_block * chunk_size); the [Q, M] distance matrix is never
  formed. jit-compiled once per (shapes, k, metric, chunk_size, query_block); vmappable.

  A gallery sharded over a mesh axis (a spade_jax.ShardedGallery, or a jax.Array split
  along axis 0 with a NamedSharding) is searched where it lies (sharded_neighbors.py);
  the results equal the single-device ones (neighbors.py) and come back replicated on
  the mesh.

  Args:
    queries: [Q, D] float.
    gallery: [M, D] float, or a sharded gallery.
    k: neighbours per query, 1 <= k <= M.
    metric: a name in spade_jax.METRICS ("l2", "sqeuclidean", "cosine") or a Metric.
    chunk_size: gallery rows per chunk (None, with query_block None: the blocking's
      default for these shapes, neighbors.BLOCKINGS; given alone, the other follows
      the CPU rule, default_blocks).
    query_block: queries compared with a chunk at a time (None: as chunk_size).
    check_finite_inputs: check for NaN/Inf (one device reduction per input). Pass False
      when the inputs are known to be finite to skip it.
    kernel: "auto": on CPU, each gallery chunk goes through spade_jax's sgemm-based
      kernel (cpu_kernel.py) when it is built; XLA elsewhere. "xla": XLA only.
    blocking: how the XLA search blocks and selects. "auto": by the platform the program
      is lowered for (neighbors.BLOCKINGS: "cpu" on CPUs and unknown platforms, "gpu" on
      cuda / rocm: all queries up to 4096 against ~32 MiB blocks with lax.top_k over
      each, "tpu" on TPUs: the same blocks, grouped selection). "cpu", "gpu" or "tpu":
      that entry on every platform (the CPU kernel only with "auto" / "cpu"). Every
      blocking is exact; only the speed differs.
    precision: "float32" (exact, the default) or "bf16": proxies from bfloat16 products
      (float32 accumulation; the norms in float32), the neighbours picked from a
      shortlist of blocking.bf16_shortlist(k, M) candidates re-ranked by the exact
      float32 distance: the distances returned are exact, the neighbours may miss a
      true one (recall in BENCHMARKS.md). l2, sqeuclidean, cosine and L2 kernels only;
      XLA only (no CPU kernel), meant for GPUs and TPUs.

  Returns:
    (distances [Q, k] float32 ascending, indices [Q, k] int32); equal distances are
    ordered by the lower index.

  Raises:
    ValueError: bad shapes, k outside [1, M], an empty gallery, unknown metric, a bad
      chunk_size / query_block, NaN/Inf in the inputs, a gallery sharded along another
      axis than axis 0, an unknown kernel, blocking or precision.
  """
  sharded = sharding.as_sharded(gallery)
  search = neighbors.knn if sharded is None else sharded_neighbors.knn
  return search(queries, gallery if sharded is None else sharded, k, metric,
                chunk_size=chunk_size, query_block=query_block,
                check_finite_inputs=check_finite_inputs, kernel=kernel, blocking=blocking,
                precision=precision)
