"""Reads PyTorch checkpoints without torch; reads and writes converted weights.

PyTorch state dicts are pickles; they are read with the restricted, bounded
unpickler of `checkpoint_pickle` (no code runs; see there for the limits on
what a pickle may cost). Two torch containers are supported:
  * zip (torch >= 1.6 default): `<root>/data.pkl` plus one raw little-endian
    file per storage, `<root>/data/<key>`.
  * legacy (torch < 1.6, `_use_new_zipfile_serialization=False`): four pickles
    (magic number, protocol version, sys info, the object), a pickled list of
    storage keys, then for each key an int64 element count and the raw bytes.

A small file must not cost unbounded memory: a zip record is only read if its
declared size is exactly what the pickle's storage needs, its compression is
stored or deflate at a ratio deflate can reach, and all records together expand
to at most max(ZIP_EXPANSION_SLACK, MAX_ZIP_EXPANSION x the file's size); reads
never go past the declared size. Legacy storages must fit in the file.

Converted weights are flat `{name: array}` maps in safetensors (preferred: no
pickle, memory-mappable) or .npz (loaded with allow_pickle=False, after the same
zip checks). Writes go to a temporary file in the destination folder and are
moved into place with os.replace, so a crash never leaves a half-written file
under the final name.
"""

from __future__ import annotations

from collections.abc import Mapping
import json
import os
import pathlib
import struct
from typing import Any
import zipfile

import numpy as np

from spade_jax.features import checkpoint_pickle
from spade_jax.features.checkpoint_pickle import CheckpointError, UnsafeCheckpointError
from spade_jax.host import atomic

__all__ = ["CheckpointError", "UnsafeCheckpointError", "read_torch", "read_torch_state_dict",
           "sniff_format", "save_converted", "load_converted"]

PathLike = str | os.PathLike

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_SAFETENSORS_META_KEY = "spade_jax"
_NPZ_META_KEY = "__spade_jax_metadata__"

MAX_ZIP_EXPANSION = 16  # Bytes read from a zip's records per byte of the file ...
ZIP_EXPANSION_SLACK = 64 << 20  # ... or this many, whichever is larger.
_MAX_DEFLATE_RATIO = 1032  # Deflate cannot expand more (258 bytes per 2 bits).
_LEGACY_HEAD = 1 << 20  # First read of a legacy file's pickles; grows x4 to MAX_PICKLE_BYTES.


# --------------------------------------------------------------------------
# Zip records, read within limits.


class _ZipBudget:
  """Checks records before they are read; counts the bytes they expand to."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    self.file_bytes = path.stat().st_size
    self.limit = max(ZIP_EXPANSION_SLACK, MAX_ZIP_EXPANSION * self.file_bytes)
    self.spent = 0

  def check(self, info: zipfile.ZipInfo) -> None:
    """Refuses a record whose sizes no honest zip of this file could have."""
    where = f"{self.path}: record {info.filename}"
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
      raise CheckpointError(f"{where} uses compression method {info.compress_type}; "
                            "only stored and deflated records are read")
    if info.compress_size > self.file_bytes or (
        info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size):
      raise CheckpointError(f"{where} declares {info.compress_size} bytes in a file of "
                            f"{self.file_bytes} (stored size {info.file_size})")
    if info.file_size > _MAX_DEFLATE_RATIO * info.compress_size + 1024:
      raise CheckpointError(f"{where} claims to expand {info.compress_size} bytes to "
                            f"{info.file_size}, more than deflate can (a zip bomb)")
    self.spent += info.file_size
    if self.spent > self.limit:
      raise CheckpointError(
          f"{self.path}: records expand to more than {self.limit} bytes, the limit for a "
          f"{self.file_bytes}-byte file (max({ZIP_EXPANSION_SLACK >> 20} MiB, "
          f"{MAX_ZIP_EXPANSION}x the file size)); refusing a zip bomb")

  def read(self, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """The record's bytes: checked first, never more than declared."""
    self.check(info)
    with archive.open(info) as f:
      raw = f.read(info.file_size)
    if len(raw) != info.file_size:
      raise CheckpointError(f"{self.path}: record {info.filename} is truncated")
    return raw


def _zip_info(archive: zipfile.ZipFile, name: str, path: pathlib.Path) -> zipfile.ZipInfo:
  try:
    return archive.getinfo(name)
  except KeyError:
    raise CheckpointError(f"{path}: record {name} is missing") from None


# --------------------------------------------------------------------------
# torch containers.


def _read_zip(path: pathlib.Path) -> Any:
  """torch >= 1.6 zip container."""
  budget = _ZipBudget(path)
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
      info = archive.getinfo(root + "byteorder")
      budget.check(info)
      with archive.open(info) as f:
        big_endian = f.read(16).strip() == b"big"
    storages: dict[str, checkpoint_pickle.Storage] = {}

    def load_storage(pid):
      dtype, key, numel = checkpoint_pickle.parse_storage_pid(pid, str(path))
      if key not in storages:
        info = _zip_info(archive, f"{root}data/{key}", path)
        nbytes = numel * dtype.itemsize
        if info.file_size != nbytes:  # Checked before reading anything.
          raise CheckpointError(
              f"{path}: record data/{key} holds {info.file_size} bytes but the pickle's "
              f"storage of {numel} {dtype} elements needs {nbytes}")
        storage = checkpoint_pickle.Storage(dtype, numel)
        raw = budget.read(archive, info)
        file_dtype = dtype.newbyteorder(">") if big_endian else dtype
        storage.data = np.frombuffer(raw, file_dtype)
        if big_endian:
          storage.data = storage.data.astype(dtype)
        storages[key] = storage
      return storages[key]

    info = archive.getinfo(pkl[0])
    if info.file_size > checkpoint_pickle.MAX_PICKLE_BYTES:
      raise CheckpointError(
          f"{path}: data.pkl is {info.file_size} bytes, over the limit of "
          f"{checkpoint_pickle.MAX_PICKLE_BYTES} (MAX_PICKLE_BYTES)")
    data = budget.read(archive, info)
    obj, _ = checkpoint_pickle.unpickle(data, 0, str(path), load_storage)
  return checkpoint_pickle.materialize(obj, str(path), list(storages.values()), len(data))


def _legacy_pickles(head: bytes, path: pathlib.Path, load_storage) -> tuple[Any, list, int, int]:
  """The five pickles at the start of a legacy file -> (obj, keys, end, obj's bytes)."""
  where = str(path)
  magic, end = checkpoint_pickle.unpickle(head, 0, where)
  if magic != _LEGACY_MAGIC:
    raise CheckpointError(f"{path}: not a torch checkpoint (bad magic number)")
  protocol, end = checkpoint_pickle.unpickle(head, end, where)
  if protocol != _LEGACY_PROTOCOL:
    raise CheckpointError(f"{path}: unsupported torch protocol version "
                          f"{checkpoint_pickle.short_repr(protocol)}")
  sys_info, end = checkpoint_pickle.unpickle(head, end, where)
  if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
    raise CheckpointError(f"{path}: big-endian legacy checkpoints are not supported")
  start = end
  obj, end = checkpoint_pickle.unpickle(head, end, where, load_storage)
  obj_bytes = end - start
  keys, end = checkpoint_pickle.unpickle(head, end, where)
  if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
    raise CheckpointError(f"{path}: corrupt torch checkpoint (no storage key list)")
  return obj, keys, end, obj_bytes


def _read_legacy(path: pathlib.Path) -> Any:
  """torch < 1.6 legacy container (pickles followed by raw storages)."""
  storages: dict[str, checkpoint_pickle.Storage] = {}

  def load_storage(pid):
    dtype, key, numel = checkpoint_pickle.parse_storage_pid(pid, str(path))
    if key not in storages:
      storages[key] = checkpoint_pickle.Storage(dtype, numel)
    return storages[key]

  file_size = path.stat().st_size
  limit = checkpoint_pickle.MAX_PICKLE_BYTES
  size = min(file_size, _LEGACY_HEAD, limit)
  with open(path, "rb") as f:
    while True:  # The pickles' length is unknown: read more until they fit.
      f.seek(0)
      head = f.read(size)
      storages.clear()
      try:
        obj, keys, end, obj_bytes = _legacy_pickles(head, path, load_storage)
        break
      except checkpoint_pickle.TruncatedPickleError:
        if size >= file_size:
          raise
        if size >= limit:
          raise CheckpointError(f"{path}: the pickles are longer than {limit} bytes "
                                "(MAX_PICKLE_BYTES)") from None
        size = min(file_size, 4 * size, limit)
    del head
    f.seek(end)
    for key in keys:
      storage = storages.get(key)
      if storage is None:
        raise CheckpointError(f"{path}: storage {checkpoint_pickle.short_repr(key)} is "
                              "listed but never used")
      header = f.read(8)
      if len(header) != 8:
        raise CheckpointError(f"{path}: truncated: storage {key} is missing")
      (numel,) = struct.unpack("<q", header)
      nbytes = numel * storage.dtype.itemsize
      if numel != storage.numel or not 0 <= nbytes <= file_size - f.tell():
        raise CheckpointError(f"{path}: truncated or corrupt storage {key} ({numel} "
                              f"elements; the pickle says {storage.numel})")
      raw = f.read(nbytes)
      if len(raw) != nbytes:
        raise CheckpointError(f"{path}: truncated storage {key}")
      storage.data = np.frombuffer(raw, storage.dtype)
  return checkpoint_pickle.materialize(obj, str(path), list(storages.values()), obj_bytes)


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
  except CheckpointError as e:
    if str(path) in str(e):
      raise
    raise type(e)(f"{path}: {e}") from e  # Raised by a stand-in that knows no path.
  except Exception as e:  # Damaged pickles / zips raise many types (EOF, Key, Memory...).
    raise CheckpointError(f"{path}: corrupt or truncated torch checkpoint "
                          f"({type(e).__name__}: {str(e)[:200]})") from e


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
  """Whether the file's first pickle (of < 64 bytes) is torch's legacy magic number."""
  try:
    with open(path, "rb") as f:
      head = f.read(64)
    return checkpoint_pickle.unpickle(head, 0, str(path))[0] == _LEGACY_MAGIC
  except Exception:  # Anything unreadable, or a refused global, is "not torch".
    return False


def sniff_format(path: PathLike) -> str:
  """Returns 'torch_zip', 'torch_legacy', 'npz', 'safetensors' or 'unknown'."""
  path = pathlib.Path(path)
  if path.is_dir():
    raise CheckpointError(f"{path}: is a directory; expected a weights file")
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
      budget = _ZipBudget(path)
      with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():  # Refuses a zip bomb before numpy reads it.
          budget.check(info)
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
