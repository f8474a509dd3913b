"""knn vs a brute-force float64 NumPy reference."""

import dataclasses
import pathlib
import sys

from hypothesis import given, settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tolerances

import spade_jax
from spade_jax.search import distances, neighbors

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))
from bench import precision as precision_bench  # noqa: E402  (the benchmark's features)

# Tolerance: the returned distances are recomputed directly (sum of squared
# differences in float32) from float32 inputs, so their relative error is a few
# float32 ulps times sqrt(D) (pairwise summation), far below 1e-5 for D <= 64. The
# matmul proxy only chooses *which* neighbours; it is accurate to ~eps * (|q|^2 + |g|^2),
# so neighbours whose reference distances are closer than GAP may legitimately swap:
# indices are compared exactly only where the reference has no such near-tie.
RTOL, ATOL = 1e-5, 1e-6
GAP = 1e-4
# Both search paths: "auto" runs the CPU kernel (cpu_kernel.py) on this CPU backend when
# it is built (tests/test_cpu_kernel.py checks it is in CI), "xla" the pure-XLA path.
KERNELS = pytest.mark.parametrize("kernel", neighbors.KERNELS)


def _ref_dist(q, g, metric):
  q = np.asarray(q, np.float64)
  g = np.asarray(g, np.float64)
  if metric == "cosine":
    qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-300)
    gn = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-300)
    return 0.5 * ((qn[:, None, :] - gn[None, :, :]) ** 2).sum(-1)
  sq = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
  return np.sqrt(sq) if metric == "l2" else sq


def _ref_knn(q, g, k, metric):
  """Brute force: sort by (distance, index)."""
  d = _ref_dist(q, g, metric)
  cols = np.broadcast_to(np.arange(g.shape[0]), d.shape)
  order = np.lexsort((cols, d), axis=1)[:, :k]
  return np.take_along_axis(d, order, 1), order, d


def _check(q, g, k, metric, chunk_size=None, exact_ties=False, query_block=None,
           kernel="auto", blocking="auto"):
  dist, idx = spade_jax.knn(q, g, k, metric, chunk_size=chunk_size, query_block=query_block,
                            kernel=kernel, blocking=blocking)
  dist, idx = np.asarray(dist), np.asarray(idx)
  ref_d, ref_i, full = _ref_knn(q, g, k, metric)
  assert dist.shape == idx.shape == (q.shape[0], k)
  assert dist.dtype == np.float32 and idx.dtype == np.int32
  # The k smallest distances, ascending, and the returned indices really are at
  # those distances.
  np.testing.assert_allclose(dist, ref_d, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(np.take_along_axis(full, idx, 1), ref_d, rtol=RTOL, atol=ATOL)
  assert (np.diff(dist, axis=1) >= 0).all()
  for row in idx:
    assert len(set(row.tolist())) == k
  if exact_ties:
    np.testing.assert_array_equal(idx, ref_i)
    return
  # Indices must match wherever the reference distance is separated from every other
  # gallery distance of that row by more than GAP (relative).
  srt = np.sort(full, axis=1)
  for r in range(q.shape[0]):
    for j in range(k):
      others = np.delete(srt[r], j)
      if np.all(np.abs(others - srt[r, j]) > GAP * max(1.0, srt[r, j])):
        assert idx[r, j] == ref_i[r, j], (r, j)


@pytest.mark.parametrize("q_rows,m_rows,dim,k,chunk,metric", [
    (5, 37, 8, 1, 10, "l2"),            # k = 1 fast path, tail of 7.
    (5, 37, 8, 1, 10, "cosine"),
    (5, 37, 8, 3, 10, "l2"),            # k > 1, chunk 10: whole-block top_k.
    (5, 37, 8, 3, 10, "sqeuclidean"),
    (4, 37, 8, 37, 10, "l2"),           # k = M > chunk.
    (4, 37, 8, 37, 10, "cosine"),
    (3, 20, 1, 4, 6, "l2"),             # D = 1.
    (3, 20, 1, 1, 6, "sqeuclidean"),
    (6, 50, 16, 12, 7, "l2"),           # tail of 1.
    (6, 150, 4, 3, 64, "l2"),           # Grouped selection (groups of 32), tail 22.
    (6, 150, 4, 1, 64, "cosine"),
    (3, 100, 4, 40, 48, "sqeuclidean"), # k > number of groups (48 = 3 groups of 16).
    (9, 96, 3, 7, 96, "l2"),            # One chunk, 3 groups of 32, k > groups.
    (1, 1, 3, 1, None, "l2"),           # single gallery row.
    (7, 64, 5, 8, 64, "cosine"),        # one chunk.
    (2, 9, 4, 9, 1, "l2"),              # chunk of one row.
])
@KERNELS
def test_knn_fixed_shapes(q_rows, m_rows, dim, k, chunk, metric, kernel):
  rng = np.random.default_rng(q_rows * 1000 + m_rows)
  q = rng.standard_normal((q_rows, dim)).astype(np.float32)
  g = rng.standard_normal((m_rows, dim)).astype(np.float32)
  _check(q, g, k, metric, chunk, kernel=kernel)


@pytest.mark.parametrize("k,chunk,metric", [
    (1, 4, "l2"), (2, 3, "l2"), (5, 16, "sqeuclidean"), (11, 4, "l2"), (1, 16, "sqeuclidean"),
    (1, 32, "l2"), (4, 32, "l2"), (9, 64, "sqeuclidean")])
@KERNELS
def test_knn_ties_lower_index_wins(k, chunk, metric, kernel):
  # Small integers: every proxy and distance is exact in float32, so ties are real
  # ties and the order must be exactly (distance, index), across chunk borders and
  # column groups too.
  rng = np.random.default_rng(k * 10 + chunk)
  g = rng.integers(-2, 3, size=(101, 3)).astype(np.float32)
  g[[10, 21, 40, 77]] = g[2]
  q = np.concatenate([g[[2, 5]], rng.integers(-2, 3, size=(4, 3))]).astype(np.float32)
  _check(q, g, k, metric, chunk, exact_ties=True, kernel=kernel)


@KERNELS
def test_knn_real_valued_duplicates_keep_index_order(kernel):
  rng = np.random.default_rng(7)
  g = rng.standard_normal((30, 6)).astype(np.float32)
  g[[9, 17, 25]] = g[3]
  q = g[[3]] + np.float32(1e-3)
  for k, chunk in ((1, 8), (4, 8), (4, 30), (10, 7)):
    dist, idx = spade_jax.knn(q, g, k, chunk_size=chunk, kernel=kernel)
    np.testing.assert_array_equal(np.asarray(idx)[0, :min(k, 4)], [3, 9, 17, 25][:k])


@KERNELS
def test_knn_near_duplicates_exact_distances(kernel):
  # Queries within 1e-4 of a gallery row: the matmul form |q|^2 + |g|^2 - 2 q.g has
  # an error ~1e-6 on a squared distance of ~1e-8, the direct recompute does not.
  rng = np.random.default_rng(8)
  g = (rng.standard_normal((200, 32)) * 3 + 5).astype(np.float32)
  q = g[[4, 50, 199]] + (1e-4 * rng.standard_normal((3, 32))).astype(np.float32)
  for metric in ("l2", "sqeuclidean"):
    dist, idx = spade_jax.knn(q, g, 2, metric, chunk_size=64, kernel=kernel)
    ref_d, ref_i, _ = _ref_knn(q, g, 2, metric)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(dist[:, 0], ref_d[:, 0], rtol=1e-4)
    assert (np.asarray(dist[:, 0]) > 0).all()


@KERNELS
def test_knn_zero_distance_and_clamp(kernel):
  g = np.array([[1e3, -1e3], [0.0, 0.0], [1e3 + 1, -1e3]], np.float32)
  dist, idx = spade_jax.knn(g, g, 1, "sqeuclidean", kernel=kernel)
  np.testing.assert_array_equal(idx[:, 0], [0, 1, 2])
  np.testing.assert_array_equal(dist[:, 0], [0.0, 0.0, 0.0])


@KERNELS
def test_knn_cosine_zero_vector(kernel):
  g = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], np.float32)
  q = np.array([[0.0, 0.0], [3.0, 0.0]], np.float32)
  dist, idx = spade_jax.knn(q, g, 3, "cosine", kernel=kernel)
  np.testing.assert_allclose(dist[0], [1.0, 1.0, 1.0], atol=1e-6)
  np.testing.assert_array_equal(idx[0], [0, 1, 2])
  np.testing.assert_allclose(dist[1], [0.0, 1.0, 1.0], atol=1e-6)
  np.testing.assert_array_equal(idx[1], [1, 0, 2])


def test_knn_jit_cache():
  rng = np.random.default_rng(9)
  q = rng.standard_normal((40, 8)).astype(np.float32)
  g = rng.standard_normal((300, 8)).astype(np.float32)
  _check(q, g, 6, "l2", chunk_size=32, query_block=16)
  before = neighbors._knn_jit._cache_size()  # pylint: disable=protected-access
  spade_jax.knn(q + 1, g, 6, "l2", chunk_size=32, query_block=16)
  assert neighbors._knn_jit._cache_size() == before  # pylint: disable=protected-access


@KERNELS
def test_knn_vmaps_and_jits(kernel):
  rng = np.random.default_rng(10)
  q = rng.standard_normal((3, 4, 5)).astype(np.float32)
  g = rng.standard_normal((3, 17, 5)).astype(np.float32)
  d, i = jax.vmap(lambda a, b: spade_jax.knn(a, b, 3, chunk_size=5, kernel=kernel))(q, g)
  d2, i2 = jax.jit(lambda a, b: spade_jax.knn(a, b, 3, chunk_size=5, kernel=kernel))(q[1], g[1])
  for b in range(3):
    ref_d, ref_i, _ = _ref_knn(q[b], g[b], 3, "l2")
    tolerances.assert_same_neighbours(d[b], i[b], ref_d, ref_i, RTOL, ATOL)
  # vmapped and not are two compiled programs: equal up to rounding, not bit for bit.
  tolerances.assert_same_neighbours(d2, i2, d[1], i[1], tolerances.distance_rtol(5))


@KERNELS
def test_local_knn_validity_mask_and_merge(kernel):
  # The building blocks of the sharded search: masked shards + merge == one search.
  rng = np.random.default_rng(11)
  q = rng.standard_normal((5, 4)).astype(np.float32)
  g = rng.standard_normal((23, 4)).astype(np.float32)
  metric = spade_jax.METRICS["l2"]
  ref_d, ref_i, _ = _ref_knn(q, g, 6, "l2")
  padded = np.concatenate([g, np.zeros((1, 4), np.float32)])  # 24 = 2 shards of 12.
  valid = np.arange(24) < 23

  @jax.jit
  def two_shards(q, padded, valid):
    parts = [neighbors.local_knn(q, padded[s:s + 12], 6, metric, 5, valid=valid[s:s + 12],
                                 index_offset=s, kernel=kernel) for s in (0, 12)]
    return neighbors.merge_topk(*parts[0], *parts[1], 6)

  d, i = two_shards(q, padded, valid)
  tolerances.assert_same_neighbours(d, i, ref_d, ref_i, RTOL, ATOL)
  # A shard with fewer valid rows than k pads with (+inf, -1).
  d, i = jax.jit(lambda q, g, v: neighbors.local_knn(q, g, 13, metric, 5, valid=v,
                                                    index_offset=12, kernel=kernel))(
                                                        q, padded[12:], valid[12:])
  assert np.isinf(d[:, -1]).all() and (np.asarray(i[:, -1]) == -1).all()
  assert np.isfinite(d[:, :11]).all() and (np.asarray(i[:, :11]) >= 12).all()


@settings(max_examples=25, deadline=None)
@given(q_rows=st.integers(1, 9), m_rows=st.integers(1, 150), dim=st.integers(1, 6),
       k_frac=st.floats(0, 1), chunk=st.sampled_from([1, 3, 7, 8, 16, 32, 45, 64]),
       query_block=st.integers(1, 6),
       metric=st.sampled_from(["l2", "sqeuclidean", "cosine"]),
       integer_valued=st.booleans(), seed=st.integers(0, 2**31 - 1))
@KERNELS
def test_knn_property(q_rows, m_rows, dim, k_frac, chunk, query_block, metric,
                      integer_valued, seed, kernel):
  rng = np.random.default_rng(seed)
  k = 1 + int(k_frac * (m_rows - 1))
  if integer_valued:
    g = rng.integers(-2, 3, size=(m_rows, dim)).astype(np.float32)
    q = rng.integers(-2, 3, size=(q_rows, dim)).astype(np.float32)
  else:
    g = rng.standard_normal((m_rows, dim)).astype(np.float32)
    q = rng.standard_normal((q_rows, dim)).astype(np.float32)
    g[rng.integers(0, m_rows, m_rows // 3)] = g[0]  # Duplicated rows.
  if metric == "cosine":  # Zero rows: distance 1 by convention, a 0/0 in the reference.
    g[np.all(g == 0, axis=1)] = 1.0
    q[np.all(q == 0, axis=1)] = 1.0
  _check(q, g, k, metric, chunk, exact_ties=integer_valued and metric != "cosine",
         query_block=query_block, kernel=kernel)


@pytest.mark.parametrize("call,match", [
    (lambda q, g: spade_jax.knn(q, g, 0), "k must be in"),
    (lambda q, g: spade_jax.knn(q, g, 8), r"k must be in \[1, 7\]"),
    (lambda q, g: spade_jax.knn(q, g[:0], 1), "gallery is empty"),
    (lambda q, g: spade_jax.knn(q, g[:, :2], 1), "feature size mismatch"),
    (lambda q, g: spade_jax.knn(q[0], g, 1), r"queries must be \[Q, D\]"),
    (lambda q, g: spade_jax.knn(q * np.nan, g, 1), "queries contains NaN"),
    (lambda q, g: spade_jax.knn(q, jnp.asarray(g).at[3, 1].set(jnp.inf), 1),
     "gallery contains NaN or Inf"),
    (lambda q, g: spade_jax.knn(q, g, 1, "manhattan"), "metric must be one of"),
    (lambda q, g: spade_jax.knn(q, g, 1, chunk_size=0), "chunk_size"),
    (lambda q, g: spade_jax.knn(q, g, 1, query_block=-2), "query_block"),
    (lambda q, g: spade_jax.knn(q, g, 1.5), "k must be an int"),
    (lambda q, g: spade_jax.knn(q, g, 1, kernel="blas"), "kernel must be one of"),
    # Complex features would lose their imaginary part in the float32 search.
    (lambda q, g: spade_jax.knn(q + 1j, g, 1), "queries must hold real numbers"),
    (lambda q, g: spade_jax.knn(q, g.astype(np.complex64), 1),
     "gallery must hold real numbers"),
    # Squares of values near 1e19 overflow float32 (distances inf, indices -1).
    (lambda q, g: spade_jax.knn(q * 1e19, g, 1), "queries holds values up to 1.*overflow"),
    (lambda q, g: spade_jax.knn(q, g * 1e19, 1), "gallery holds values up to 1.*overflow"),
])
def test_knn_bad_input(call, match):
  rng = np.random.default_rng(12)
  with pytest.raises(ValueError, match=match):
    call(rng.standard_normal((2, 3)).astype(np.float32),
         rng.standard_normal((7, 3)).astype(np.float32))


def test_knn_skip_finite_check():
  q = np.ones((1, 2), np.float32)
  g = np.array([[np.nan, 0.0], [1.0, 1.0]], np.float32)
  _, idx = spade_jax.knn(q, g, 1, check_finite_inputs=False)  # No error, no check.
  assert idx.shape == (1, 1)


@pytest.mark.parametrize("offset", [1e3, 1e4, -3e4])
@pytest.mark.parametrize("metric", ["l2", "sqeuclidean"])
@KERNELS
def test_knn_exact_on_data_with_a_large_common_offset(offset, metric, kernel):
  # N(0, 1) features plus a common offset: |g|^2 - 2 q.g cancels (untranslated, +1e3
  # in D = 16 returned wrong nearest neighbours, +1e4 gave a query equal to a gallery
  # row the distance 5.75). L2 is translation invariant, so the search is translated.
  rng = np.random.default_rng(21)
  g = (rng.standard_normal((3000, 16)) + offset).astype(np.float32)
  q = np.concatenate([g[[5, 2999, 1234]],
                      (rng.standard_normal((40, 16)) + offset).astype(np.float32)])
  dist, idx = spade_jax.knn(q, g, 4, metric, kernel=kernel)
  np.testing.assert_array_equal(np.asarray(dist)[:3, 0], 0.0)
  np.testing.assert_array_equal(np.asarray(idx)[:3, 0], [5, 2999, 1234])
  ref_d, ref_i, _ = _ref_knn(q, g, 4, metric)
  tolerances.assert_same_neighbours(dist, idx, ref_d, ref_i, RTOL, ATOL)


def test_untranslated_search_fails_on_the_offset_data():
  # The same data through an L2 that is not declared translation invariant: the
  # defect the translation fixes (so the test above can fail).
  raw = dataclasses.replace(distances.L2, name="l2_untranslated", translation_invariant=False)
  rng = np.random.default_rng(21)
  g = (rng.standard_normal((3000, 16)) + 1e4).astype(np.float32)
  dist, idx = spade_jax.knn(g[:20], g, 1, raw, kernel="xla")
  assert (np.asarray(idx)[:, 0] != np.arange(20)).any() or (np.asarray(dist) > 0).any()


@pytest.mark.parametrize("shift", [0.0, 0.3, 1e3])
def test_search_center_is_near_the_mean_and_keeps_lattices(shift):
  rng = np.random.default_rng(22)
  lattice = rng.integers(-3, 4, (50, 8)).astype(np.float32) + np.float32(shift)
  center = np.asarray(neighbors.search_center(distances.L2, jnp.asarray(lattice)))
  spread = np.sqrt(np.mean((lattice - lattice.mean(0)) ** 2))
  assert np.all(np.abs(center - lattice.mean(0)) <= spread / 2 + 1e-6)
  if shift < 1:  # No common offset to remove: no translation (the origin is near).
    np.testing.assert_array_equal(center, 0.0)
  else:  # Integer data stays on a dyadic lattice: its proxies stay exact.
    np.testing.assert_array_equal(center, np.round(center * 2) / 2)
  assert neighbors.search_center(distances.COSINE, jnp.asarray(lattice)) is None
  one = neighbors.search_center(distances.L2, jnp.asarray(lattice[:1]))
  np.testing.assert_array_equal(one, lattice[0])  # A single query: the query itself.


def test_largest_safe_magnitude_passes():
  dim = 3
  limit = neighbors.max_feature_magnitude(dim)
  q = np.full((1, dim), limit * 0.99, np.float32)
  g = np.stack([np.full(dim, -limit * 0.99), np.zeros(dim)]).astype(np.float32)
  dist, idx = spade_jax.knn(q, g, 2)
  assert np.isfinite(np.asarray(dist)).all() and sorted(np.asarray(idx)[0]) == [0, 1]


# ----------------------------------------------------------------------------------
# Per-platform blocking (neighbors.BLOCKINGS), each forced on this CPU: exact like the
# default. The accelerator lowerings' structure is checked in tests/test_export.py.

ACCELERATOR_BLOCKINGS = pytest.mark.parametrize("blocking", ["gpu", "tpu"])


@pytest.mark.parametrize("q_rows,m_rows,dim,k,chunk,metric", [
    (5, 37, 8, 1, None, "l2"),          # The blocking's own sizes: one chunk.
    (5, 37, 8, 3, 10, "cosine"),        # Given sizes: 3 chunks and a tail of 7.
    (6, 150, 4, 1, 64, "sqeuclidean"),
    (6, 150, 4, 12, 64, "l2"),
    (4, 37, 8, 37, 10, "l2"),           # k = M > chunk.
    (3, 20, 1, 4, 6, "l2"),             # D = 1.
])
@ACCELERATOR_BLOCKINGS
def test_accelerator_blockings_are_exact(q_rows, m_rows, dim, k, chunk, metric, blocking):
  rng = np.random.default_rng(q_rows * 1000 + m_rows + 1)
  q = rng.standard_normal((q_rows, dim)).astype(np.float32)
  g = rng.standard_normal((m_rows, dim)).astype(np.float32)
  _check(q, g, k, metric, chunk, blocking=blocking)


@pytest.mark.parametrize("k,chunk", [(1, 4), (5, 16), (11, 32), (4, None)])
@ACCELERATOR_BLOCKINGS
def test_accelerator_blockings_break_ties_by_lower_index(k, chunk, blocking):
  rng = np.random.default_rng(k * 10 + (chunk or 0))
  g = rng.integers(-2, 3, size=(101, 3)).astype(np.float32)
  g[[10, 21, 40, 77]] = g[2]
  q = np.concatenate([g[[2, 5]], rng.integers(-2, 3, size=(4, 3))]).astype(np.float32)
  _check(q, g, k, "l2", chunk, exact_ties=True, blocking=blocking)


def test_blocking_table():
  # The CPU entry is the tuned default (unchanged); gpu / tpu block all queries (up to
  # 4096) against ~2^23-entry blocks, chunks multiples of 128 dividing the gallery.
  cpu, gpu = neighbors.BLOCKINGS["cpu"], neighbors.BLOCKINGS["gpu"]
  assert cpu.blocks(3136, 156800) == neighbors.default_blocks(3136, 156800) == (6272, 392)
  assert gpu.blocks(3136, 156800) == (3200, 3136)  # WRN50-2 layer1 at K = 50.
  chunk, block = gpu.blocks(10000, 1_254_400)
  assert block == 4096 and chunk % 128 == 0 and 1_254_400 % chunk == 0
  assert 2 ** 22 <= chunk * block <= 1.5 * 2 ** 23
  assert gpu.blocks(10000, 1_000_000) == (2048, 4096)  # No multiple of 128 divides it.
  assert gpu.blocks(7, 40) == (40, 7)
  assert (gpu.selection, neighbors.BLOCKINGS["tpu"].selection) == ("top_k", "groups")


@pytest.mark.slow  # 8 fake devices, two blockings: ~2.5 s.
def test_sharded_accelerator_blocking_equals_single_device():
  rng = np.random.default_rng(12)
  q = rng.standard_normal((9, 8)).astype(np.float32)
  g = rng.standard_normal((203, 8)).astype(np.float32)
  gallery = spade_jax.shard_gallery(g, jax.make_mesh((len(jax.devices()),), ("data",)))
  single = spade_jax.knn(q, g, 5)
  for blocking in ("gpu", "tpu"):
    sharded = spade_jax.knn(q, gallery, 5, blocking=blocking)
    np.testing.assert_array_equal(np.asarray(sharded[1]), np.asarray(single[1]))
    np.testing.assert_allclose(np.asarray(sharded[0]), np.asarray(single[0]), rtol=1e-6)


@pytest.mark.parametrize("call,match", [
    (lambda q, g: spade_jax.knn(q, g, 1, blocking="fast"), "blocking"),
    (lambda q, g: spade_jax.knn(q, g, 1, precision="fp8"), "precision"),
    (lambda q, g: spade_jax.knn(q, g, 1, spade_jax.kernels.from_features(
        "polynomial", np.eye(4, 3, dtype=np.float32)), precision="bf16"), "bf16"),
])
def test_search_option_validation(call, match):
  x = np.zeros((4, 3), np.float32)
  with pytest.raises(ValueError, match=match):
    call(x, x)


# precision="bf16": recall@k against exact search on seeded structured features
# (ReLU of a rank-32 map plus noise, as CNN features), deterministic for fixed data.
# Measured (BENCHMARKS.md): 1.0 at k = 1, 5, 50 with the shortlist, 0.993-0.996 with
# bf16 proxies alone. The bound asserted: >= 0.999.
BF16_RECALL_BOUND = 0.999


def _structured(n, seed, dim=64, rank=16):
  return precision_bench.structured_features(n, dim, seed, rank=rank)


@pytest.mark.slow  # Three searches compiled: 2-3 s on the 2 busy cores.
@pytest.mark.parametrize("k", [1, 10])
def test_bf16_precision_recall_and_exact_distances(k):
  q, g = _structured(150, 1), _structured(2000, 2)
  exact_d, exact_i = (np.asarray(a) for a in spade_jax.knn(q, g, k))
  dist, idx = (np.asarray(a) for a in spade_jax.knn(q, g, k, precision="bf16"))
  recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(idx, exact_i)])
  assert recall >= BF16_RECALL_BOUND, recall
  # The distances are the exact float32 ones of the neighbours returned.
  ref = np.sqrt(((q[:, None, :].astype(np.float64) - g[idx]) ** 2).sum(-1))
  np.testing.assert_allclose(dist, ref, rtol=RTOL, atol=ATOL)
  assert (np.diff(dist, axis=1) >= 0).all()
  # Without the shortlist (bf16 proxies alone) the recall is measurably lower: the
  # re-ranking is what holds the bound.
  if k == 10:
    assert not np.array_equal(np.asarray(spade_jax.knn(q, g, k, _bf16_only())[1]), exact_i)


def _bf16_only():
  """L2 ranked by bf16 products alone (no shortlist), exact distances recomputed."""
  l2 = distances.get_metric("l2")
  def embed_q(x):
    return jnp.concatenate([(-2.0 * x).astype(jnp.bfloat16).astype(jnp.float32),
                            jnp.ones(x.shape[:-1] + (1,), jnp.float32)], axis=-1)
  def embed_g(x):
    return jnp.concatenate([x.astype(jnp.bfloat16).astype(jnp.float32),
                            jnp.sum(x * x, axis=-1, keepdims=True)], axis=-1)
  return dataclasses.replace(l2, name="l2_bf16_only", embed_queries=embed_q,
                             embed_gallery=embed_g, gallery_extra=None,
                             prepare_is_identity=False)
