"""Writes torch.save-compatible files with the standard library only (for tests).

Follows torch/serialization.py: the zip container (`<root>/data.pkl`, one raw
file per storage under `<root>/data/`, `version`, `byteorder`) and the legacy
container (pickled magic number, protocol 1001, sys info, the object, the
sorted storage keys, then per storage an int64 element count and its bytes).
Tensors pickle as torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, requires_grad, backward_hooks) with a persistent id
('storage', torch.<Type>Storage, key, 'cpu', numel[, view_metadata]).
These files load with real torch.load (checked once in a torch venv).

For hostile-input tests, `dumps` gives the data.pkl bytes of an object and the
storages it refers to without writing them, and `write_zip` assembles a zip by
hand from raw records, including `DeflatedZeros`: a deflate stream of many zero
bytes built in O(size / 1 MiB) time and memory (a zip bomb).
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
import zlib

import numpy as np

_STORAGE_NAMES = {
    np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float16): "HalfStorage", np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage", np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
}


class Global:
  """Pickles as the opcode GLOBAL '<module> <name>' (never imported here)."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *args):  # pickle insists that a reduce function is callable.
    raise TypeError(f"{self.module}.{self.name} is a placeholder")


class Storage:
  """A flat storage shared by one or more tensors."""

  def __init__(self, data: np.ndarray, key: str):
    self.data = np.ascontiguousarray(data).ravel()
    self.key = key


class Tensor:
  """A view (offset, size, stride in elements) into a Storage."""

  def __init__(self, storage: Storage, offset=0, size=None, stride=None, parameter=False):
    self.storage, self.offset, self.parameter = storage, offset, parameter
    self.size = tuple(size if size is not None else storage.data.shape)
    if stride is None:
      stride = tuple(int(np.prod(self.size[i + 1:])) for i in range(len(self.size)))
    self.stride = tuple(stride)

  def __reduce__(self):
    rebuilt = (Global("torch._utils", "_rebuild_tensor_v2"),
               (self.storage, self.offset, self.size, self.stride, False,
                collections.OrderedDict()))
    if not self.parameter:
      return rebuilt
    return (Global("torch._utils", "_rebuild_parameter"),
            (_Reduced(*rebuilt), False, collections.OrderedDict()))


class _Reduced:
  def __init__(self, func, args):
    self.func, self.args = func, args

  def __reduce__(self):
    return self.func, self.args


def tensor(array: np.ndarray, key: str, parameter: bool = False) -> Tensor:
  """A contiguous tensor with its own storage."""
  array = np.asarray(array)
  return Tensor(Storage(array, key), 0, array.shape, parameter=parameter)


class _Pickler(pickle._Pickler):  # The pure-Python pickler has a patchable dispatch.
  dispatch = dict(pickle._Pickler.dispatch)

  def __init__(self, file, legacy: bool):
    super().__init__(file, protocol=2)
    self.legacy = legacy
    self.storages: dict[str, Storage] = {}

  def save_torch_global(self, obj: Global):
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
    self.memoize(obj)

  dispatch[Global] = save_torch_global

  def persistent_id(self, obj):
    if not isinstance(obj, Storage):
      return None
    self.storages[obj.key] = obj
    storage_type = Global("torch", _STORAGE_NAMES[obj.data.dtype])
    pid = ("storage", storage_type, obj.key, "cpu", obj.data.size)
    return pid + (None,) if self.legacy else pid


def dumps(obj) -> tuple[bytes, dict[str, Storage]]:
  """(data.pkl bytes, {key: storage}) of `obj`, as save_zip would write them."""
  buf = io.BytesIO()
  pickler = _Pickler(buf, legacy=False)
  pickler.dump(obj)
  return buf.getvalue(), pickler.storages


def save_zip(obj, path, root: str = "archive") -> None:
  data_pkl, storages = dumps(obj)
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
    z.writestr(f"{root}/data.pkl", data_pkl)
    z.writestr(f"{root}/byteorder", "little")
    for key, storage in storages.items():
      little = storage.data.astype(storage.data.dtype.newbyteorder("<"))
      z.writestr(f"{root}/data/{key}", little.tobytes())
    z.writestr(f"{root}/version", "3\n")


def save_legacy(obj, path) -> None:
  with open(path, "wb") as f:
    pickle.dump(0x1950A86A20F9469CFC6C, f, protocol=2)
    pickle.dump(1001, f, protocol=2)
    pickle.dump({"protocol_version": 1001, "little_endian": True,
                 "type_sizes": {"short": 2, "int": 4, "long": 4}}, f, protocol=2)
    pickler = _Pickler(f, legacy=True)
    pickler.dump(obj)
    keys = sorted(pickler.storages)
    pickle.dump(keys, f, protocol=2)
    for key in keys:
      data = pickler.storages[key].data
      f.write(struct.pack("<q", data.size))
      f.write(data.tobytes())


def state_dict_file(state_dict: dict[str, np.ndarray], path, legacy: bool = False) -> None:
  """Saves {name: array} like torch.save(model.state_dict(), path)."""
  obj = collections.OrderedDict(
      (k, tensor(v, str(i))) for i, (k, v) in enumerate(state_dict.items()))
  (save_legacy if legacy else save_zip)(obj, path)


_MIB = 1 << 20


class DeflatedZeros:
  """A zip record of `size` zero bytes, deflated, that may declare another size.

  The stream is one 1 MiB block (compressed once, ended by a full flush so that
  it refers to nothing before it) repeated, then a final block: a 1 GiB record
  is about 1 MB and takes well under a second to build.
  """

  def __init__(self, size: int, declared_size: int | None = None):
    self.declared_size = size if declared_size is None else declared_size
    block = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = block.compress(bytes(_MIB)) + block.flush(zlib.Z_FULL_FLUSH)
    tail = zlib.compressobj(9, zlib.DEFLATED, -15)
    tail = tail.compress(bytes(size % _MIB)) + tail.flush()
    self.data = block * (size // _MIB) + tail
    crc, chunk = 0, bytes(_MIB)
    for start in range(0, self.declared_size, _MIB):  # The CRC of what is declared.
      crc = zlib.crc32(chunk[: min(_MIB, self.declared_size - start)], crc)
    self.crc = crc


def write_zip(path, records: dict) -> None:
  """Writes a zip of {name: bytes (stored) or DeflatedZeros} by hand (no zip64)."""
  local, central = io.BytesIO(), io.BytesIO()
  for name, record in records.items():
    if isinstance(record, DeflatedZeros):
      method, data, crc, size = 8, record.data, record.crc, record.declared_size
    else:
      method, data, crc, size = 0, bytes(record), zlib.crc32(record), len(record)
    encoded, offset = name.encode(), local.tell()
    local.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21,
                            crc, len(data), size, len(encoded), 0) + encoded + data)
    central.write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0,
                              0x21, crc, len(data), size, len(encoded), 0, 0, 0, 0,
                              0, offset) + encoded)
  end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(records), len(records),
                    central.tell(), local.tell(), 0)
  with open(path, "wb") as f:
    f.write(local.getvalue() + central.getvalue() + end)
