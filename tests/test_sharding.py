"""Sharded galleries on 8 fake CPU devices: sharded == single-device, padding never leaks.

Gallery sizes NDEV - 1, NDEV + 1 and a prime (13), on a 1-D mesh of 8 ("data") and a
2-D mesh of 4 (gallery) x 2 (test images, data parallel); test batches of 3 or 5 do
not divide the data axis. The sharded search merges exact per-shard candidates in
(distance, index) order. A sharded program is compiled differently from the
single-device one (other shapes per device, other fusions, vectorised reductions of
other widths), so on real-valued data the guarantee is the same neighbours up to
near-ties and distances, scores and maps within the float32 rounding bounds of
tests/tolerances.py (seen: 1-ulp differences in "cat" maps on an AVX2 CPU). On small
integer features every sum is exact in any order: there the tests demand bit equality,
ties ordered by the lower index included.
"""

import dataclasses

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import numpy_reference
import pytest
from spade_fake_backbone import FakeBackbone
import tolerances

import spade_jax
from spade_jax import scoring
from spade_jax.host import distributed
from spade_jax.search import sharding

NDEV = 8
SIZES = (NDEV - 1, NDEV + 1, 13)
MESHES = {"1d": ((NDEV,), ("data",), "data"), "2d": ((4, 2), ("gallery", "batch"), "gallery")}


def _mesh(kind):
  shape, names, axis = MESHES[kind]
  return jax.make_mesh(shape, names), axis


def _pyramid(rng, n):
  return {"layer1": rng.standard_normal((n, 4, 4, 3)).astype(np.float32),
          "layer2": rng.standard_normal((n, 2, 2, 5)).astype(np.float32)}


def test_device_count():
  assert jax.device_count() == NDEV  # conftest's fake CPU devices.


@pytest.mark.parametrize("rows", SIZES)
def test_shard_gallery_pads_and_masks(rows):
  mesh, _ = _mesh("1d")
  g = np.random.default_rng(rows).standard_normal((rows, 3)).astype(np.float32)
  replicated = jax.device_put(g, NamedSharding(mesh, P()))
  for source in (g, jax.numpy.asarray(g), replicated):  # Host, one device, the mesh.
    sg = spade_jax.shard_gallery(source, mesh)
    padded = -(-rows // NDEV) * NDEV
    assert sg.data.shape == (padded, 3) and sg.shape == (rows, 3) and sg.size == rows
    assert sg.data.sharding == NamedSharding(mesh, P("data"))
    np.testing.assert_array_equal(np.asarray(sg.valid), np.arange(padded) < rows)
    np.testing.assert_array_equal(sg.to_numpy(), g)
  # A pytree: data and mask are leaves, size / mesh / axis static.
  assert len(jax.tree_util.tree_leaves(sg)) == 2
  doubled = jax.tree_util.tree_map(lambda x: x * 2, sg)
  assert doubled.size == rows and doubled.mesh == mesh


def test_shard_gallery_levels_and_set_mesh():
  mesh, _ = _mesh("1d")
  levels = _pyramid(np.random.default_rng(0), 9)
  with jax.set_mesh(mesh):
    sharded = spade_jax.shard_gallery(levels)  # mesh=None: the one set with jax.set_mesh.
  assert set(sharded) == set(levels)
  for name, g in sharded.items():
    assert isinstance(g, spade_jax.ShardedGallery)
    assert g.data.shape == (16,) + levels[name].shape[1:] and g.size == 9
    np.testing.assert_array_equal(g.to_numpy(), levels[name])


@pytest.mark.parametrize("kind", list(MESHES))
@pytest.mark.parametrize("rows", SIZES)
def test_knn_equals_single_device(kind, rows, search_path):
  mesh, axis = _mesh(kind)
  rng = np.random.default_rng(rows)
  q = rng.standard_normal((5, 6)).astype(np.float32)
  g = rng.standard_normal((rows, 6)).astype(np.float32)
  sg = spade_jax.shard_gallery(g, mesh, axis)
  cases = ((1, "l2"), (rows, "sqeuclidean")) + (((3, "cosine"),) if rows == 13 else ())
  for k, metric in cases:
    dist, idx = spade_jax.knn(q, sg, k, metric)
    ref_d, ref_i = spade_jax.knn(q, g, k, metric)
    assert dist.shape == (5, k) and idx.shape == (5, k)
    tolerances.assert_same_neighbours(dist, idx, ref_d, ref_i, tolerances.distance_rtol(6),
                                      atol=1e-7)
    assert np.asarray(idx).min() >= 0 and np.asarray(idx).max() < rows  # No padding rows.


def test_knn_ties_and_small_chunks_across_shards():
  # Integer features: real ties, spread over several shards; lower index must win.
  # Every sum is exact (small integers; the search center keeps them on a dyadic
  # lattice), so sharded and single-device results are equal bit for bit.
  mesh, axis = _mesh("2d")
  rng = np.random.default_rng(3)
  g = rng.integers(-1, 2, size=(37, 2)).astype(np.float32)
  q = np.concatenate([g[:2], rng.integers(-1, 2, size=(3, 2))]).astype(np.float32)
  sg = spade_jax.shard_gallery(g, mesh, axis)
  for k in (1, 4, 11):
    ref_d, ref_i = spade_jax.knn(q, g, k)
    dist, idx = spade_jax.knn(q, sg, k, chunk_size=3, query_block=2)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_array_equal(dist, ref_d)


def test_knn_accepts_named_sharded_array():
  mesh, _ = _mesh("1d")
  rng = np.random.default_rng(1)
  q = rng.standard_normal((3, 4)).astype(np.float32)
  g = rng.standard_normal((16, 4)).astype(np.float32)
  placed = jax.device_put(g, NamedSharding(mesh, P("data")))
  assert sharding.is_sharded(placed)
  for k in (1, 5):
    dist, idx = spade_jax.knn(q, placed, k)
    ref_d, ref_i = spade_jax.knn(q, g, k)
    tolerances.assert_same_neighbours(dist, idx, ref_d, ref_i, tolerances.distance_rtol(4))


@pytest.mark.parametrize("kind", list(MESHES))
def test_image_scores_equal_single_device(kind):
  mesh, axis = _mesh(kind)
  rng = np.random.default_rng(4)
  for rows in SIZES:
    test = rng.standard_normal((3, 7)).astype(np.float32)
    train = rng.standard_normal((rows, 7)).astype(np.float32)
    sg = spade_jax.shard_gallery(train, mesh, axis)
    scores, nbrs = spade_jax.image_scores(test, sg, 2, num_neighbors=5)
    ref_s, ref_n = spade_jax.image_scores(test, train, 2, num_neighbors=5)
    # Neighbour lists: only their order among near-ties may differ (no scores given
    # per neighbour, so compare the sets' distances through the brute-force matrix).
    full = numpy_reference.distances(test, train, "l2")
    tolerances.assert_same_neighbours(np.take_along_axis(full, np.asarray(nbrs), 1), nbrs,
                                      np.take_along_axis(full, np.asarray(ref_n), 1), ref_n,
                                      tolerances.distance_rtol(7))
    np.testing.assert_allclose(scores, ref_s, rtol=tolerances.map_rtol(7))


@pytest.mark.parametrize("kind,rows,combine,kappa,chunk,batch", [
    ("1d", NDEV - 1, "ensemble", 1, None, 1), ("1d", 13, "cat", 2, 2, 2),
    ("2d", NDEV + 1, "cat", 1, None, 1), ("2d", 13, "ensemble", 3, 2, 2)])
def test_pixel_scores_equal_single_device(kind, rows, combine, kappa, chunk, batch,
                                         search_path):
  mesh, axis = _mesh(kind)
  rng = np.random.default_rng(rows)
  train, test = _pyramid(rng, rows), _pyramid(rng, 3)
  # K = 5 neighbours, spread over shards; some shards hold none of an image's.
  nbrs = np.stack([rng.permutation(rows)[:5] for _ in range(3)]).astype(np.int32)
  sharded = spade_jax.shard_gallery(train, mesh, axis)
  ref = scoring.pixel_scores(test, train, nbrs, kappa=kappa, combine=combine)
  # chunk None: all held images in one gallery chunk; 2: several, the last ragged.
  maps = spade_jax.pixel_scores(test, sharded, nbrs, kappa=kappa, combine=combine,
                                images_per_chunk=chunk, test_batch_size=batch)
  assert maps.shape == (3, 4, 4)
  np.testing.assert_allclose(maps, ref, rtol=tolerances.map_rtol(8))


CONFIG = spade_jax.SpadeConfig(k_images=4, k_image_score=2, resize=40, crop=32,
                               batch_size=3, layers=("layer1", "layer2"))


def _images(rng, n):
  yy, xx = np.mgrid[:40, :40]
  img = 128 + 60 * np.sin(xx[None, ..., None] / 5.0 + rng.uniform(0, 1, (n, 1, 1, 3)))
  return np.clip(img + rng.normal(0, 6, (n, 40, 40, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def spade_setup():
  rng = np.random.default_rng(5)
  spade = spade_jax.Spade(FakeBackbone(), CONFIG)
  return spade, _images(rng, 13), _images(rng, 5)


def test_spade_score_equals_single_device(spade_setup):
  spade, train, test = spade_setup
  mesh, axis = _mesh("2d")
  rows = 13
  index = spade.fit(train[:rows], mesh=mesh, axis=axis)
  assert isinstance(index.train_pool, spade_jax.ShardedGallery)
  assert all(isinstance(v, spade_jax.ShardedGallery) for v in index.train_features.values())
  assert index.num_images == rows
  scores, maps = spade.score(index, test)  # 5 test images, batches of 3: ragged.
  ref_scores, ref_maps = spade.score(spade.fit(train[:rows]), test)
  _assert_scores_close(scores, maps, ref_scores, ref_maps)
  # The same split at the features (what each process of a multi-process run does).
  index = spade.fit_features(*spade.extract(train[:rows]), mesh=mesh, axis=axis)
  scores, maps = spade.score_features(index, *spade.extract(test))
  _assert_scores_close(scores, maps, ref_scores, ref_maps)


def _assert_scores_close(scores, maps, ref_scores, ref_maps):
  """Spade.score outputs of two programs: the fake backbone's levels have <= 64
  channels, and the maps go through a Gaussian of sigma 4 (33 taps per axis)."""
  np.testing.assert_allclose(scores, ref_scores, rtol=tolerances.map_rtol(64))
  np.testing.assert_allclose(maps, ref_maps, rtol=tolerances.map_rtol(64, taps=66),
                             atol=tolerances.map_rtol(64, taps=66) * float(np.max(ref_maps)))


def test_spade_uses_set_mesh_and_saves_sharded_index(spade_setup, tmp_path):
  # The 1-D mesh case of Spade.score, with NDEV + 1 training images.
  spade, train, test = spade_setup
  mesh, _ = _mesh("1d")
  plain = spade.fit(train[:NDEV + 1])
  with jax.set_mesh(mesh):
    index = spade.fit(train[:NDEV + 1])
    scores, maps = spade.score(plain, test[:2])  # An unsharded index is sharded to score.
  assert isinstance(index.train_pool, spade_jax.ShardedGallery)
  ref_scores, ref_maps = spade.score(plain, test[:2])
  _assert_scores_close(scores, maps, ref_scores, ref_maps)
  spade_jax.save_index(tmp_path / "idx.spade", index)  # Saved without the padding.
  loaded = spade_jax.load_index(tmp_path / "idx.spade", expect=spade)
  np.testing.assert_array_equal(loaded.train_pool, plain.train_pool)


# ----------------------------------------------------------------------------------
# Bad input.


def test_mesh_without_axis_is_refused():
  mesh, _ = _mesh("2d")
  g = np.zeros((9, 3), np.float32)
  with pytest.raises(ValueError, match="no axis named 'data'.*'gallery', 'batch'"):
    spade_jax.shard_gallery(g, mesh)  # axis defaults to "data".
  with pytest.raises(ValueError, match="no mesh is set"):
    spade_jax.shard_gallery(g)
  with pytest.raises(ValueError, match="mesh must be a jax.sharding.Mesh"):
    spade_jax.shard_gallery(g, mesh="data")
  with pytest.raises(ValueError, match="gallery must be"):
    spade_jax.shard_gallery(np.zeros(9, np.float32), mesh, "gallery")
  with pytest.raises(ValueError, match="empty"):
    spade_jax.shard_gallery(g[:0], mesh, "gallery")
  with pytest.raises(ValueError, match="no axis named 'data'"):
    spade_jax.Spade(FakeBackbone(), CONFIG).fit(np.zeros((4, 40, 40, 3), np.uint8), mesh=mesh)


def test_gallery_sharded_along_feature_axis_is_refused():
  mesh, _ = _mesh("1d")
  rng = np.random.default_rng(2)
  q = rng.standard_normal((3, 16)).astype(np.float32)
  g = jax.device_put(rng.standard_normal((9, 16)).astype(np.float32),
                     NamedSharding(mesh, P(None, "data")))
  with pytest.raises(ValueError, match="sharded along axis 1.*sample axis 0"):
    spade_jax.knn(q, g, 1)
  with pytest.raises(ValueError, match="train_pool is sharded along axis 1"):
    spade_jax.image_scores(q, g, 1)
  levels = {"layer1": jax.device_put(rng.standard_normal((9, 2, 2, 8)).astype(np.float32),
                                     NamedSharding(mesh, P(None, None, None, "data")))}
  test = {"layer1": rng.standard_normal((2, 2, 2, 8)).astype(np.float32)}
  with pytest.raises(ValueError, match=r"train_features\['layer1'\] is sharded along axis 3"):
    spade_jax.pixel_scores(test, levels, np.zeros((2, 1), np.int32))


def test_sharded_gallery_bad_k_and_mixed_levels():
  mesh, _ = _mesh("1d")
  rng = np.random.default_rng(6)
  sg = spade_jax.shard_gallery(rng.standard_normal((9, 4)).astype(np.float32), mesh)
  with pytest.raises(ValueError, match=r"k must be in \[1, 9\]"):
    spade_jax.knn(rng.standard_normal((2, 4)).astype(np.float32), sg, 10)  # 16 padded rows.
  with pytest.raises(ValueError, match="feature size mismatch"):
    spade_jax.knn(rng.standard_normal((2, 5)).astype(np.float32), sg, 1)
  train = _pyramid(rng, 9)
  mixed = {"layer1": spade_jax.shard_gallery(train["layer1"], mesh), "layer2": train["layer2"]}
  with pytest.raises(ValueError, match=r"train_features\['layer2'\] is not sharded"):
    spade_jax.pixel_scores(_pyramid(rng, 2), mixed, np.zeros((2, 3), np.int32))


@pytest.mark.parametrize("kwargs,match", [
    (dict(coordinator_address="127.0.0.1:1234"), "num_processes"),
    (dict(num_processes=2, process_id=0), "coordinator_address"),
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2), "process_id"),
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=2),
     r"process_id=2 .*\[0, 2\)"),
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=-1), "process_id"),
    (dict(coordinator_address="127.0.0.1:1234", num_processes=0, process_id=0),
     "num_processes"),
    (dict(coordinator_address="localhost", num_processes=2, process_id=0), "host:port"),
    (dict(num_cpu_devices=0), "num_cpu_devices"),
    (dict(local_device_ids=(0,)), "coordinator_address"),
])
def test_inconsistent_process_flags_are_refused(kwargs, match):
  with pytest.raises(ValueError, match=match):
    distributed.DistributedConfig(**kwargs)


def test_consistent_process_flags():
  cfg = distributed.DistributedConfig(coordinator_address="127.0.0.1:1234", num_processes=2,
                                     process_id=1, num_cpu_devices=2)
  assert cfg.enabled
  assert not distributed.DistributedConfig().enabled


def test_initialize_joins_one_run(monkeypatch):
  """A second initialize with the same config (main() run again in one process) joins
  nothing more; another config is refused. jax's side is recorded, not run."""
  calls = []
  monkeypatch.setattr(distributed, "_joined", None)
  monkeypatch.setattr(jax.config, "update", lambda name, value: calls.append((name, value)))
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  cfg = distributed.DistributedConfig(coordinator_address="127.0.0.1:1234", num_processes=2,
                                      process_id=1, num_cpu_devices=2)
  distributed.initialize(cfg)
  assert calls == [("jax_num_cpu_devices", 2), ("jax_cpu_collectives_implementation", "gloo"),
                   dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=1,
                        local_device_ids=None)]
  distributed.initialize(distributed.DistributedConfig(**dataclasses.asdict(cfg)))
  assert len(calls) == 3
  with pytest.raises(ValueError, match="already joined"):
    distributed.initialize(dataclasses.replace(cfg, process_id=0))
  assert len(calls) == 3
