"""The CPU kNN kernel: a gallery merged into a running top-k, at sgemm speed.

On CPU the streamed search is one big matmul, and XLA:CPU's matmul reaches only about
half of an optimised BLAS sgemm (BENCHMARKS.md). `spade_jax/csrc/knn_cpu.cc` is an
XLA FFI custom call that computes each proxy block with the sgemm SciPy ships
(`scipy.linalg.cython_blas`, OpenBLAS in SciPy's wheels) a cache-sized block at a
time, one block per core, and selects from the block while it is in cache. It is
built by setup.py when a C++17 compiler is available; without it, or with
SPADE_JAX_CPU_KERNEL=0 in the environment, the search runs in XLA alone. Results are
the same either way up to the proxies' rounding (the reported distances are
recomputed exactly in both).

`neighbors.local_knn` (one call for the whole gallery, read in place) and
`neighbors.stream_topk` (one call per gathered chunk, e.g. the K images of pixel
scoring) call `topk` through `lax.platform_dependent`, so only CPU lowerings use it;
GPU and TPU lowerings never see the custom call.

For L2 and sqeuclidean the search is translated (neighbors.search_center): the
kernel takes a center c and multiplies bank rows minus c, copied a sub-chunk at a
time, so the matmul form does not cancel on features with a large common offset.

The selection's minimum scan has AVX-512, AVX2 and portable versions, chosen from the
CPU; SPADE_JAX_CPU_KERNEL_ISA (or set_isa) forces one, so that every path a user's
CPU may take is tested on one machine.

While a search runs, SciPy's OpenBLAS is set to one thread (our threads run one
single-threaded sgemm per core instead); its setting is restored when the last
search finishes, and is also how many threads the kernel uses.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from spade_jax.search import distances

Array = jax.Array

TARGET = "spade_topk_f32"
ENV_SWITCH = "SPADE_JAX_CPU_KERNEL"
ENV_ISA = "SPADE_JAX_CPU_KERNEL_ISA"
ISAS = ("auto", "avx512", "avx2", "portable")

# Queries and gallery rows per sgemm block: a [512, 512] float32 block is 1 MiB, so it
# is still in L2 when the selection reads it; bigger blocks gain little sgemm speed
# (BENCHMARKS.md, "kNN blocking").
QUERY_BLOCK = 512
SUB_CHUNK = 512


def _sgemm_address() -> int:
  """Address of SciPy's Fortran sgemm (from its documented Cython BLAS capsule)."""
  from scipy.linalg import cython_blas  # pylint: disable=import-outside-toplevel
  capsule = cython_blas.__pyx_capi__["sgemm"]  # pylint: disable=no-member
  get_name = ctypes.pythonapi.PyCapsule_GetName
  get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
  get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
  get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object,
                                                               ctypes.c_char_p]
  return int(get_pointer(capsule, get_name(capsule)))


@functools.cache
def _load() -> tuple[bool, str]:
  """Builds the registration once: (available, why not)."""
  if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
    return False, f"disabled by {ENV_SWITCH}"
  try:
    from spade_jax.search import _knn_cpu  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    return False, f"extension spade_jax.search._knn_cpu not built ({e})"
  try:
    _knn_cpu.set_sgemm(_sgemm_address())
  except Exception as e:  # pylint: disable=broad-except
    return False, f"no usable sgemm from scipy.linalg.cython_blas ({e})"
  isa = os.environ.get(ENV_ISA, "auto").strip().lower() or "auto"
  try:
    _knn_cpu.set_isa(isa)
  except ValueError as e:
    return False, f"{ENV_ISA}={isa!r}: {e}"
  for name, capsule in _knn_cpu.handlers().items():
    jax.ffi.register_ffi_target(name, capsule, platform="cpu")
  return True, ""


# > 0 inside xla_only(): searches traced there run in XLA alone.
_XLA_ONLY_DEPTH = 0


def available() -> bool:
  """Whether the CPU kernel is built, enabled and registered (False inside xla_only())."""
  return _XLA_ONLY_DEPTH == 0 and _load()[0]


def unavailable_reason() -> str:
  """Why `available()` is False ("" if it is True)."""
  if _XLA_ONLY_DEPTH:
    return "turned off by cpu_kernel.xla_only() (a portable program is being traced)"
  return _load()[1]


@contextlib.contextmanager
def xla_only():
  """Functions traced inside search in XLA alone, with no custom call on any platform.

  For programs that must run on any jax install (spade_jax.export_detector): their CPU
  lowering then holds no call to this kernel. JAX keys its trace caches on arguments,
  not on this switch, so its caches are cleared on entry (no trace made with the
  kernel is reused inside) and on exit (no XLA-only trace is reused outside); later
  calls compile again (or load from the persistent compilation cache). Not for use
  from several threads at once.
  """
  global _XLA_ONLY_DEPTH
  jax.clear_caches()
  _XLA_ONLY_DEPTH += 1
  try:
    yield
  finally:
    _XLA_ONLY_DEPTH -= 1
    jax.clear_caches()


def isa() -> str:
  """The instruction set of the kernel's selection ("avx512", "avx2" or "portable")."""
  if not available():
    raise RuntimeError(f"spade_jax's CPU kNN kernel is unavailable: {unavailable_reason()}")
  from spade_jax.search import _knn_cpu  # pylint: disable=import-outside-toplevel
  return _knn_cpu.isa()


def set_isa(name: str) -> str:
  """Forces the selection's instruction set (one of ISAS; "auto": the best this CPU
  has) and returns the one chosen. Results do not depend on it (the minimum is exact);
  this is for testing the paths other CPUs take.

  Raises:
    ValueError: an unknown name, or one this CPU does not support.
    RuntimeError: the kernel is unavailable.
  """
  if name not in ISAS:
    raise ValueError(f"isa must be one of {ISAS}, got {name!r}")
  if not available():
    raise RuntimeError(f"spade_jax's CPU kNN kernel is unavailable: {unavailable_reason()}")
  from spade_jax.search import _knn_cpu  # pylint: disable=import-outside-toplevel
  return _knn_cpu.set_isa(name)


def gallery_parts(metric: distances.Metric, rows: Array, center: Array | None = None
                  ) -> tuple[Array, Array, Array | None]:
  """Prepared rows [..., C, D] -> (rows part [..., C, D'], extra [..., C, X], center for
  topk) of the gallery embedding, as topk takes it: the rows themselves when the
  Metric has `gallery_extra`, else the whole embedding and no extra columns.

  With a center [D] (a translated search), the embedding is that of rows - center:
  the rows part stays the untranslated rows and topk subtracts the center as it reads
  them (returned as the third part), the extra columns are translated here; a whole
  embedding is translated here (the third part is then None)."""
  if metric.gallery_extra is not None:
    shifted = rows if center is None else rows - center
    return rows, metric.gallery_extra(shifted).astype(jnp.float32), center
  emb = metric.embed_gallery(rows if center is None else rows - center)
  return emb, jnp.zeros(emb.shape[:-1] + (0,), jnp.float32), None


def topk(query_embeddings: Array, bank: Array, extra: Array, blocks: Array,
         best_v: Array, best_i: Array, *, valid: Array | None = None,
         offset: int | Array = 0, center: Array | None = None,
         query_block: int = QUERY_BLOCK,
         sub_chunk: int = SUB_CHUNK) -> tuple[Array, Array]:
  """Merges a gallery into the running top-k of every query (CPU only).

  The gallery is a list of blocks of a bank: gallery row i * R + r is bank[blocks[i], r]
  (so a gallery can be the rows of a few training images, read in place). Its
  embedding is [bank[blocks[i], r] - center, extra[i, r]] (no center: 0).

  Args:
    query_embeddings: [Q, D + X] the Metric's query embeddings.
    bank: [B, R, D] gallery rows (the first D embedding columns).
    extra: [nb, R, X] the last X embedding columns (X may be 0), in gallery order.
    blocks: [nb] int32 bank blocks forming the gallery, in gallery order.
    best_v, best_i: [Q, k] running proxies (ascending, +inf = empty) and indices.
    valid: [nb, R] bool in gallery order (False rows are never taken; a stretch of
      rows without a valid one costs nothing) or None.
    offset: int32 scalar added to the gallery row numbers.
    center: optional [D] float32 subtracted from the bank rows as they are multiplied
      (a translated search; query_embeddings and extra must be translated likewise).
    query_block, sub_chunk: queries and rows per sgemm block.

  Returns:
    The updated (best_v, best_i): the k smallest (proxy, index) pairs of the old
    candidates and the gallery, ordered by value then index; a gallery candidate equal
    to the k-th best is not taken (its index is higher).

  Raises:
    RuntimeError: the kernel is not available (see unavailable_reason()).
  """
  if not available():
    raise RuntimeError(f"spade_jax's CPU kNN kernel is unavailable: {unavailable_reason()}")
  valid = jnp.zeros((0,), jnp.bool_) if valid is None else valid.astype(jnp.bool_)
  center = jnp.zeros((0,), jnp.float32) if center is None else center.astype(jnp.float32)
  call = jax.ffi.ffi_call(
      TARGET,
      (jax.ShapeDtypeStruct(best_v.shape, jnp.float32),
       jax.ShapeDtypeStruct(best_i.shape, jnp.int32)),
      input_output_aliases={7: 0, 8: 1},
      vmap_method="sequential")
  return call(query_embeddings.astype(jnp.float32), bank.astype(jnp.float32),
              extra.astype(jnp.float32), valid, jnp.asarray(blocks, jnp.int32),
              jnp.asarray(offset, jnp.int32), center, best_v, best_i,
              query_block=np.int64(query_block), sub_chunk=np.int64(sub_chunk))


def can_search_bank(metric: distances.Metric, bank: Array) -> bool:
  """Whether `search_bank` applies: the Metric's gallery embedding is the raw rows plus
  extra columns, and the bank is float32 (static, at trace time)."""
  return (metric.prepare_is_identity and metric.gallery_extra is not None
          and bank.dtype == jnp.float32)


def search_bank(query_embeddings: Array, bank: Array, blocks: Array, k: int,
                metric: distances.Metric, valid: Array | None = None,
                center: Array | None = None) -> tuple[Array, Array]:
  """Top-k (proxies, gallery rows) of a gallery made of bank blocks, read in place.

  Args:
    query_embeddings: [Q, E] the Metric's query embeddings.
    bank: [N, R, D] float32 raw rows (e.g. one pyramid level of every training image);
      requires can_search_bank(metric, bank).
    blocks: [nb] int32 bank blocks forming the gallery (e.g. the K nearest images).
    k: neighbours.
    metric: the Metric.
    valid: [nb, R] bool in gallery order, or None.
    center: optional [D] translation (neighbors.search_center); query_embeddings must
      be those of the translated queries.

  Returns:
    ([Q, k] proxies ascending, [Q, k] int32 gallery rows i * R + r), (+inf, -1) where
    fewer than k rows are valid.
  """
  # The extra columns of the nb blocks, one block at a time: bank[blocks] would be a
  # gathered copy of the whole gallery (XLA does not fuse a gather into the reduction).
  # Blocks without a valid row (e.g. images another device holds) are not read.
  def block_extra(i):
    rows = bank[i] if center is None else bank[i] - center
    return metric.gallery_extra(rows).astype(jnp.float32)

  if valid is None:
    extra = jax.lax.map(block_extra, blocks)
  else:
    shape = jax.eval_shape(block_extra, blocks[0])
    extra = jax.lax.map(
        lambda args: jax.lax.cond(args[1], block_extra,
                                  lambda _: jnp.zeros(shape.shape, shape.dtype), args[0]),
        (blocks, jnp.any(valid, axis=1)))
  q = query_embeddings.shape[0]
  empty = (jnp.full((q, k), jnp.inf, jnp.float32), jnp.full((q, k), -1, jnp.int32))
  return topk(query_embeddings, bank, extra, blocks, *empty, valid=valid, center=center)
