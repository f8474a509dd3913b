"""spade_jax.coreset (PatchCore's greedy k-center coreset) against a float64 NumPy greedy.

Why exact equality holds with projection_dim=None:
* on small-integer features, every squared distance sum_d (x_d - c_d)^2 is an integer
  below 2^24, so float32 computes it exactly, like float64; running minima and the
  argmax then agree bit for bit, ties included (both take the lowest index);
* on Gaussian features, a float32 distance of D non-negative terms is within about
  (D + 1) 2^-24 (1.5e-6 for D = 24) of the float64 one, relatively, so both select
  the same point whenever the best running minimum beats the runner-up by more than
  twice that; the test measures that margin on the reference's own run and requires
  1e-5 at every step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spade_jax
from spade_jax.search import coreset as coreset_lib
from spade_jax.search import coreset_pca

MESH_AXIS = "data"


def greedy_reference(x, size, start=0):
  """Float64 k-center greedy: (selected indices, smallest best-vs-runner-up margin)."""
  x = np.asarray(x, np.float64)
  mins = np.full(len(x), np.inf)
  mins[start] = -np.inf
  chosen, margin = [start], np.inf
  for _ in range(size - 1):
    mins = np.minimum(mins, ((x - x[chosen[-1]]) ** 2).sum(1))
    order = np.argsort(-mins, kind="stable")
    best = order[0]
    if len(order) > 1 and np.isfinite(mins[order[1]]):
      margin = min(margin, (mins[best] - mins[order[1]]) / max(mins[best], 1e-300))
    mins[best] = -np.inf
    chosen.append(int(best))
  return np.array(chosen), margin


def _mesh():
  return jax.make_mesh((len(jax.devices()),), (MESH_AXIS,))


@pytest.mark.parametrize("start", [0, 17])
def test_exact_greedy_on_integer_features_with_ties(start):
  x = np.random.default_rng(0).integers(-3, 4, (301, 12)).astype(np.float32)
  ref, margin = greedy_reference(x, 120, start)
  assert margin == 0  # Integer features tie: the lowest-index rule is exercised.
  out = spade_jax.coreset(x, 120, projection_dim=None, start=start)
  assert out.dtype == jnp.int32 and out.shape == (120,)
  np.testing.assert_array_equal(np.asarray(out), ref)


def test_exact_greedy_on_gaussian_features():
  x = np.random.default_rng(2).normal(size=(500, 24)).astype(np.float32)
  ref, margin = greedy_reference(x, 150)
  assert margin > 1e-5  # No near-ties: float32 must select the same points.
  np.testing.assert_array_equal(np.asarray(spade_jax.coreset(x, 150, projection_dim=None)),
                                ref)


def test_selects_every_point_once_even_with_duplicates():
  x = np.repeat(np.eye(3, dtype=np.float32), 4, axis=0)  # 3 distinct points, 4 copies each.
  out = np.asarray(spade_jax.coreset(x, 12, projection_dim=None))
  assert sorted(out) == list(range(12))
  # After the three distinct points all minima are 0: lowest unselected index first.
  np.testing.assert_array_equal(out, [0, 4, 8, 1, 2, 3, 5, 6, 7, 9, 10, 11])
  np.testing.assert_array_equal(out, greedy_reference(x, 12)[0])


def test_projection_is_the_greedy_on_projected_features():
  x = np.random.default_rng(2).normal(size=(400, 64)).astype(np.float32)
  key = jax.random.key(5)
  projected = np.asarray(x, np.float64) @ np.asarray(
      coreset_lib.projection_matrix(key, 64, 16), np.float64)
  ref, margin = greedy_reference(projected, 80)
  assert margin > 1e-5
  np.testing.assert_array_equal(np.asarray(spade_jax.coreset(x, 80, projection_dim=16,
                                                             key=key)), ref)
  # The key fixes the selection; an int seed is a key.
  np.testing.assert_array_equal(np.asarray(spade_jax.coreset(x, 80, projection_dim=16, key=5)),
                                ref)
  assert not np.array_equal(np.asarray(spade_jax.coreset(x, 80, projection_dim=16, key=6)),
                            ref)
  # projection_dim >= D: no projection, the exact greedy.
  np.testing.assert_array_equal(np.asarray(spade_jax.coreset(x, 80, projection_dim=64)),
                                greedy_reference(x, 80)[0])


@pytest.mark.parametrize("rows,projection_dim", [(203, None), (517, 8), (8, None)])
def test_sharded_equals_single_device(rows, projection_dim):
  # Row counts that 8 devices do not divide: padding rows must never be selected.
  rng = np.random.default_rng(3)
  x = rng.normal(size=(rows, 20)).astype(np.float32)
  size = min(rows, 90)
  single = np.asarray(spade_jax.coreset(x, size, projection_dim=projection_dim, start=rows // 2))
  gallery = spade_jax.shard_gallery(x, _mesh(), MESH_AXIS)
  sharded = spade_jax.coreset(gallery, size, projection_dim=projection_dim, start=rows // 2)
  np.testing.assert_array_equal(np.asarray(sharded), single)
  assert sharded.sharding.is_fully_replicated
  if projection_dim is None:
    np.testing.assert_array_equal(single, greedy_reference(x, size, rows // 2)[0])
  ints = rng.integers(-2, 3, (rows, 6)).astype(np.float32)  # Ties across shards.
  np.testing.assert_array_equal(
      np.asarray(spade_jax.coreset(spade_jax.shard_gallery(ints, _mesh(), MESH_AXIS), size,
                                   projection_dim=None)),
      greedy_reference(ints, size)[0])


def test_memory_is_linear_in_n_never_n_squared():
  # The compiled selection's scratch memory (XLA's own count) per point stays constant
  # as N grows 4x, and is a tiny fraction of an N x N float32 matrix.
  key_data = jax.random.key_data(jax.random.key(0))
  temp = {}
  for n in (4096, 16384):
    compiled = coreset_lib._coreset_jit.lower(  # pylint: disable=protected-access
        jax.ShapeDtypeStruct((n, 32), jnp.float32), key_data, jnp.int32(0), size=64,
        projection_dim=8, impl="threefry2x32").compile()
    temp[n] = compiled.memory_analysis().temp_size_in_bytes
    assert temp[n] < 64 * n  # The projected copy (8 floats) + minima; N x N is 4 N^2.
  assert temp[16384] < 4.5 * temp[4096]


@pytest.mark.parametrize("kwargs,message", [
    ({"size": 0}, "size"), ({"size": 41}, "size"), ({"size": 2.0}, "size"),
    ({"projection_dim": 0}, "projection_dim"), ({"start": 40}, "start"),
    ({"start": -1}, "start"), ({"key": "seed"}, "key"),
])
def test_validation(kwargs, message):
  x = np.zeros((40, 4), np.float32)
  args = {"size": 3, **kwargs}
  with pytest.raises(ValueError, match=message):
    spade_jax.coreset(x, args.pop("size"), **args)


def test_bad_features():
  with pytest.raises(ValueError, match=r"\[N, D\]"):
    spade_jax.coreset(np.zeros((4, 2, 2), np.float32), 1)
  with pytest.raises(ValueError, match="NaN or Inf"):
    spade_jax.coreset(np.array([[0.0], [np.nan]], np.float32), 1)
  with pytest.raises(ValueError, match="empty"):
    spade_jax.coreset(np.zeros((0, 3), np.float32), 1)
  gallery = spade_jax.shard_gallery(np.zeros((5, 3), np.float32), _mesh(), MESH_AXIS)
  with pytest.raises(ValueError, match=r"size must be an int in \[1, 5\]"):
    spade_jax.coreset(gallery, 6)  # 5 valid rows (8 with padding).


# precision="bf16": each step reads bfloat16 rows and recomputes in float32 only the rows
# whose lower bound allows a new minimum, so the selection is the float32 greedy's. The
# data below take both branches: at most max(256, N / 32) such rows (a gather), or all.


@pytest.mark.slow  # ~2.5 s on the 2 busy cores.
def test_bf16_selection_equals_float32_on_integer_features_with_ties():
  x = np.random.default_rng(0).integers(-3, 4, (601, 12)).astype(np.float32)
  ref = greedy_reference(x, 150, 17)[0]
  np.testing.assert_array_equal(
      np.asarray(spade_jax.coreset(x, 150, projection_dim=None, start=17, precision="bf16")),
      ref)


@pytest.mark.slow  # Four selections compiled: ~3 s on the 2 busy cores.
def test_bf16_selection_equals_float32_on_gaussian_and_projected_features():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(700, 24)).astype(np.float32)
  ref, margin = greedy_reference(x, 200)
  assert margin > 1e-5
  out = spade_jax.coreset(x, 200, projection_dim=None, precision="bf16")
  np.testing.assert_array_equal(np.asarray(out), ref)
  wide = rng.normal(size=(900, 64)).astype(np.float32) + 3.0  # An offset: larger norms.
  np.testing.assert_array_equal(
      np.asarray(spade_jax.coreset(wide, 120, projection_dim=16, key=5, precision="bf16")),
      np.asarray(spade_jax.coreset(wide, 120, projection_dim=16, key=5)))


@pytest.mark.slow  # Eager ops, each compiled: ~2.5 s on the 2 busy cores.
def test_bf16_lower_bounds_hold():
  # The bound never exceeds the float32 distance the greedy computes (the rows whose
  # bound reaches their minimum keep it without a float32 distance).
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(500, 128)).astype(np.float32) * rng.uniform(
      0.01, 100, (500, 1)).astype(np.float32))
  low, error = coreset_lib._bf16_rows(x)  # pylint: disable=protected-access
  for center in (x[3], x[300] * 0.999, jnp.zeros(128)):
    bound = coreset_lib._lower_bounds(low, error, center)  # pylint: disable=protected-access
    exact = coreset_lib._distances(x, center, None)  # pylint: disable=protected-access
    assert bool(jnp.all(bound <= exact))
    # Tight: within 1% for rows not too near the center (what makes it skip rows).
    far = exact > 1e-2 * jnp.max(exact)
    assert float(jnp.max(jnp.where(far, 1 - bound / exact, 0))) < 0.05


def test_bf16_validation():
  x = np.zeros((40, 4), np.float32)
  with pytest.raises(ValueError, match="precision"):
    spade_jax.coreset(x, 3, precision="fp16")
  poly = spade_jax.kernels.from_features("polynomial", np.eye(8, 4, dtype=np.float32))
  with pytest.raises(ValueError, match="bf16"):
    spade_jax.coreset(x, 3, metric=poly, precision="bf16")


# prune=True: a row keeps its minimum without a distance when the new point is at least
# twice as far from the selected row of that minimum (triangle inequality, float32
# margins); the other rows get the plain pass's float32 distance (gathered: at most
# max(256, N / 32) of them, else every row), so the selection is the plain greedy's.


def _counted(x, size, **kwargs):
  """(selection, open rows per step) of the pruned greedy on one device."""
  key = jax.random.key(kwargs.pop("key", 0))
  out, counts = coreset_lib._coreset_jit(  # pylint: disable=protected-access
      jnp.asarray(x), jax.random.key_data(key), jnp.int32(kwargs.pop("start", 0)), size=size,
      impl=str(jax.random.key_impl(key)), prune=True, with_counts=True, **kwargs)
  return np.asarray(out), np.asarray(counts)[1:]


def _prune_case(name):
  """(features, size, coreset kwargs, whether the NumPy greedy is the reference)."""
  rng = np.random.default_rng(7)
  if name == "integer_ties":  # 601 > 256 rows: both branches.
    return rng.integers(-3, 4, (601, 12)).astype(np.float32), 150, {"start": 17}, True
  if name == "gaussian":
    return rng.normal(size=(700, 24)).astype(np.float32), 200, {}, True
  if name == "low_dim":  # 3 dims: the bound closes most rows, gathers dominate.
    return rng.normal(size=(3000, 3)).astype(np.float32), 300, {"start": 5}, True
  if name == "projected":  # Offset rows: larger norms; projected as PatchCore does.
    return (rng.normal(size=(900, 64)).astype(np.float32) + 3.0, 120,
            {"projection_dim": 16, "key": 5}, False)
  # Each row 3 times: after the distinct rows all minima are 0 (then the lowest index).
  x = np.repeat(rng.integers(-2, 3, (150, 4)).astype(np.float32), 3, axis=0)
  return x, 450, {}, True


_SLOW = pytest.mark.slow  # Each ~2-3 s on the 2 busy cores (two selections compiled).


@pytest.mark.parametrize("name", ["integer_ties"] + [
    pytest.param(n, marks=_SLOW) for n in ("gaussian", "low_dim", "projected", "duplicated")])
def test_pruned_selection_equals_plain(name):
  x, size, kwargs, numpy_reference = _prune_case(name)
  kwargs = {"projection_dim": None, **kwargs}
  plain = np.asarray(spade_jax.coreset(x, size, **kwargs))
  pruned, counts = _counted(x, size, **kwargs)
  np.testing.assert_array_equal(pruned, plain)
  if numpy_reference:
    ref, margin = greedy_reference(x, size, kwargs.get("start", 0))
    assert margin == 0 or margin > 1e-5  # Exact ties, or no near-ties for float32.
    np.testing.assert_array_equal(pruned, ref)
  capacity = coreset_lib._capacity(len(x))  # pylint: disable=protected-access
  assert counts[0] == len(x) - 1  # The first step: every row but the start is open.
  if name in ("integer_ties", "low_dim", "duplicated"):  # Both branches taken.
    assert (counts <= capacity).any() and (counts > capacity).any(), counts
  if name == "low_dim":
    assert np.mean(counts <= capacity) > 0.5  # Mostly gathers.


@pytest.mark.slow  # 8 fake devices, 3 selections each: ~5 s.
@pytest.mark.parametrize("precision,prune", [("bf16", False), ("float32", True),
                                             ("bf16", True), ("float32", "pca"),
                                             ("bf16", "pca")])
@pytest.mark.parametrize("rows,projection_dim", [(2203, None), (517, 8)])
def test_sharded_options_equal_single_device(rows, projection_dim, precision, prune):
  # 2203 rows: 276 per device, over the 256 rows gathered, so the first steps take the
  # every-row branch on each device; the 3-d rows then let the pruned steps gather.
  rng = np.random.default_rng(3)
  options = {"precision": precision, "prune": prune}
  for dim in (20, 3):
    x = rng.normal(size=(rows, dim)).astype(np.float32)
    single = np.asarray(spade_jax.coreset(x, 90, projection_dim=projection_dim,
                                          start=rows // 2))
    gallery = spade_jax.shard_gallery(x, _mesh(), MESH_AXIS)
    sharded = spade_jax.coreset(gallery, 90, projection_dim=projection_dim, start=rows // 2,
                                **options)
    np.testing.assert_array_equal(np.asarray(sharded), single)
  ints = rng.integers(-2, 3, (rows, 6)).astype(np.float32)  # Ties across shards.
  np.testing.assert_array_equal(
      np.asarray(spade_jax.coreset(spade_jax.shard_gallery(ints, _mesh(), MESH_AXIS), 90,
                                   projection_dim=None, **options)),
      greedy_reference(ints, 90)[0])


def _bound_cases(rng, n, d):
  """Rows x, their selected rows a and new centers c [n, d] float32: random, and
  collinear near-ties |a - c| = 2 |x - a| (1 + eps), over scales 1e-30 to 1e15."""
  scale = 10.0 ** rng.uniform(-30, 15, (n, 1))
  a = rng.normal(size=(n, d)) * scale
  u = rng.normal(size=(n, d))
  u /= np.linalg.norm(u, axis=1, keepdims=True)
  t = scale * rng.uniform(0.1, 10, (n, 1))
  eps = np.concatenate([np.sign(rng.normal(size=n // 2)) * 10.0 ** rng.uniform(-9, -2, n // 2),
                        np.zeros(n - n // 2)])[:, None]
  x = a + t * u
  c = np.where(rng.uniform(size=(n, 1)) < 0.7, a + 2 * t * (1 + eps) * u,
               a + rng.normal(size=(n, d)) * t * rng.uniform(0.5, 4, (n, 1)))
  return [np.asarray(v, np.float32) for v in (x, a, c)]


@pytest.mark.parametrize("d", [3, 128])
def test_prune_bound_never_closes_a_row_whose_minimum_drops(d):
  # A closed row (the bound rules out a new minimum) must have a float32 distance to the
  # new center at least its float32 minimum, however the d squares are summed: that of
  # the greedy (_distances), NumPy's pairwise sum, and a sequential sum.
  rng = np.random.default_rng(d)
  x, a, c = _bound_cases(rng, 4000, d)
  # The greedy's expression (_distances), with a center per row.
  dist = lambda p, q: np.asarray(jnp.sum(jnp.square(jnp.asarray(p) - jnp.asarray(q)), axis=1))
  mins, between, new = dist(x, a), dist(a, c), dist(x, c)
  closed = ~np.asarray(coreset_lib._prune_open(  # pylint: disable=protected-access
      jnp.asarray(between), jnp.asarray(mins), d))
  assert 0.1 < closed.mean() < 0.9  # Both kinds present, near-ties on either side.
  diff = x - c
  for other in (new, np.sum(diff * diff, axis=1, dtype=np.float32),
                np.cumsum(diff * diff, axis=1, dtype=np.float32)[:, -1]):
    assert not np.any(closed & (other < mins))
  exact = lambda p, q: np.sum((p.astype(np.float64) - q) ** 2, axis=1)
  assert not np.any(closed & (exact(x, c) < exact(x, a)))
  # The margins matter: the bare test fl|a - c|^2 >= 4 m would close such rows here.
  bare = (between >= 4 * mins) & (mins > 0)
  assert np.any(bare & (new < mins))
  # Tight: collinear rows with |a - c| >= 2.0001 |x - a| are closed.
  far = np.sqrt(exact(a, c)) >= 2.0001 * np.sqrt(exact(x, a))
  assert closed[far & (mins > 1e-25)].all()
  # -inf (selected, padding) is never open; inf (no minimum yet) always, also at inf.
  edge = np.asarray(coreset_lib._prune_open(  # pylint: disable=protected-access
      jnp.array([0.0, np.inf, 0.0, np.inf]), jnp.array([-np.inf, -np.inf, np.inf, np.inf]),
      d))
  np.testing.assert_array_equal(edge, [False, False, True, True])


def test_prune_validation():
  x = np.zeros((40, 4), np.float32)
  with pytest.raises(ValueError, match="prune"):
    spade_jax.coreset(x, 3, prune="yes")
  poly = spade_jax.kernels.from_features("polynomial", np.eye(8, 4, dtype=np.float32))
  with pytest.raises(ValueError, match="prune=True"):
    spade_jax.coreset(x, 3, metric=poly, prune=True)


# prune="pca" (the default where it applies): a row's bound from its top 31 principal
# components and the norm of the rest (coreset_pca.open_rows, float32 margins); open
# rows get the plain pass's float32 distance, so the selection is the plain greedy's.


def _pca_counted(x, size, **kwargs):
  """(selection, open rows per step: -1 where a step skipped the bound) of prune="pca"."""
  key = jax.random.key(kwargs.pop("key", 0))
  out, counts = coreset_lib._coreset_jit(  # pylint: disable=protected-access
      jnp.asarray(x), jax.random.key_data(key), jnp.int32(kwargs.pop("start", 0)), size=size,
      impl=str(jax.random.key_impl(key)), prune="pca", with_counts=True, **kwargs)
  return np.asarray(out), np.asarray(counts)[1:]


def _pca_case(name):
  """(features, size, coreset kwargs, whether the NumPy greedy is the reference)."""
  rng = np.random.default_rng(11)
  if name == "low_rank":  # Rank 6 + noise in 48 dims: the 31 components hold it.
    x = rng.normal(size=(1500, 6)) @ rng.normal(size=(6, 48)) + 0.05 * rng.normal(
        size=(1500, 48))
    return x.astype(np.float32), 300, {"start": 3}, True
  if name == "integer_ties":  # 12 < 32 values: the bound is the whole distance.
    return rng.integers(-3, 4, (601, 12)).astype(np.float32), 150, {"start": 17}, True
  if name == "gaussian":  # 40 > 32 values, isotropic: the bound prunes little.
    return rng.normal(size=(700, 40)).astype(np.float32), 150, {}, True
  if name == "projected":
    return (rng.normal(size=(900, 64)).astype(np.float32) + 3.0, 120,
            {"projection_dim": 40, "key": 5}, False)
  x = np.repeat(rng.integers(-2, 3, (120, 36)).astype(np.float32), 3, axis=0)
  return x, 360, {}, True  # "duplicated": all minima 0 after the distinct rows.


@pytest.mark.parametrize("name", ["low_rank", "integer_ties"] + [
    pytest.param(n, marks=_SLOW) for n in ("gaussian", "projected", "duplicated")])
def test_pca_pruned_selection_equals_plain(name):
  x, size, kwargs, numpy_reference = _pca_case(name)
  kwargs = {"projection_dim": None, **kwargs}
  plain = np.asarray(spade_jax.coreset(x, size, prune=False, **kwargs))
  pruned, counts = _pca_counted(x, size, **kwargs)
  np.testing.assert_array_equal(pruned, plain)
  if numpy_reference:
    ref, margin = greedy_reference(x, size, kwargs.get("start", 0))
    assert margin == 0 or margin > 1e-5
    np.testing.assert_array_equal(pruned, ref)
  capacity = coreset_lib._capacity(len(x))  # pylint: disable=protected-access
  assert counts[0] == len(x) - 1 and counts[1] == -1  # Every row open; then a skip.
  gathered = (counts >= 0) & (counts <= capacity)
  assert gathered.any() and (counts > capacity).any(), counts  # Both branches.
  if name == "low_rank":  # The bound closes most rows: mostly gathers.
    assert gathered.mean() > 0.8 and np.median(counts[counts >= 0]) < 0.05 * len(x)


def test_pca_pruned_with_an_l2_kernel():
  # On the Mahalanobis kernel's whitened rows, prune="auto" (the default: "pca" here)
  # selects what the plain greedy does. (Sharded: test_sharded_options_equal_single_device.)
  rng = np.random.default_rng(5)
  x = (rng.normal(size=(1200, 5)) @ rng.normal(size=(5, 40))
       + 0.1 * rng.normal(size=(1200, 40))).astype(np.float32)
  maha = spade_jax.kernels.from_features("mahalanobis", x[:400])
  np.testing.assert_array_equal(  # 170 >= 4 x 40 steps: "auto" is "pca".
      np.asarray(spade_jax.coreset(x, 170, metric=maha, projection_dim=None, start=7)),
      np.asarray(spade_jax.coreset(x, 170, metric=maha, projection_dim=None, start=7,
                                   prune=False)))


def _pca_bound_cases(rng, space, xs, centers, per):
  """(rows y [centers, per, d], their float32 distances to each center): the centers
  plus steps inside the top components' span (the bound is then nearly the distance),
  or in any direction."""
  vectors = np.asarray(space.vectors, np.float64)
  d = xs.shape[1]
  scale = np.sqrt(np.mean(np.sum((xs - xs.mean(0)) ** 2, 1)))
  steps = rng.normal(size=(len(centers), per, d))
  inside = rng.uniform(size=(len(centers), per, 1)) < 0.7
  span = steps[..., :31] @ vectors[:, :31].T
  steps = np.where(inside, span, steps)
  steps *= scale * rng.uniform(0.05, 2, (len(centers), per, 1)) / np.linalg.norm(
      steps, axis=-1, keepdims=True)
  return (centers[:, None, :] + steps).astype(np.float32)


@pytest.mark.parametrize("exponent", [0] + [pytest.param(e, marks=_SLOW) for e in (-12, 12)])
def test_pca_bound_never_closes_a_row_whose_minimum_drops(exponent):
  # A closed row must have a float32 distance to the center at least its minimum m, for
  # the greedy's sum (_distances), NumPy's pairwise sum and a sequential one; minima are
  # set at the distance times (1 + eps), near-ties on both sides.
  rng = np.random.default_rng(exponent + 20)
  d = 48
  xs = ((rng.normal(size=(400, d)) * np.geomspace(4, 0.05, d)) * 10.0 ** exponent
        ).astype(np.float32)
  space = jax.jit(coreset_pca.basis, static_argnums=(1, 2))(jnp.asarray(xs), None, None)
  centers = xs[rng.choice(400, 12, replace=False)]
  ys = _pca_bound_cases(rng, space, xs, centers, 400)
  test, project = jax.jit(coreset_pca.open_rows), jax.jit(coreset_pca.project)
  dist = jax.jit(lambda y, c: jnp.sum(jnp.square(y - c[None, :]), axis=1))
  closed_any = tight_rows = 0
  for c, y in zip(centers, ys):
    new = np.asarray(dist(jnp.asarray(y), jnp.asarray(c)))
    eps = np.where(rng.uniform(size=len(y)) < 0.8,
                   np.sign(rng.normal(size=len(y))) * 10.0 ** rng.uniform(-9, -0.5, len(y)),
                   0.0)
    mins = (new * (1 + eps)).astype(np.float32)
    w = project(space, jnp.asarray(y))
    closed = ~np.asarray(test(space, w, jnp.asarray(c), jnp.asarray(mins)))
    diff = y - c
    for other in (new, np.sum(diff * diff, axis=1, dtype=np.float32),
                  np.cumsum(diff * diff, axis=1, dtype=np.float32)[:, -1]):
      assert not np.any(closed & (other < mins))
    closed_any += closed.sum()
    # Tight: a row 2% above its bound is closed (steps within the top components).
    w_c = project(space, jnp.asarray(c)[None, :])
    bare = np.sum(np.square(np.asarray(w, np.float64) - np.asarray(w_c)), axis=1)
    loose = (mins <= 0.98 * bare) & (mins > 2.0 ** -90)  # Beyond the floor 2^-100.
    tight_rows += loose.sum()
    assert closed[loose].all()
  assert closed_any > 200 and tight_rows > 100, (closed_any, tight_rows)
  # -inf (selected, padding) is never open; inf (no minimum yet) always.
  edge = np.asarray(test(space, w[:2], jnp.asarray(centers[0]),
                         jnp.array([-np.inf, np.inf], jnp.float32)))
  np.testing.assert_array_equal(edge, [False, True])


def test_pca_bound_margins_matter():
  # Without the margins (the bare test: bound >= m) rows whose minimum drops would be
  # closed: near-ties where the float32 bound exceeds the float32 distance.
  rng = np.random.default_rng(1)
  d = 20  # < 32: the bound rows hold every component.
  xs = (rng.normal(size=(300, d)) * 1e3 + 5e3).astype(np.float32)
  space = jax.jit(coreset_pca.basis, static_argnums=(1, 2))(jnp.asarray(xs), None, None)
  w = np.asarray(jax.jit(coreset_pca.project)(space, jnp.asarray(xs)), np.float32)
  dist = np.asarray(jnp.sum(jnp.square(jnp.asarray(xs) - jnp.asarray(xs[0])[None]), axis=1))
  bare = np.sum(np.square(w - w[0]), axis=1, dtype=np.float32)
  mins = np.nextafter(dist, np.float32(np.inf))  # Drops to dist: must stay open.
  assert np.any(bare >= mins)
  assert np.asarray(jax.jit(coreset_pca.open_rows)(space, jnp.asarray(w), jnp.asarray(xs[0]),
                                                   jnp.asarray(mins)))[1:].all()


def test_pca_validation():
  x = np.zeros((40, 4), np.float32)
  poly = spade_jax.kernels.from_features("polynomial", np.eye(8, 4, dtype=np.float32))
  with pytest.raises(ValueError, match="prune='pca'"):
    spade_jax.coreset(x, 3, metric=poly, prune="pca")
  with pytest.raises(ValueError, match="at most 1024"):
    spade_jax.coreset(np.zeros((4, 1100), np.float32), 2, projection_dim=None, prune="pca")
  # "auto" prunes neither a kernel not searched as L2 nor rows of over 1024 values.
  rows = np.random.default_rng(2).normal(size=(300, 4)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(spade_jax.coreset(rows, 60, metric=poly)),
                                np.asarray(spade_jax.coreset(rows, 60, metric=poly,
                                                             prune=False)))
  assert len(spade_jax.coreset(np.zeros((4, 1100), np.float32), 2, projection_dim=None)) == 2
