"""save_index / load_index against damaged and hostile index files.

Every tensor is checksummed (name, dtype, shape, bytes) in the header metadata, the
metadata itself too; load_index checks the metadata fields, the tensors' names,
dtypes and shapes, then the checksums, and answers every defect with a ValueError
that names the file (and the tensor).
"""

import json
import os
import resource
import struct
import time

import jax
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy
from spade_fake_backbone import FakeBackbone

import spade_jax
from spade_jax.detector import index_file

CONFIG = spade_jax.SpadeConfig(k_images=3, k_image_score=2, resize=72, crop=64,
                               batch_size=3, layers=("layer1", "layer2", "layer3"))
SHAPES = {"layer1": (16, 16, 6), "layer2": (8, 8, 8), "layer3": (4, 4, 10)}
NUM_TRAIN = 7


@pytest.fixture(scope="module")
def spade():
  return spade_jax.Spade(FakeBackbone(), CONFIG)


@pytest.fixture(scope="module")
def index(spade):
  rng = np.random.default_rng(0)
  pool = rng.normal(size=(NUM_TRAIN, 12)).astype(np.float32)
  feats = {l: rng.normal(size=(NUM_TRAIN, *s)).astype(np.float32)
           for l, s in SHAPES.items()}
  return spade.fit_features(pool, feats)


@pytest.fixture
def saved(index, tmp_path):
  path = tmp_path / "idx.spade"
  spade_jax.save_index(path, index)
  return path


def _read(path):
  """(header dict, data bytes) of a safetensors file."""
  raw = path.read_bytes()
  (size,) = struct.unpack("<Q", raw[:8])
  return json.loads(raw[8:8 + size]), raw[8 + size:]


def _write(path, header, data):
  text = json.dumps(header).encode()
  text += b" " * (-len(text) % 8)
  path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _edit_metadata(path, **changes):
  """Sets (value) or deletes (None) metadata fields of the file at `path`."""
  header, data = _read(path)
  meta = header["__metadata__"]
  for key, value in changes.items():
    if value is None:
      meta.pop(key, None)
    else:
      meta[key] = value
  _write(path, header, data)


def _forge(path, tensors, levels=None, **metadata):
  """Writes `tensors` with a self-consistent header: correct checksums, so only the
  structural checks of load_index can object."""
  if levels is None:
    levels = [k.split("/", 1)[1] for k in tensors if k.startswith("features/")]
  meta = {"format": index_file.INDEX_FORMAT, "version": index_file.INDEX_VERSION,
          "backbone": "fake_pyramid", "feature_config": CONFIG.feature_config("fake_pyramid"),
          "levels": json.dumps(levels)}
  meta.update(metadata)
  checksums = index_file._checksums(tensors, meta)  # pylint: disable=protected-access
  # Entries for the tensors the levels name, to get past the metadata checks.
  checksums = {k: checksums.get(k, "sha256:" + "0" * 64)
               for k in ["__metadata__", "pool", *[f"features/{l}" for l in levels]]}
  meta["checksums"] = json.dumps(checksums)
  safetensors_numpy.save_file(tensors, str(path), metadata=meta)


def _tensors(index):
  out = {"pool": np.asarray(index.train_pool)}
  out.update({f"features/{l}": np.asarray(v) for l, v in index.train_features.items()})
  return out


def test_roundtrip_is_exact(spade, index, saved):
  loaded = spade_jax.load_index(saved, expect=spade)
  for name, value in _tensors(loaded).items():
    np.testing.assert_array_equal(value, _tensors(index)[name])
  header, _ = _read(saved)
  checksums = json.loads(header["__metadata__"]["checksums"])
  assert set(checksums) == {"__metadata__", "pool", *[f"features/{l}" for l in SHAPES]}


def test_flipped_bytes_are_detected(saved):
  header, data = _read(saved)
  begin, end = header["features/layer2"]["data_offsets"]
  middle = (begin + end) // 2
  damaged = bytearray(data)
  damaged[middle:middle + 64] = bytes(b ^ 0xFF for b in damaged[middle:middle + 64])
  _write(saved, header, bytes(damaged))
  with pytest.raises(ValueError, match=f"{saved}.*'features/layer2'.*checksum"):
    spade_jax.load_index(saved)


def test_single_flipped_bit_is_detected(saved):
  raw = bytearray(saved.read_bytes())
  raw[-5] ^= 0x01  # In the last tensor's data.
  saved.write_bytes(bytes(raw))
  with pytest.raises(ValueError, match="checksum"):
    spade_jax.load_index(saved)


def test_edited_dtype_is_refused(saved):
  header, data = _read(saved)
  header["pool"]["dtype"] = "I32"  # Same size: safetensors alone would accept it.
  _write(saved, header, data)
  with pytest.raises(ValueError, match=f"{saved}.*'pool'.*I32.*F32"):
    spade_jax.load_index(saved)


@pytest.mark.parametrize("key", ["format", "version", "backbone", "feature_config",
                                 "levels", "checksums"])
def test_missing_metadata_field_is_a_value_error(saved, key):
  _edit_metadata(saved, **{key: None})
  with pytest.raises(ValueError, match=str(saved)) as e:
    spade_jax.load_index(saved)
  assert key in str(e.value) or (key == "format" and "not a spade_jax index" in str(e.value))


def test_no_metadata_at_all(tmp_path):
  path = tmp_path / "bare.safetensors"
  safetensors_numpy.save_file({"pool": np.zeros((2, 3), np.float32)}, str(path))
  with pytest.raises(ValueError, match="not a spade_jax index"):
    spade_jax.load_index(path)


@pytest.mark.parametrize("key,value,message", [
    ("levels", "layer1", "levels.*JSON"),
    ("levels", '{"layer1": 1}', "levels.*list"),
    ("levels", "[1, 2]", "levels.*list of names"),
    ("levels", "[]", "levels.*empty"),
    ("levels", '["layer1", "layer1"]', "levels.*duplicate"),
    ("levels", '["layer1", "layer2"]', "feature_config.*layers.*levels"),
    ("levels", "[" * 100000 + "]" * 100000, "levels.*JSON"),  # Not a RecursionError.
    ("feature_config", "{not json", "feature_config.*JSON"),
    ("feature_config", "[1]", "feature_config.*object"),
    ("feature_config", json.dumps({"backbone": "other", "layers": list(SHAPES)}),
     "feature_config.*backbone"),
    ("feature_config", json.dumps({"backbone": "fake_pyramid", "layers": ["layer1"]}),
     "feature_config.*layers"),
    ("feature_config", json.dumps({"backbone": "fake_pyramid", "layers": list(SHAPES),
                                   "resize": 72}), "feature_config.*fields"),
    ("feature_config", json.dumps({"backbone": "fake_pyramid", "layers": list(SHAPES),
                                   "resize": "72", "crop": 64}), "resize='72'"),
    ("checksums", "nope", "checksums.*JSON"),
    ("checksums", "[]", "checksums.*object"),
    ("checksums", '{"__metadata__": "sha256:00", "pool": "sha256:00"}',
     "checksums.*features/layer1"),
    ("checksums", json.dumps({"__metadata__": "sha256:00", "pool": "sha256:00",
                              **{f"features/{l}": "sha256:00" for l in SHAPES}}),
     "checksums.*malformed"),
    ("format", "something.else", "not a spade_jax index"),
    ("version", "99", "unsupported index version '99'"),
    ("version", "1", "older spade_jax without checksums.*refit"),
])
def test_bad_metadata_is_a_value_error(saved, key, value, message):
  _edit_metadata(saved, **{key: value})
  with pytest.raises(ValueError, match=message) as e:
    spade_jax.load_index(saved)
  assert str(saved) in str(e.value)


def test_edited_metadata_is_detected(saved):
  # A still-consistent edit (another resize) that only the metadata checksum sees.
  header, _ = _read(saved)
  config = json.loads(header["__metadata__"]["feature_config"])
  config["resize"] += 1
  _edit_metadata(saved, feature_config=json.dumps(config, sort_keys=True))
  with pytest.raises(ValueError, match="metadata.*checksum"):
    spade_jax.load_index(saved)


def test_index_of_previous_version_is_refused_with_advice(index, tmp_path):
  # What save_index wrote before checksums: version "1", no "checksums".
  path = tmp_path / "old.spade"
  safetensors_numpy.save_file(_tensors(index), str(path), metadata={
      "format": index_file.INDEX_FORMAT, "version": "1", "backbone": index.backbone_name,
      "feature_config": index.feature_config, "levels": json.dumps(list(SHAPES))})
  with pytest.raises(ValueError, match="older spade_jax without checksums; refit"):
    spade_jax.load_index(path)


@pytest.mark.parametrize("case", ["pool_ndim", "pool_rows", "feature_rows", "feature_ndim",
                                  "extra_tensor", "missing_tensor", "float64", "empty"])
def test_inconsistent_tensors_are_refused(index, tmp_path, case):
  tensors = _tensors(index)
  levels = None
  if case == "missing_tensor":
    del tensors["features/layer3"]
    levels = list(SHAPES)
    message = "no tensor 'features/layer3'"
  elif case == "pool_ndim":
    tensors["pool"] = tensors["pool"][:, :, None]
    message = "'pool'.*shape.*2 dimensions"
  elif case == "pool_rows":
    tensors["pool"] = tensors["pool"][:5]
    message = "'features/layer1'.*7 images.*'pool'.*5"
  elif case == "feature_rows":
    tensors["features/layer2"] = tensors["features/layer2"][:6]
    message = "'features/layer2'.*6 images.*'pool'.*7"
  elif case == "feature_ndim":
    tensors["features/layer3"] = tensors["features/layer3"].reshape(NUM_TRAIN, 16, 10)
    message = "'features/layer3'.*4 dimensions"
  elif case == "extra_tensor":
    tensors["surprise"] = np.zeros(3, np.float32)
    message = "unexpected tensors.*surprise"
  elif case == "float64":
    tensors["pool"] = tensors["pool"].astype(np.float64)
    message = "'pool'.*F64.*F32"
  else:
    tensors = {k: v[:0] for k, v in tensors.items()}
    message = "'pool'.*empty"
  path = tmp_path / "forged.spade"
  _forge(path, tensors, levels)
  with pytest.raises(ValueError, match=message) as e:
    spade_jax.load_index(path)
  assert str(path) in str(e.value)


def test_forged_consistent_file_loads(index, tmp_path):
  # The forging helper itself is right: untouched tensors load.
  path = tmp_path / "forged.spade"
  _forge(path, _tensors(index))
  spade_jax.load_index(path)


def test_save_refuses_inconsistent_index(index, tmp_path):
  bad = index.replace(train_pool=index.train_pool[:4])
  with pytest.raises(ValueError, match="'features/layer1'.*7 images.*'pool'.*4"):
    spade_jax.save_index(tmp_path / "bad.spade", bad)
  assert not list(tmp_path.iterdir())


def test_save_stores_float32_and_refuses_other_dtypes(index, tmp_path):
  wide = index.replace(train_pool=np.asarray(index.train_pool, np.float64))
  spade_jax.save_index(tmp_path / "wide.spade", wide)
  loaded = spade_jax.load_index(tmp_path / "wide.spade")
  assert loaded.train_pool.dtype == np.float32
  np.testing.assert_array_equal(loaded.train_pool, index.train_pool)
  ints = index.replace(train_pool=np.asarray(index.train_pool, np.int32))
  with pytest.raises(ValueError, match="'pool'.*int32.*not float"):
    spade_jax.save_index(tmp_path / "ints.spade", ints)


def test_save_refuses_unloadable_feature_config(index, tmp_path):
  odd = index.replace(feature_config='{"whatever": 1}')
  with pytest.raises(ValueError, match="cannot save index.*feature_config"):
    spade_jax.save_index(tmp_path / "odd.spade", odd)
  assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("edit", ["huge_shape", "huge_offsets", "huge_header_size"])
def test_small_file_declaring_huge_tensors_is_refused_quickly(saved, edit):
  header, data = _read(saved)
  if edit == "huge_shape":
    header["pool"]["shape"] = [2 ** 40, 12]
    _write(saved, header, data)
  elif edit == "huge_offsets":
    header["pool"]["shape"] = [2 ** 33, 12]
    header["pool"]["data_offsets"] = [0, 2 ** 33 * 48]
    _write(saved, header, data)
  else:
    saved.write_bytes(struct.pack("<Q", 2 ** 40) + b"{}")
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  start = time.monotonic()
  with pytest.raises(ValueError, match=str(saved)):
    spade_jax.load_index(saved)
  assert time.monotonic() - start < 5
  grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
  assert grown_kib < 200 * 1024


def test_truncated_file_is_refused(saved):
  raw = saved.read_bytes()
  saved.write_bytes(raw[:len(raw) - 100])
  with pytest.raises(ValueError, match="not a readable"):
    spade_jax.load_index(saved)


def test_loaded_index_scores_sharded_like_the_original(spade, tmp_path):
  # A sharded index saves without its padding; the loaded one shards again to score.
  rng = np.random.default_rng(1)
  train = rng.integers(0, 256, (NUM_TRAIN + 2, 80, 80, 3), dtype=np.uint8)
  test = rng.integers(0, 256, (2, 80, 80, 3), dtype=np.uint8)
  mesh = jax.make_mesh((len(jax.devices()),), ("data",))
  index = spade.fit(train, mesh=mesh)
  assert index.is_sharded
  path = tmp_path / "sharded.spade"
  spade_jax.save_index(path, index)
  loaded = spade_jax.load_index(path, expect=spade)
  assert loaded.num_images == NUM_TRAIN + 2 and not loaded.is_sharded
  scores, maps = spade.score(loaded, test, mesh=mesh)
  ref_scores, ref_maps = spade.score(index, test)
  np.testing.assert_array_equal(scores, ref_scores)
  np.testing.assert_array_equal(maps, ref_maps)


def test_no_temporary_left_after_failed_checks(saved):
  # load_index never writes: the folder holds the index only.
  _edit_metadata(saved, version="99")
  with pytest.raises(ValueError):
    spade_jax.load_index(saved)
  assert os.listdir(saved.parent) == [saved.name]
