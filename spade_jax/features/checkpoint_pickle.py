"""Restricted, bounded unpickling of torch checkpoint pickles: no code runs.

PyTorch state dicts are pickles, and unpickling runs whatever callables a file
names, so a .pth from the internet is a program. `unpickle` resolves only the
globals in `ALLOWED_GLOBALS` (`collections.OrderedDict`, torch's tensor and
parameter rebuild functions, the typed storage classes), each mapped to a local
stand-in; any other global raises `UnsafeCheckpointError` before anything is
called. `materialize` then turns the tensors into NumPy arrays.

A small file must also never cost unbounded time or memory, so:
  * Before the real unpickler runs, `_prescan` walks the opcodes (pickletools)
    with an abstract stack. It refuses memo indices beyond the opcode count (the
    C unpickler would zero a memo table that large: a 10-byte pickle can ask for
    32 GiB), length fields beyond the data, and dict keys / set elements that
    expand to more than `MAX_KEY_COST` nodes (hashing a tuple walks it as a
    tree, so 40 levels of `(x, x)` would take 2**40 steps inside pickle).
  * The stand-ins refuse BUILD (`__setstate__` raises): a refused file cannot
    modify the shared allow-listed objects and poison later loads, nor rewrite
    a tensor after its checks. OrderedDict instances accept BUILD and drop the
    state (torch's `_metadata`).
  * A tensor may not have more elements than its storage (an expanded tensor,
    stride 0 over one element, would materialise without bound), and all
    tensors together at most `MAX_VIEW_EXPANSION` times the storages' bytes.
  * `materialize` builds each shared object once (by id), refuses cycles,
    nesting deeper than `MAX_DEPTH`, and object graphs that expand, counting
    each reference, to more than max(`MAX_GRAPH_NODES`, pickle bytes) nodes (a
    "billion laughs" pickle).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
import io
import math
import operator
import pickle
import pickletools
import reprlib
from typing import Any

import ml_dtypes
import numpy as np

MAX_PICKLE_BYTES = 64 << 20  # data.pkl, or a legacy file's leading pickles.
MAX_KEY_COST = 64  # Nodes (and int digits / 64 bits) hashed per dict key or set element.
MAX_DEPTH = 100  # Nesting of containers in the loaded object.
MAX_GRAPH_NODES = 1_000_000  # Objects counted per reference (or the pickle's byte size).
MAX_VIEW_EXPANSION = 2  # Bytes of all tensors per byte of the storages they view ...
VIEW_SLACK_BYTES = 16 << 20  # ... plus this.
MAX_NDIM = 32
MAX_DIM = 1 << 48

# torch storage class name -> NumPy dtype of its elements.
STORAGE_DTYPES = {
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


class TruncatedPickleError(CheckpointError):
  """The pickle ran past the end of the bytes given (more may follow in the file)."""


_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother = 3, 80, 80
short_repr = _repr.repr  # For untrusted objects in messages: bounded size and work.


# --------------------------------------------------------------------------
# Stand-ins for the torch objects a state-dict pickle refers to. None has a
# __dict__ and all refuse BUILD, so a pickle cannot modify them.


class _NoBuild:
  __slots__ = ()

  def __setstate__(self, state):
    del state
    raise UnsafeCheckpointError(
        f"refusing to modify {type(self).__name__} {self!r} with pickle BUILD; "
        "a weights file only builds tensors and dicts")


class StorageType(_NoBuild):
  """Stand-in for `torch.FloatStorage` etc.: only carries the dtype."""
  __slots__ = ("name", "dtype")

  def __init__(self, name: str):
    self.name = name
    self.dtype = STORAGE_DTYPES[name]

  def __repr__(self):
    return f"torch.{self.name}"


class Storage(_NoBuild):
  """A flat storage of `numel` elements; `data` is filled when its bytes are read."""
  __slots__ = ("dtype", "numel", "data")

  def __init__(self, dtype: np.dtype, numel: int):
    self.dtype = dtype
    self.numel = numel
    self.data: np.ndarray | None = None

  def __repr__(self):
    return f"storage of {self.numel} {self.dtype}"


def _ints(values: Any, what: str) -> tuple[int, ...]:
  if not isinstance(values, (tuple, list)) or len(values) > MAX_NDIM:
    raise CheckpointError(f"tensor {what} {short_repr(values)} is not a tuple of at "
                          f"most {MAX_NDIM} dimensions")
  try:
    values = tuple(operator.index(v) for v in values)
  except TypeError:
    raise CheckpointError(f"tensor {what} {short_repr(values)} is not integers") from None
  if any(v < 0 for v in values):
    raise CheckpointError(f"negative tensor {what} {values}")
  if any(v > MAX_DIM for v in values):
    raise CheckpointError(f"tensor {what} {values}: a dimension exceeds the limit 2**48")
  return values


class TensorRef(_NoBuild):
  """A tensor as (storage, offset, size, stride); checked when it is rebuilt."""
  __slots__ = ("storage", "offset", "size", "stride", "numel")

  def __init__(self, storage: Any, offset: Any, size: Any, stride: Any):
    if not isinstance(storage, Storage):
      raise CheckpointError(f"tensor storage is {type(storage).__name__}, not a storage")
    try:
      offset = operator.index(offset)
    except TypeError:
      raise CheckpointError(f"tensor offset {short_repr(offset)} is not an integer") from None
    if offset < 0:
      raise CheckpointError(f"negative tensor offset {offset}")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride):
      raise CheckpointError(f"tensor size {size} and stride {stride} differ in length")
    numel = math.prod(size)
    if numel > storage.numel:
      raise CheckpointError(
          f"tensor of size {size} has {numel} elements but its storage holds "
          f"{storage.numel} elements; a tensor may not have more elements than its "
          "storage (overlapping or zero strides, as in an expanded tensor)")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if numel and last >= storage.numel:
      raise CheckpointError(f"tensor of size {size} at offset {offset} reaches element "
                            f"{last} of a storage of {storage.numel}")
    self.storage, self.offset, self.size, self.stride, self.numel = (
        storage, offset, size, stride, numel)

  def __repr__(self):
    return f"tensor of size {self.size}"

  def to_numpy(self) -> np.ndarray:
    data = self.storage.data
    if data is None or data.size != self.storage.numel:
      raise CheckpointError("a tensor refers to a storage whose bytes are missing")
    if not self.numel:
      return np.zeros(self.size, data.dtype)
    strides = [s * data.itemsize if n > 1 else 0 for n, s in zip(self.size, self.stride)]
    view = np.lib.stride_tricks.as_strided(
        data[self.offset:], self.size, strides, writeable=False)
    return np.array(view)  # Own the memory; never alias the file buffer.


class PickledDict(collections.OrderedDict):
  """An OrderedDict from a pickle; BUILD (torch's `_metadata`) is ignored."""

  def __setstate__(self, state):
    del state


def _ordered_dict(*args):
  if args:
    raise CheckpointError("OrderedDict with constructor arguments (torch pickles none)")
  return PickledDict()


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  """torch._utils._rebuild_tensor{,_v2}: extra args are grad/hooks/metadata."""
  del unused
  return TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *unused):
  """torch._utils._rebuild_parameter{,_with_state}: a Parameter is its tensor."""
  del unused
  if not isinstance(data, TensorRef):
    raise CheckpointError(f"a Parameter wraps {type(data).__name__}, not a tensor")
  return data


class _Callable(_NoBuild):
  """An allow-listed callable; immutable, unlike the function it wraps."""
  __slots__ = ("_name", "_fn")

  def __init__(self, name: str, fn: Callable[..., Any]):
    self._name, self._fn = name, fn

  def __call__(self, *args):
    return self._fn(*args)

  def __repr__(self):
    return self._name


ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): _Callable("collections.OrderedDict", _ordered_dict),
    **{("torch._utils", name): _Callable(f"torch._utils.{name}", fn) for name, fn in (
        ("_rebuild_tensor", _rebuild_tensor), ("_rebuild_tensor_v2", _rebuild_tensor),
        ("_rebuild_parameter", _rebuild_parameter),
        ("_rebuild_parameter_with_state", _rebuild_parameter))},
    **{("torch", name): StorageType(name) for name in STORAGE_DTYPES},
}


# --------------------------------------------------------------------------
# Unpickling.


def _opcode_kinds() -> dict[str, tuple[str, int, bool, int]]:
  """opcode name -> (kind, items popped below any mark, pops to a mark, items pushed)."""
  kinds = dict.fromkeys(("PUT", "BINPUT", "LONG_BINPUT"), "put")
  kinds.update(dict.fromkeys(("GET", "BINGET", "LONG_BINGET"), "get"))
  kinds.update(dict.fromkeys(("TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"), "tuple"))
  kinds.update(dict.fromkeys(("INT", "LONG", "LONG1", "LONG4"), "int"))
  kinds.update(dict.fromkeys(("APPEND", "APPENDS", "BUILD", "READONLY_BUFFER"), "keep"))
  kinds.update(dict.fromkeys(("SETITEM", "SETITEMS", "DICT"), "dict"))
  kinds.update(dict.fromkeys(("ADDITEMS", "FROZENSET"), "set"))
  kinds.update(MARK="mark", POP="pop", DUP="dup", MEMOIZE="memoize")
  table = {}
  for op in pickletools.opcodes:
    before, mark = op.stack_before, pickletools.markobject
    npop = before.index(mark) if mark in before else len(before)
    table[op.name] = (kinds.get(op.name, "other"), npop, mark in before, len(op.stack_after))
  return table


_OPCODES = _opcode_kinds()


def _prescan(buf: io.BytesIO, where: str) -> None:
  """Walks the opcodes from buf's position to STOP with an abstract stack.

  Stack items are hashing costs: the tree size for tuples, 1 + bits / 64 for
  ints, 1 for anything else (str and bytes cache their hash), capped at
  MAX_KEY_COST + 1. Marks are stack positions (a fence), as in the C unpickler.
  """
  cap = MAX_KEY_COST + 1
  stack: list[int] = []
  marks: list[int] = []
  memo: dict[int, int] = {}
  ops = fence = 0

  def refuse(why: str):
    raise CheckpointError(f"{where}: corrupt pickle ({why})")

  def check_keys(costs: list[int], what: str):
    if costs and max(costs) > MAX_KEY_COST:
      raise CheckpointError(
          f"{where}: a {what} of more than {MAX_KEY_COST} nodes (limit MAX_KEY_COST); "
          "hashing it could take exponential time (shared tuples nested deep)")

  try:
    for op, arg, _ in pickletools.genops(buf):
      ops += 1
      kind, npop, to_mark, npush = _OPCODES[op.name]
      if kind == "other" and not to_mark:  # Most opcodes: pop and push plain items.
        if npop:
          if len(stack) - npop < fence:
            refuse(f"stack underflow at {op.name}")
          del stack[-npop:]
        if npush:
          stack.append(1)  # No plain opcode pushes more than one item.
        continue
      if kind == "mark":
        marks.append(len(stack))
        fence = len(stack)
        continue
      sliced: list[int] = []
      if to_mark or (kind == "pop" and marks and fence == len(stack)):
        if not marks:
          refuse(f"{op.name} without MARK")
        sliced, stack[fence:] = stack[fence:], []
        marks.pop()
        fence = marks[-1] if marks else 0
        npop = npop if to_mark else 0
      if len(stack) - npop < fence or (kind == "put" and len(stack) <= fence):
        refuse(f"stack underflow at {op.name}")
      popped = stack[len(stack) - npop:]
      del stack[len(stack) - npop:]
      if kind == "put":
        if not 0 <= arg < ops:  # Real pickles number the memo 0, 1, 2, ...
          refuse(f"memo index {arg} after {ops} opcodes; the unpickler would allocate "
                 "a memo table that large")
        memo[arg] = stack[-1]
      elif kind == "get":
        if arg not in memo:
          refuse(f"memo index {arg} was never set")
        stack.append(memo[arg])
      elif kind == "memoize":
        memo[len(memo)] = popped[0]
        stack += popped
      elif kind == "dup":
        stack += popped * 2
      elif kind == "tuple":
        stack.append(min(cap, 1 + sum(sliced or popped)))
      elif kind == "int":
        stack.append(min(cap, 1 + abs(int(arg)).bit_length() // 64))
      elif kind == "keep":
        stack += popped[:1]
      elif kind == "dict":
        check_keys(popped[1:2] if op.name == "SETITEM" else sliced[0::2], "dict key")
        stack += popped[:1] if op.name != "DICT" else [1]
      elif kind == "set":
        check_keys(sliced, "set element")
        stack += popped[:1] if op.name == "ADDITEMS" else [1]
      else:  # "pop", or a plain opcode that pops to a mark.
        stack += [1] * npush
  except CheckpointError:
    raise
  except Exception as e:  # genops: ValueError (truncated, unknown opcode), OverflowError...
    cls = TruncatedPickleError if not buf.read(1) else CheckpointError
    raise cls(f"{where}: corrupt or truncated pickle ({type(e).__name__}: {str(e)[:200]})") from e


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only allow-listed globals; storages come from `load_storage`."""

  def __init__(self, file: io.BytesIO, where: str, load_storage: Callable[[Any], Any] | None):
    super().__init__(file)
    self._where = where
    self._load_storage = load_storage

  def find_class(self, module: str, name: str) -> Any:
    try:
      return ALLOWED_GLOBALS[(module, name)]
    except (KeyError, TypeError):
      raise UnsafeCheckpointError(
          f"{self._where}: refusing to load global {short_repr(module)}.{short_repr(name)}; "
          "a weights file may only contain tensors and (ordered) dicts. Nothing was "
          "executed.") from None

  def persistent_load(self, pid: Any) -> Any:
    if self._load_storage is None:
      raise CheckpointError(f"{self._where}: unexpected persistent id {short_repr(pid)}")
    return self._load_storage(pid)


def unpickle(data: bytes, offset: int, where: str,
             load_storage: Callable[[Any], Any] | None = None) -> tuple[Any, int]:
  """Unpickles the pickle at data[offset:] safely; returns (object, end offset).

  Raises:
    UnsafeCheckpointError: the pickle names a global outside ALLOWED_GLOBALS.
    TruncatedPickleError: the pickle continues past the end of `data`.
    CheckpointError: anything else the limits above refuse.
  """
  buf = io.BytesIO(data)
  buf.seek(offset)
  _prescan(buf, where)
  end = buf.tell()
  buf.seek(offset)
  obj = _RestrictedUnpickler(buf, where, load_storage).load()
  if buf.tell() != end:
    raise CheckpointError(f"{where}: corrupt pickle (ends at {buf.tell()}, not {end})")
  return obj, end


def parse_storage_pid(pid: Any, where: str) -> tuple[np.dtype, str, int]:
  """('storage', type, key, location, numel[, view]) -> (dtype, key, numel)."""
  if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] in ("storage", b"storage")):
    raise CheckpointError(f"{where}: unsupported persistent id {short_repr(pid)}")
  storage_type, key, numel = pid[1], pid[2], pid[4]
  if not isinstance(storage_type, StorageType):
    raise CheckpointError(f"{where}: unsupported storage type {short_repr(storage_type)}")
  if len(pid) > 5 and pid[5] is not None:
    raise CheckpointError(f"{where}: storage views are not supported")
  if not isinstance(key, (str, bytes)) or not isinstance(numel, int) or numel < 0:
    raise CheckpointError(f"{where}: bad storage key or size in {short_repr(pid)}")
  key = key.decode("ascii", "replace") if isinstance(key, bytes) else key
  return storage_type.dtype, key, numel


# --------------------------------------------------------------------------
# Tensors -> arrays.


class _Materializer:
  """Replaces TensorRefs by arrays in nested dicts/lists/tuples, each object once."""

  def __init__(self, where: str, storage_bytes: int, pickle_bytes: int):
    self._where = where
    self._done: dict[int, tuple[Any, int]] = {}  # id -> (result, nodes as a tree)
    self._active: set[int] = set()
    self._max_nodes = max(MAX_GRAPH_NODES, pickle_bytes)
    self._tensor_budget = MAX_VIEW_EXPANSION * storage_bytes + VIEW_SLACK_BYTES
    self._tensor_bytes = 0

  def _count(self, nodes: int) -> int:
    if nodes > self._max_nodes:
      raise CheckpointError(
          f"{self._where}: the pickled objects expand to more than {self._max_nodes} "
          f"nodes when shared references are counted each time (limit max(MAX_GRAPH_NODES="
          f"{MAX_GRAPH_NODES}, the pickle's bytes)): a 'billion laughs' pickle")
    return nodes

  def _tensor(self, ref: TensorRef) -> np.ndarray:
    self._tensor_bytes += ref.numel * ref.storage.dtype.itemsize
    if self._tensor_bytes > self._tensor_budget:
      raise CheckpointError(
          f"{self._where}: tensors take more than {self._tensor_budget} bytes, "
          f"{MAX_VIEW_EXPANSION}x the bytes of the storages they view plus "
          f"{VIEW_SLACK_BYTES >> 20} MiB (limit MAX_VIEW_EXPANSION): overlapping views")
    return ref.to_numpy()

  def __call__(self, obj: Any, depth: int = 0) -> tuple[Any, int]:
    if not isinstance(obj, (dict, list, tuple, TensorRef)):
      return obj, 1
    key = id(obj)
    if key in self._done:
      return self._done[key]
    if key in self._active:
      raise CheckpointError(f"{self._where}: the pickled object contains itself (a cycle)")
    if depth >= MAX_DEPTH:
      raise CheckpointError(f"{self._where}: objects nested deeper than {MAX_DEPTH} levels")
    self._active.add(key)
    nodes = 1
    if isinstance(obj, TensorRef):
      result = self._tensor(obj)
    elif isinstance(obj, dict):
      result = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
      for k, v in obj.items():
        result[k], n = self(v, depth + 1)
        nodes = self._count(nodes + 1 + n)
    else:
      items = []
      for v in obj:
        item, n = self(v, depth + 1)
        items.append(item)
        nodes = self._count(nodes + n)
      result = items if isinstance(obj, list) else tuple(items)
    self._active.discard(key)
    self._done[key] = result, nodes
    return result, nodes


def materialize(obj: Any, where: str, storages: list[Storage], pickle_bytes: int) -> Any:
  """Replaces every TensorRef in nested dicts/lists/tuples by a NumPy array.

  Shared objects are built once (and stay shared); `storages` are those loaded,
  whose bytes bound the tensors' bytes; `pickle_bytes` bounds the graph size.
  """
  storage_bytes = sum(s.data.nbytes for s in storages if s.data is not None)
  return _Materializer(where, storage_bytes, pickle_bytes)(obj)[0]
