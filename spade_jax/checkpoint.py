"""Reads PyTorch checkpoints without torch; reads and writes converted weights.

PyTorch state dicts are pickles. Unpickling runs whatever callables the file
names, so a .pth from the internet is a program. This module reads them with a
restricted unpickler: the only globals it resolves are `collections.OrderedDict`,
torch's tensor/parameter rebuild functions and the typed storage classes, each
mapped to a local NumPy stand-in. Any other global (os.system, builtins.eval,
...) raises `UnsafeCheckpointError` before anything is called.

Two torch containers are supported:
  * zip (torch >= 1.6 default): `<root>/data.pkl` plus one raw little-endian
    file per storage, `<root>/data/<key>`.
  * legacy (torch < 1.6, `_use_new_zipfile_serialization=False`): four pickles
    (magic number, protocol version, sys info, the object), a pickled list of
    storage keys, then for each key an int64 element count and the raw bytes.

Converted weights are flat `{name: array}` maps in safetensors (preferred: no
pickle, memory-mappable) or .npz (loaded with allow_pickle=False). Writes go to
a temporary file in the destination folder and are moved into place with
os.replace, so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pathlib
import pickle
import struct
import zipfile
from typing import Any, BinaryIO, Mapping

import ml_dtypes
import numpy as np

from spade_jax import atomic

PathLike = str | os.PathLike

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_SAFETENSORS_META_KEY = "spade_jax"
_NPZ_META_KEY = "__spade_jax_metadata__"

# torch storage class name -> NumPy dtype of its elements.
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "UntypedStorage": np.dtype(np.uint8),
}


class CheckpointError(ValueError):
  """A weights file is unreadable, truncated, or not a checkpoint."""


class UnsafeCheckpointError(CheckpointError):
  """A pickle names a global outside the allow-list; nothing was executed."""


# --------------------------------------------------------------------------
# Stand-ins for the torch objects a state-dict pickle refers to.


class _StorageType:
  """Stand-in for `torch.FloatStorage` etc.: only carries the dtype."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = _STORAGE_DTYPES[name]


class _Storage:
  """A flat storage; `data` is filled when its bytes are read."""

  def __init__(self, dtype: np.dtype, numel: int):
    self.dtype = dtype
    self.numel = numel
    self.data: np.ndarray | None = None


class _TensorRef:
  """A tensor as (storage, offset, size, stride); materialized after loading."""

  def __init__(self, storage, offset, size, stride):
    if not isinstance(storage, _Storage):
      raise CheckpointError(f"tensor storage is {type(storage).__name__}, not a storage")
    self.storage = storage
    self.offset = int(offset)
    self.size = tuple(int(s) for s in size)
    self.stride = tuple(int(s) for s in stride)

  def to_numpy(self) -> np.ndarray:
    data = self.storage.data
    if data is None:
      raise CheckpointError("a tensor refers to a storage whose bytes are missing")
    if len(self.size) != len(self.stride) or any(s < 0 for s in self.size + self.stride):
      raise CheckpointError(f"bad tensor size/stride {self.size}/{self.stride}")
    if 0 in self.size:
      return np.zeros(self.size, data.dtype)
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if self.offset < 0 or last >= data.size:
      raise CheckpointError(
          f"tensor of size {self.size} reaches element {last} of a storage of {data.size}")
    item = data.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        data[self.offset:], self.size, [s * item for s in self.stride], writeable=False)
    return np.array(view)  # Own the memory; never alias the file buffer.


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  """torch._utils._rebuild_tensor{,_v2}: extra args are grad/hooks/metadata."""
  del unused
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *unused):
  """torch._utils._rebuild_parameter{,_with_state}: a Parameter is its data."""
  del unused
  return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only allow-listed globals; storages come from `load_storage`."""

  def __init__(self, file: BinaryIO, path: pathlib.Path, load_storage=None):
    super().__init__(file)
    self._path = path
    self._load_storage = load_storage

  def find_class(self, module: str, name: str) -> Any:
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except (KeyError, TypeError):
      raise UnsafeCheckpointError(
          f"{self._path}: refusing to load global {module}.{name}; a weights "
          "file may only contain tensors and (ordered) dicts. Nothing was "
          "executed.") from None

  def persistent_load(self, pid: Any) -> Any:
    if self._load_storage is None:
      raise CheckpointError(f"{self._path}: unexpected persistent id {pid!r}")
    return self._load_storage(pid)


def _materialize(obj: Any) -> Any:
  """Replaces every _TensorRef in nested dicts/lists/tuples by a NumPy array."""
  if isinstance(obj, _TensorRef):
    return obj.to_numpy()
  if isinstance(obj, dict):
    return type(obj)((k, _materialize(v)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialize(v) for v in obj)
  return obj


def _parse_storage_pid(pid: Any, path: pathlib.Path) -> tuple[np.dtype, str, int]:
  """('storage', type, key, location, numel[, view]) -> (dtype, key, numel)."""
  if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] in ("storage", b"storage")):
    raise CheckpointError(f"{path}: unsupported persistent id {pid!r}")
  storage_type, key, numel = pid[1], pid[2], pid[4]
  if not isinstance(storage_type, _StorageType):
    raise CheckpointError(f"{path}: unsupported storage type {storage_type!r}")
  if len(pid) > 5 and pid[5] is not None:
    raise CheckpointError(f"{path}: storage views are not supported")
  key = key.decode("ascii") if isinstance(key, bytes) else str(key)
  return storage_type.dtype, key, int(numel)


# --------------------------------------------------------------------------
# torch containers.


def _read_zip(path: pathlib.Path) -> Any:
  """torch >= 1.6 zip container."""
  try:
    archive = zipfile.ZipFile(path)
  except zipfile.BadZipFile as e:
    raise CheckpointError(f"{path}: corrupt or truncated zip checkpoint ({e})") from e
  with archive:
    names = archive.namelist()
    pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
      raise CheckpointError(f"{path}: zip file without a torch data.pkl record")
    root = pkl[0][: -len("data.pkl")]
    big_endian = False
    if root + "byteorder" in names:
      big_endian = archive.read(root + "byteorder").strip() == b"big"
    storages: dict[str, _Storage] = {}

    def load_storage(pid):
      dtype, key, numel = _parse_storage_pid(pid, path)
      if key not in storages:
        storage = _Storage(dtype, numel)
        try:
          raw = archive.read(f"{root}data/{key}")
        except KeyError:
          raise CheckpointError(f"{path}: storage record data/{key} is missing") from None
        if len(raw) < numel * dtype.itemsize:
          raise CheckpointError(f"{path}: storage data/{key} is truncated")
        file_dtype = dtype.newbyteorder(">") if big_endian else dtype
        storage.data = np.frombuffer(raw, file_dtype, count=numel).astype(dtype)
        storages[key] = storage
      return storages[key]

    with archive.open(pkl[0]) as f:
      obj = _RestrictedUnpickler(io.BytesIO(f.read()), path, load_storage).load()
  return _materialize(obj)


def _read_legacy(path: pathlib.Path) -> Any:
  """torch < 1.6 legacy container (pickles followed by raw storages)."""
  storages: dict[str, _Storage] = {}

  def load_storage(pid):
    dtype, key, numel = _parse_storage_pid(pid, path)
    if key not in storages:
      storages[key] = _Storage(dtype, numel)
    return storages[key]

  file_size = path.stat().st_size
  with open(path, "rb") as f:
    magic = _RestrictedUnpickler(f, path).load()
    if magic != _LEGACY_MAGIC:
      raise CheckpointError(f"{path}: not a torch checkpoint (bad magic number)")
    protocol = _RestrictedUnpickler(f, path).load()
    if protocol != _LEGACY_PROTOCOL:
      raise CheckpointError(f"{path}: unsupported torch protocol version {protocol!r}")
    sys_info = _RestrictedUnpickler(f, path).load()
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
      raise CheckpointError(f"{path}: big-endian legacy checkpoints are not supported")
    obj = _RestrictedUnpickler(f, path, load_storage).load()
    keys = _RestrictedUnpickler(f, path).load()
    if not isinstance(keys, list):
      raise CheckpointError(f"{path}: corrupt torch checkpoint (no storage key list)")
    for key in keys:
      storage = storages.get(str(key))
      if storage is None:
        raise CheckpointError(f"{path}: storage {key!r} is listed but never used")
      header = f.read(8)
      if len(header) != 8:
        raise CheckpointError(f"{path}: truncated: storage {key} is missing")
      (numel,) = struct.unpack("<q", header)
      nbytes = numel * storage.dtype.itemsize
      if numel != storage.numel or not 0 <= nbytes <= file_size - f.tell():
        raise CheckpointError(f"{path}: truncated or corrupt storage {key}")
      raw = f.read(nbytes)
      storage.data = np.frombuffer(raw, storage.dtype).copy()
  return _materialize(obj)


def read_torch(path: PathLike) -> Any:
  """Unpickles a torch.save file safely; tensors become NumPy arrays.

  Args:
    path: a file written by torch.save (zip or legacy container).

  Returns:
    The saved object with every tensor replaced by an np.ndarray.

  Raises:
    UnsafeCheckpointError: the pickle names a non-allow-listed global.
    CheckpointError: the file is missing, truncated or not a torch checkpoint.
  """
  path = pathlib.Path(path)
  kind = sniff_format(path)
  readers = {"torch_zip": _read_zip, "torch_legacy": _read_legacy}
  if kind not in readers:
    raise CheckpointError(f"{path}: not a torch checkpoint (looks like {kind})")
  try:
    return readers[kind](path)
  except CheckpointError:
    raise
  except Exception as e:  # Damaged pickles / zips raise many types (EOF, Key, Memory...).
    raise CheckpointError(f"{path}: corrupt or truncated torch checkpoint ({e!r})") from e


def _as_state_dict(obj: Any, path: pathlib.Path) -> dict[str, np.ndarray]:
  """Accepts a flat state dict, or one wrapped in {'state_dict': ...}/{'model': ...}."""
  if isinstance(obj, dict) and len(obj) == 1:
    (key, inner), = obj.items()
    if key in ("state_dict", "model") and isinstance(inner, dict):
      obj = inner
  if not isinstance(obj, dict) or not all(
      isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()):
    raise CheckpointError(f"{path}: not a state dict of named tensors")
  return dict(obj)


def read_torch_state_dict(path: PathLike) -> dict[str, np.ndarray]:
  """Reads a torch state dict {name: tensor} as {name: np.ndarray}."""
  path = pathlib.Path(path)
  return _as_state_dict(read_torch(path), path)


# --------------------------------------------------------------------------
# Converted (torch-free) formats.


def _starts_with_legacy_magic(path: pathlib.Path) -> bool:
  """Whether the file's first pickle is torch's legacy magic number (an int)."""
  try:
    with open(path, "rb") as f:
      return _RestrictedUnpickler(f, path).load() == _LEGACY_MAGIC
  except Exception:  # Anything unreadable, or a refused global, is "not torch".
    return False


def sniff_format(path: PathLike) -> str:
  """Returns 'torch_zip', 'torch_legacy', 'npz', 'safetensors' or 'unknown'."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise CheckpointError(f"{path}: weights file does not exist")
  with open(path, "rb") as f:
    head = f.read(16)
  if head[:4] == b"PK\x03\x04":
    try:
      with zipfile.ZipFile(path) as z:
        names = z.namelist()
    except Exception as e:  # BadZipFile, NotImplementedError (damaged version field)...
      raise CheckpointError(f"{path}: corrupt or truncated zip file ({e!r})") from e
    if any(n.endswith("/data.pkl") for n in names):
      return "torch_zip"
    if names and all(n.endswith(".npy") for n in names):
      return "npz"
    return "unknown"
  if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # A pickle.
    if _starts_with_legacy_magic(path):
      return "torch_legacy"
    return "unknown"
  if len(head) >= 9:
    (header_len,) = struct.unpack("<Q", head[:8])
    if 2 <= header_len < 100_000_000 and head[8:9] == b"{":
      return "safetensors"
  return "unknown"


def save_converted(path: PathLike, arrays: Mapping[str, np.ndarray],
                   metadata: Mapping[str, str] | None = None) -> pathlib.Path:
  """Writes {name: array} as .safetensors or .npz (by suffix), atomically.

  Args:
    path: destination ending in .safetensors or .npz.
    arrays: flat map of names to NumPy arrays.
    metadata: optional string metadata stored next to the arrays.

  Returns:
    The destination path.
  """
  path = pathlib.Path(path)
  suffix = path.suffix.lower()
  if suffix not in (".safetensors", ".npz"):
    raise ValueError(f"converted weights must end in .safetensors or .npz, got {path}")
  arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
  for name, array in arrays.items():
    if array.dtype.kind not in "biuf":  # Never pickle objects into a weights file.
      raise ValueError(f"{name}: cannot store dtype {array.dtype} in converted weights")
  meta = json.dumps(dict(metadata or {}), sort_keys=True)
  path.parent.mkdir(parents=True, exist_ok=True)
  with atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
    if suffix == ".safetensors":
      import safetensors.numpy  # pylint: disable=g-import-not-at-top
      f.write(safetensors.numpy.save(arrays, metadata={_SAFETENSORS_META_KEY: meta}))
    else:
      np.savez(f, allow_pickle=False, **arrays, **{_NPZ_META_KEY: np.array(meta)})
  return path


def load_converted(path: PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Reads a file written by `save_converted`; returns (arrays, metadata)."""
  path = pathlib.Path(path)
  kind = sniff_format(path)
  try:
    if kind == "safetensors":
      import safetensors  # pylint: disable=g-import-not-at-top
      with safetensors.safe_open(str(path), framework="numpy") as f:
        meta = (f.metadata() or {}).get(_SAFETENSORS_META_KEY, "{}")
        arrays = {k: f.get_tensor(k) for k in f.keys()}
    elif kind == "npz":
      with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files if k != _NPZ_META_KEY}
        meta = str(f[_NPZ_META_KEY]) if _NPZ_META_KEY in f.files else "{}"
    else:
      raise CheckpointError(f"{path}: not a converted weights file (looks like {kind})")
    metadata = json.loads(meta)
  except CheckpointError:
    raise
  except Exception as e:  # safetensors / zipfile / json raise many types.
    raise CheckpointError(f"{path}: corrupt or truncated converted weights ({e})") from e
  return arrays, metadata
