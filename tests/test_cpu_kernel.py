"""The CPU kNN kernel (spade_jax/csrc/knn_cpu.cc) against a NumPy reference of one
chunk merged into a running top-k."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference
import pytest
import tolerances

import spade_jax
from spade_jax.search import cpu_kernel, distances, neighbors

# CI builds the extension and sets this, so a broken build fails there instead of
# silently testing the XLA path twice.
REQUIRED = os.environ.get("SPADE_JAX_REQUIRE_CPU_KERNEL") == "1"

needs_kernel = pytest.mark.skipif(
    not cpu_kernel.available() and not REQUIRED,
    reason=f"CPU kernel unavailable: {cpu_kernel.unavailable_reason()}")


# The minimum scan's instruction sets a user's CPU may take: each is forced in turn on
# this machine (those it lacks are skipped; CI's AVX-512 machine runs all three).
ISAS = ("avx512", "avx2", "portable")


@pytest.fixture(params=ISAS)
def isa(request):
  if not cpu_kernel.available():
    pytest.skip(f"CPU kernel unavailable: {cpu_kernel.unavailable_reason()}")
  before = cpu_kernel.isa()
  try:
    chosen = cpu_kernel.set_isa(request.param)
  except ValueError as e:
    pytest.skip(str(e))
  assert chosen == request.param and cpu_kernel.isa() == request.param
  yield request.param
  cpu_kernel.set_isa(before)


def test_kernel_is_available_when_required():
  if not REQUIRED:
    pytest.skip("SPADE_JAX_REQUIRE_CPU_KERNEL is not 1")
  assert cpu_kernel.available(), cpu_kernel.unavailable_reason()


def _ref_merge(qe, bank, extra, blocks, valid, offset, best_v, best_i, center=None):
  """NumPy float64: gallery row i * R + r is [bank[blocks[i], r] - center, extra[i, r]];
  old candidates + the gallery's (proxy, offset + row), k best by (value, index); +inf
  never enters (an empty slot stays (+inf, -1))."""
  k = best_v.shape[1]
  rows = bank[blocks].astype(np.float64)
  if center is not None:
    rows = rows - center.astype(np.float32)  # The kernel's float32 subtraction is exact
    rows = rows.astype(np.float32)           # rounding of this difference.
  emb = np.concatenate([rows, extra], axis=-1).astype(np.float64)
  emb = emb.reshape(-1, emb.shape[-1])
  proxy = qe.astype(np.float64) @ emb.T
  if valid is not None:
    proxy = np.where(valid.reshape(-1)[None, :], proxy, np.inf)
  out_v, out_i = [], []
  for r in range(qe.shape[0]):
    cand = [(float(v), int(i)) for v, i in zip(best_v[r], best_i[r]) if np.isfinite(v)]
    cand += [(float(p), offset + c) for c, p in enumerate(proxy[r]) if np.isfinite(p)]
    cand.sort()
    cand = (cand + [(np.inf, -1)] * k)[:k]
    out_v.append([v for v, _ in cand])
    out_i.append([i for _, i in cand])
  return np.array(out_v), np.array(out_i, np.int32)


def _sorted_carry(rng, q, k, empty_tail, integer):
  vals = (rng.integers(-40, 0, (q, k)) if integer else rng.standard_normal((q, k)) * 10)
  vals = np.sort(vals.astype(np.float32), axis=1)
  ids = np.tile(np.arange(k, dtype=np.int32), (q, 1))  # Lower than every gallery index.
  if empty_tail:
    vals[:, k - empty_tail:] = np.inf
    ids[:, k - empty_tail:] = -1
  return vals, ids


@pytest.mark.parametrize(
    "q,bank_blocks,rows,d,x,blocks,k,query_block,sub_chunk,masked,integer,empty_tail", [
        (7, 1, 40, 5, 1, [0], 1, 3, 16, False, False, 1),     # k = 1: min + first index.
        (7, 1, 40, 5, 1, [0], 1, 512, 512, True, True, 0),    # ties, masked rows.
        (9, 3, 13, 4, 0, [2, 0, 2], 5, 4, 5, False, True, 2),  # ties across blocks.
        (9, 4, 10, 3, 2, [3, 1], 5, 2, 7, True, False, 5),    # X = 2, empty carry.
        (5, 2, 300, 3, 1, [1, 0], 20, 5, 64, True, True, 3),  # spans of 256, k > 16.
        (6, 2, 6, 2, 0, [1], 30, 1, 5, False, False, 30),     # k > gallery: stay empty.
        (600, 2, 25, 8, 1, [0, 1], 3, 16, 32, False, True, 0),  # several threads.
        (1, 1, 1, 1, 0, [0], 1, 1, 1, False, False, 1),
        (4, 2, 5, 3, 1, [], 2, 4, 4, False, False, 0),        # empty gallery: unchanged.
    ])
@pytest.mark.parametrize("centered", [False, True])
def test_topk_matches_reference(q, bank_blocks, rows, d, x, blocks, k, query_block,
                                sub_chunk, masked, integer, empty_tail, centered, isa):
  rng = np.random.default_rng(q * 131 + rows * 7 + k)
  draw = ((lambda shape: rng.integers(-2, 3, shape)) if integer  # exact proxies: real ties
          else (lambda shape: rng.standard_normal(shape)))
  qe = draw((q, d + x)).astype(np.float32)
  bank = draw((bank_blocks, rows, d)).astype(np.float32)
  blocks = np.asarray(blocks, np.int32)
  extra = draw((len(blocks), rows, x)).astype(np.float32)
  valid = rng.random((len(blocks), rows)) < 0.7 if masked else None
  if masked and len(blocks) > 1:
    valid[1] = False  # A block without a valid row is skipped.
  offset = 1000
  # A translated search: an integer center keeps integer data exact.
  center = (draw((d,)).astype(np.float32) + 7 if centered else None)
  best_v, best_i = _sorted_carry(rng, q, k, empty_tail, integer)
  ref_v, ref_i = _ref_merge(qe, bank, extra, blocks, valid, offset, best_v, best_i, center)
  out_v, out_i = jax.jit(lambda qe, b, e, bl, v, i, ok, c: cpu_kernel.topk(
      qe, b, e, bl, v, i, valid=ok, offset=offset, center=c, query_block=query_block,
      sub_chunk=sub_chunk))(qe, bank, extra, blocks, best_v, best_i,
                            None if valid is None else jnp.asarray(valid),
                            None if center is None else jnp.asarray(center))
  out_v, out_i = np.asarray(out_v), np.asarray(out_i)
  if integer:
    # Every product and partial sum is a small integer, exact in float32 whatever the
    # summation order: bit equality, and exact ties ordered by index.
    np.testing.assert_array_equal(out_v, ref_v.astype(np.float32))
    np.testing.assert_array_equal(out_i, ref_i)
  else:
    # sgemm's summation order is the BLAS build's and the CPU's: the proxies agree up
    # to the rounding of a (d + x)-term dot product, relative to sum |q_e| |e_g|.
    rows_ = bank[blocks] if center is None else bank[blocks] - center
    emb = np.concatenate([rows_, extra], -1).reshape(-1, d + x)
    scale = float((np.abs(qe) @ np.abs(emb).T).max()) if emb.size else 1.0
    tolerances.assert_same_neighbours(out_v, out_i, ref_v, ref_i, 0.0,
                                      tolerances.distance_rtol(d + x) * scale)


@needs_kernel
def test_topk_rejects_a_block_id_outside_the_bank():
  empty = (jnp.full((2, 1), jnp.inf), jnp.full((2, 1), -1, jnp.int32))
  with pytest.raises(Exception, match="block id out of range"):
    cpu_kernel.topk(jnp.ones((2, 3)), jnp.ones((2, 4, 3)), jnp.ones((2, 4, 0)),
                    jnp.array([0, 2], jnp.int32), *empty)[0].block_until_ready()


@needs_kernel
def test_topk_rejects_extra_not_in_gallery_order():
  empty = (jnp.full((2, 1), jnp.inf), jnp.full((2, 1), -1, jnp.int32))
  with pytest.raises(Exception, match="inconsistent shapes"):
    cpu_kernel.topk(jnp.ones((2, 3)), jnp.ones((3, 4, 2)), jnp.ones((3, 4, 1)),
                    jnp.array([0, 2], jnp.int32), *empty)[0].block_until_ready()


@needs_kernel
def test_topk_vmaps_sequentially():
  rng = np.random.default_rng(3)
  qe = rng.standard_normal((3, 4, 7)).astype(np.float32)
  bank = rng.standard_normal((3, 2, 10, 6)).astype(np.float32)
  extra = rng.standard_normal((3, 2, 10, 1)).astype(np.float32)
  blocks = np.array([1, 0], np.int32)  # extra is in this (gallery) order.
  best_v = np.full((3, 4, 2), np.inf, np.float32)
  best_i = np.full((3, 4, 2), -1, np.int32)
  out_v, out_i = jax.vmap(lambda a, b, e, v, i: cpu_kernel.topk(a, b, e, blocks, v, i))(
      qe, bank, extra, best_v, best_i)
  for n in range(3):
    ref_v, ref_i = _ref_merge(qe[n], bank[n], extra[n], blocks, None, 0, best_v[n],
                              best_i[n])
    np.testing.assert_allclose(out_v[n], ref_v, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out_i[n], ref_i)


@pytest.mark.parametrize("name", sorted(distances.METRICS))
def test_gallery_extra_is_the_embedding_tail(name):
  # Metric.gallery_extra's contract, which lets the kernel read rows in place.
  metric = distances.METRICS[name]
  rows = metric.prepare(jnp.asarray(np.random.default_rng(4).standard_normal((6, 5)),
                                    jnp.float32))
  bank, extra, center = cpu_kernel.gallery_parts(metric, rows)
  assert center is None
  np.testing.assert_array_equal(jnp.concatenate([bank, extra], -1),
                                metric.embed_gallery(rows))
  # Translated: the kernel subtracts the center from the rows part as it reads it.
  shift = jnp.full((5,), 3.0, jnp.float32)
  bank, extra, center = cpu_kernel.gallery_parts(metric, rows, shift)
  if center is not None:
    bank = bank - center
  np.testing.assert_allclose(jnp.concatenate([bank, extra], -1),
                             metric.embed_gallery(rows - shift), rtol=1e-6)


@needs_kernel
def test_knn_lowers_to_the_kernel_only_for_auto():
  q, g = jnp.ones((10, 4)), jnp.ones((20, 4))

  def hlo(kernel):
    return neighbors._knn_jit.lower(  # pylint: disable=protected-access
        q, g, k=2, metric=distances.L2, chunk_size=8, query_block=5, kernel=kernel,
        blocking="cpu", precision="float32").as_text()

  assert cpu_kernel.TARGET in hlo("auto")
  assert cpu_kernel.TARGET not in hlo("xla")


@needs_kernel
@pytest.mark.parametrize("metric", ["l2", "sqeuclidean"])
def test_kernel_and_xla_paths_agree_exactly_on_integer_data(metric, isa):
  # Integer features, and a search center on their lattice (neighbors.search_center):
  # every proxy and distance is an exact small integer in both paths, whatever order
  # each sums in, so the results are equal bit for bit, including the order of ties
  # (M = 3000 spans several chunks).
  rng = np.random.default_rng(5)
  g = rng.integers(-3, 4, (3000, 16)).astype(np.float32)
  q = rng.integers(-3, 4, (700, 16)).astype(np.float32)
  for k in (1, 7):
    d_auto, i_auto = spade_jax.knn(q, g, k, metric, chunk_size=1024, kernel="auto")
    d_xla, i_xla = spade_jax.knn(q, g, k, metric, chunk_size=1024, kernel="xla")
    np.testing.assert_array_equal(i_auto, i_xla)
    np.testing.assert_array_equal(d_auto, d_xla)


@needs_kernel
def test_kernel_and_xla_paths_agree_on_cosine(isa):
  # Unit-normalised rows are not integers: the two paths' proxies round differently
  # (sgemm vs XLA's dot), so neighbours at near-equal distances may swap (seen: 6 of
  # 4900 at k = 7 on an AVX2 CPU). Guaranteed: the same neighbours up to such ties and
  # distances within the rounding bound of a 16-term sum.
  rng = np.random.default_rng(5)
  g = rng.integers(-3, 4, (3000, 16)).astype(np.float32)
  q = rng.integers(-3, 4, (700, 16)).astype(np.float32)
  for k in (1, 7):
    d_auto, i_auto = spade_jax.knn(q, g, k, "cosine", chunk_size=1024, kernel="auto")
    d_xla, i_xla = spade_jax.knn(q, g, k, "cosine", chunk_size=1024, kernel="xla")
    tolerances.assert_same_neighbours(d_auto, i_auto, d_xla, i_xla,
                                      tolerances.distance_rtol(16), atol=1e-6)


def test_set_isa_refuses_unknown_names():
  with pytest.raises(ValueError, match="isa must be one of"):
    cpu_kernel.set_isa("sse9")


def test_isa_switch_from_the_environment(monkeypatch):
  if not cpu_kernel.available():
    pytest.skip(f"CPU kernel unavailable: {cpu_kernel.unavailable_reason()}")
  before = cpu_kernel.isa()
  monkeypatch.setenv(cpu_kernel.ENV_ISA, "portable")
  try:
    assert cpu_kernel._load.__wrapped__()[0]  # pylint: disable=protected-access
    assert cpu_kernel.isa() == "portable"
    monkeypatch.setenv(cpu_kernel.ENV_ISA, "sse9")
    available, why = cpu_kernel._load.__wrapped__()  # pylint: disable=protected-access
    assert not available and cpu_kernel.ENV_ISA in why
  finally:
    cpu_kernel.set_isa(before)


@needs_kernel
def test_blas_thread_setting_is_restored():
  threadpoolctl = pytest.importorskip("threadpoolctl")
  from scipy.linalg import cython_blas  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import

  def scipy_blas_threads():
    return sorted(i["num_threads"] for i in threadpoolctl.threadpool_info()
                  if i.get("user_api") == "blas" and "scipy.libs" in i.get("filepath", ""))

  before = scipy_blas_threads()
  rng = np.random.default_rng(6)
  q = rng.standard_normal((1200, 8)).astype(np.float32)
  g = rng.standard_normal((5000, 8)).astype(np.float32)
  spade_jax.knn(q, g, 3)[0].block_until_ready()
  assert scipy_blas_threads() == before


def test_switch_disables_the_kernel(monkeypatch):
  monkeypatch.setenv(cpu_kernel.ENV_SWITCH, "0")
  available, why = cpu_kernel._load.__wrapped__()  # pylint: disable=protected-access
  assert not available and cpu_kernel.ENV_SWITCH in why


def test_topk_refuses_to_run_without_the_kernel(monkeypatch):
  monkeypatch.setattr(cpu_kernel, "available", lambda: False)
  empty = (jnp.full((2, 1), jnp.inf), jnp.full((2, 1), -1, jnp.int32))
  with pytest.raises(RuntimeError, match="CPU kNN kernel is unavailable"):
    cpu_kernel.topk(jnp.ones((2, 3)), jnp.ones((1, 4, 3)), jnp.ones((1, 4, 0)),
                    jnp.array([0], jnp.int32), *empty)


@needs_kernel
@pytest.mark.parametrize("combine,metric,in_place", [
    ("ensemble", "l2", True), ("ensemble", "sqeuclidean", True),
    ("ensemble", "cosine", False),  # cosine's prepare normalises: rows are copied.
    ("cat", "l2", False)])          # cat builds resized rows: nothing to read in place.
def test_pixel_scores_read_the_memory_bank_in_place(monkeypatch, combine, metric, in_place):
  from spade_jax import scoring  # pylint: disable=import-outside-toplevel
  calls = []
  search_bank = cpu_kernel.search_bank
  monkeypatch.setattr(cpu_kernel, "search_bank",
                      lambda *a, **kw: calls.append(1) or search_bank(*a, **kw))
  jax.clear_caches()
  rng = np.random.default_rng(7)
  train = {"layer1": rng.standard_normal((6, 4, 4, 3)).astype(np.float32)}
  test = {"layer1": rng.standard_normal((2, 4, 4, 3)).astype(np.float32)}
  nbrs = np.array([[5, 1, 2], [0, 3, 4]], np.int32)
  got = scoring.pixel_scores(test, train, nbrs, combine=combine, metric=metric)
  jax.clear_caches()
  assert bool(calls) == in_place
  ref = numpy_reference.pixel_scores(test, train, nbrs, 1, combine, metric)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_search_bank_matches_reference(masked, offset):
  rng = np.random.default_rng(8)
  bank = (rng.standard_normal((5, 9, 4)) + offset).astype(np.float32)
  q = (rng.standard_normal((6, 4)) + offset).astype(np.float32)
  blocks = np.array([4, 0, 2], np.int32)
  valid = None
  if masked:
    valid = rng.random((3, 9)) < 0.6
    valid[2] = False  # Not held here: neither searched nor read.
  metric = distances.L2
  center = np.asarray(neighbors.search_center(metric, jnp.asarray(q)))
  qe = np.asarray(neighbors.embed_queries(metric, jnp.asarray(q), jnp.asarray(center)))
  extra = ((bank[blocks] - center) ** 2).sum(-1, keepdims=True)
  empty = (np.full((6, 3), np.inf, np.float32), np.full((6, 3), -1, np.int32))
  ref_v, ref_i = _ref_merge(qe, bank, extra, blocks, valid, 0, *empty, center=center)
  got_v, got_i = jax.jit(lambda b, bl, v, c: cpu_kernel.search_bank(
      jnp.asarray(qe), b, bl, 3, metric, v, c))(
          bank, blocks, None if valid is None else jnp.asarray(valid), center)
  # Proxies |g - c|^2 - 2 (q - c).(g - c): a 5-term sum of terms up to ~|g - c|^2.
  scale = float(((np.abs(bank - center)).sum(-1) ** 2).max() + 1.0)
  tolerances.assert_same_neighbours(got_v, got_i, ref_v, ref_i, 0.0,
                                    tolerances.distance_rtol(5) * scale)
