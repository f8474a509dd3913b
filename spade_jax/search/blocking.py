"""How the kNN search blocks, and at what precision it multiplies.

* Blocking / BLOCKINGS: the gallery chunk, the query block and the per-block selection
  of the XLA search, per platform ("cpu", "gpu", "tpu"); neighbors.local_knn picks the
  entry of the platform it is lowered for (blocking="auto") or the one it is given.
* precision="bf16": the proxy block as bfloat16 products with float32 accumulation
  (bf16_pairwise) and a shortlist of candidates (bf16_shortlist) re-ranked by the exact
  float32 distance (neighbors.exact_recompute).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from spade_jax.search import matmul

Array = jax.Array

# Default blocking (tuned on a 2-core AVX-512 CPU, layer1 shape of K = 50): gallery
# chunks of ~_CHUNK rows, compared with ~_BLOCK_ELEMENTS // chunk queries at a time, so
# one [query_block, chunk] proxy block is ~9 MiB: big enough for a full-speed matmul
# and few loop steps, small enough to be re-read from cache by the selection.
_CHUNK = 6144
_BLOCK_ELEMENTS = 6144 * 400


@dataclasses.dataclass(frozen=True)
class Blocking:
  """How the XLA search blocks and selects on one kind of device (BLOCKINGS).

  Attributes:
    name: the key in BLOCKINGS.
    chunk: target gallery rows per chunk (a near divisor of the gallery is taken).
    block_elements: target entries of one [query_block, chunk] proxy block; with
      max_query_block set, the chunk is block_elements // query_block instead of `chunk`.
    max_query_block: None: query_block = block_elements // chunk (cache-sized blocks, the
      CPU's); else all queries up to this many per block, and the chunk follows.
    selection: per-block selection: "groups" (minima of groups of 32 columns, then
      lax.top_k over the k best groups, _chunk_topk) or "top_k" (lax.top_k over the
      whole block; one op, which a GPU runs well).
    multiple: chunk sizes are multiples of this.
  """
  name: str
  chunk: int
  block_elements: int
  max_query_block: int | None
  selection: str
  multiple: int

  def blocks(self, num_queries: int, gallery_size: int) -> tuple[int, int]:
    """(chunk_size, query_block) for a [num_queries, D] x [gallery_size, D] search."""
    if self.max_query_block is None:
      if gallery_size <= self.chunk * 3 // 2:
        chunk = max(1, gallery_size)
      else:
        chunk = _near_divisor(gallery_size, self.chunk, self.multiple)
      return chunk, _query_block(num_queries, chunk, self.block_elements)
    query_block = max(1, min(num_queries, self.max_query_block))
    target = max(self.multiple, self.block_elements // query_block)
    if gallery_size <= target * 3 // 2:
      return max(1, gallery_size), query_block
    return _near_divisor(gallery_size, target, self.multiple), query_block


# Search blocking per platform. "cpu" (also the default for other platforms) is tuned on
# a 2-core AVX-512 CPU (above) and is what the CPU lowering of kernel="xla" uses. "gpu":
# all queries (up to 4096) against ~32 MiB proxy blocks and lax.top_k over each block,
# the form that ran 1.76x faster than the CPU blocking on an H200 (BENCHMARKS.md,
# precision section: approx_min_k's exact fallback). "tpu": the same large blocks with
# the grouped selection (reductions rather than a sort over each row); not measured.
BLOCKINGS = {
    "cpu": Blocking("cpu", _CHUNK, _BLOCK_ELEMENTS, None, "groups", 32),
    "gpu": Blocking("gpu", 1 << 13, 1 << 23, 4096, "top_k", 128),
    "tpu": Blocking("tpu", 1 << 13, 1 << 23, 4096, "groups", 128),
}
# knn's `blocking` argument: "auto" picks BLOCKINGS' entry of the platform the program
# is lowered for (cpu; cuda and rocm: gpu; tpu), or one entry for every platform.
BLOCKING_CHOICES = ("auto",) + tuple(BLOCKINGS)
# knn's `precision`: "float32" (exact) or "bf16": the proxies as bfloat16 products with
# float32 accumulation (the norms' column in float32), a shortlist of candidates
# (bf16_shortlist) re-ranked by the exact float32 distance.
PRECISIONS = ("float32", "bf16")


def _near_divisor(total: int, target: int, multiple: int) -> int:
  """A multiple of `multiple` dividing `total` within [target/2, 3*target/2], closest to
  target (no ragged last block), else target rounded to `multiple`."""
  lo, hi = max(multiple, target // 2), target * 3 // 2
  best = None
  for c in range(lo // multiple * multiple, hi + 1, multiple):
    if c >= lo and total % c == 0 and (best is None or abs(c - target) < abs(best - target)):
      best = c
  return best if best is not None else max(multiple, round(target / multiple) * multiple)


def _query_block(num_queries: int, chunk_size: int, block_elements: int) -> int:
  target = max(8, block_elements // max(chunk_size, 1))
  if num_queries <= target * 3 // 2:
    return max(1, num_queries)
  return _near_divisor(num_queries, target, 8)


def default_query_block(num_queries: int, chunk_size: int) -> int:
  """Queries per [query_block, chunk_size] proxy block (~_BLOCK_ELEMENTS entries)."""
  return _query_block(num_queries, chunk_size, _BLOCK_ELEMENTS)


def default_blocks(num_queries: int, gallery_size: int) -> tuple[int, int]:
  """(chunk_size, query_block) for a [num_queries, D] x [gallery_size, D] search (the
  CPU blocking, BLOCKINGS["cpu"])."""
  return BLOCKINGS["cpu"].blocks(num_queries, gallery_size)


def bf16_shortlist(k: int, gallery_size: int) -> int:
  """Candidates a precision="bf16" search keeps per query before the float32 re-ranking:
  k + max(k, 16), at most the gallery."""
  return min(gallery_size, k + max(k, 16))


def bf16_pairwise(query_embeddings: Array, gallery_embeddings: Array,
                  prepared_dim: int) -> Array:
  """The proxy block of precision="bf16": [Q, E] x [C, E] -> [Q, C] float32.

  The gallery embedding is the prepared rows [C, D'] plus extra columns (a Metric with
  gallery_extra, such as L2's |g|^2): the rows' product is taken in bfloat16 with float32
  accumulation, the extra columns' (norms, large next to the products) in float32.
  """
  d = prepared_dim
  rows = jnp.matmul(query_embeddings[:, :d].astype(jnp.bfloat16),
                    gallery_embeddings[:, :d].astype(jnp.bfloat16).T,
                    preferred_element_type=jnp.float32)
  if gallery_embeddings.shape[1] == d:
    return rows
  return rows + matmul.dot_t(query_embeddings[:, d:], gallery_embeddings[:, d:])


def check_precision(precision: str, metric: Any) -> None:
  if precision not in PRECISIONS:
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
  if precision == "bf16" and (getattr(metric, "gallery_extra", None) is None
                              or not getattr(metric, "matmul_proxy", True)):
    raise ValueError(f"precision='bf16' needs a metric whose gallery embedding is its rows "
                     f"plus extra columns (l2, sqeuclidean, cosine; L2 kernels), got "
                     f"{metric!r:.100}")


def check_search_options(blocking: str, precision: str, metric: Any) -> None:
  """ValueError unless `blocking` is in BLOCKING_CHOICES and `precision` in PRECISIONS
  (bf16 only for a metric it supports); Python, before tracing."""
  if blocking not in BLOCKING_CHOICES:
    raise ValueError(f"blocking must be one of {BLOCKING_CHOICES}, got {blocking!r}")
  check_precision(precision, metric)


def explicit_blocks(num_queries: int, gallery_size: int, chunk_size: int | None,
                    query_block: int | None) -> tuple[int | None, int | None]:
  """(chunk_size, query_block) given by the caller, the other completed by the CPU rule;
  (None, None) when neither is given: the blocking of the platform decides (local_knn)."""
  if chunk_size is None and query_block is None:
    return None, None
  default_chunk, _ = default_blocks(num_queries, gallery_size)
  chunk_size = default_chunk if chunk_size is None else min(int(chunk_size), gallery_size)
  if query_block is None:
    query_block = default_query_block(num_queries, chunk_size)
  return chunk_size, max(1, min(int(query_block), num_queries))
