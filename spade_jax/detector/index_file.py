"""Index files of the three detectors: save_index / load_index, integrity-checked, atomic.

An index file is safetensors. A SpadeIndex holds tensors "pool" [M, D] and
"features/<level>" [M, h, w, C], plus "kernels/<part>/<parameter>" when it holds
fitted kernels; a PatchCoreIndex holds "bank" [B, D] (the memory bank, without a
sharded bank's padding), and "kernels/bank/<parameter>" when fitted for a kernel
metric; all float32. A PadimIndex holds "mean" [P, d] and
"precision" [P, d, d] float32 (without a sharded index's padding) and "channels" [d]
int32 (index_padim.py). The string metadata are
  format          INDEX_FORMAT (SPADE), PATCHCORE_INDEX_FORMAT or PADIM_INDEX_FORMAT
  version         "2" (checksummed), or INDEX_VERSION = "3" for a SPADE or PatchCore
                  file with a "kernels" field (so that a spade_jax that reads version
                  2 only refuses it with a clear message); both are read
  backbone        the backbone name
  feature_config  the index's feature_config (JSON: SPADE: backbone, layers, resize,
                  crop; PatchCore: also patch_size, embed_dim, reduction and, for a
                  random projection, reduction_seed; PaDiM: also num_features and
                  feature_seed)
  levels          JSON list of the levels, in order (PatchCore: the layers whose
                  patch features the bank holds; PaDiM: the embedding's layers)
  checksums       JSON {tensor name: "sha256:<hex>"} over each tensor's name, dtype,
                  shape and bytes, plus "__metadata__" over the other fields.
  threshold       optional: a decision threshold calibrated on the training images
                  (calibration.Threshold's JSON)
  weights         optional: the identity of the backbone's weights the features were
                  computed with (Backbone.weights_id, "sha256:<64 hex digits>");
                  scoring and load_index(expect=detector) refuse other weights
  settings        optional: the detector settings the index was fitted with (a JSON
                  object, e.g. fit.py's k_images, kappa, weights), scripts' defaults
  kernels         optional (SPADE): what was fitted for a kernel metric or a soft
                  aggregate (SpadeIndex.kernels / fitted_metric / bandwidths), JSON
                  {"metric": fitted_metric, "spec": kernels.kernel_to_arrays' spec of
                  {part: kernel} (null for a fixed metric), "bandwidths": {part: h}};
                  (PatchCore) the kernel of a kernel metric, the same JSON with the
                  one part "bank" and bandwidths {} (index_kernels.py)
  padim           PaDiM only, required: JSON {"grid": [h, w], "num_channels": C,
                  "regularization", "epsilon"} (index_padim.py)
The optional fields are covered by "__metadata__" too, the kernels' tensors by their
own checksums. load_index checks all of it before it returns an index; load_index_file
also returns the optional fields. Nothing in a file is executed: the kernel spec is
JSON, checked field by field (kernels.io.check_spec), and its kernel names are only
looked up in the registry (spade_jax.kernels.KERNELS).
"""

from __future__ import annotations

from collections.abc import Sequence
import hashlib
import json
import os
import pathlib
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from safetensors import numpy as safetensors_numpy
from safetensors import safe_open

from spade_jax.detector import common, index_kernels, index_padim, padim, patchcore
from spade_jax.detector.calibration import Threshold
from spade_jax.detector.padim import Padim, PadimConfig, PadimIndex
from spade_jax.detector.patchcore import PatchCore, PatchCoreConfig, PatchCoreIndex
from spade_jax.detector.spade import Spade, SpadeConfig, SpadeIndex, check_compatible
from spade_jax.features import patches
from spade_jax.host import atomic
from spade_jax.search import sharding

INDEX_FORMAT = "spade_jax.SpadeIndex"
PATCHCORE_INDEX_FORMAT = "spade_jax.PatchCoreIndex"
PADIM_INDEX_FORMAT = index_padim.PADIM_FORMAT  # "spade_jax.PadimIndex"
INDEX_VERSION = "3"  # 3: kernels; 2: checksums (1 had none; PatchCore files start at 2).
_READ_VERSIONS = ("2", "3")
_PLAIN_VERSION = "2"  # What a file without kernels is written as.


_CHECKSUM_ALGORITHM = "sha256"
_METADATA_DIGEST_KEY = "__metadata__"
_REQUIRED_METADATA = ("backbone", "feature_config", "levels", "checksums")
_FEATURE_CONFIG_KEYS = sorted(json.loads(SpadeConfig().feature_config("")))
_PATCHCORE_CONFIG_KEYS = sorted(json.loads(PatchCoreConfig().feature_config("")))
_FORMATS = {INDEX_FORMAT: "SpadeIndex", PATCHCORE_INDEX_FORMAT: "PatchCoreIndex",
            PADIM_INDEX_FORMAT: "PadimIndex"}


def _tensor_names(where: str, metadata: dict[str, str], levels: Sequence[str]) -> list[str]:
  """The tensors an index file with `metadata` holds, in order (checks "kernels")."""
  if metadata.get("format") == PADIM_INDEX_FORMAT:
    return list(index_padim.TENSORS)
  kernels = index_kernels.check_field(where, metadata, levels)
  kernel_tensors = kernels[3] if kernels else []
  if metadata.get("format") == PATCHCORE_INDEX_FORMAT:
    return ["bank", *kernel_tensors]
  return ["pool", *[f"features/{l}" for l in levels], *kernel_tensors]


def _save_file(tensors: dict[str, np.ndarray], path: str, metadata: dict[str, str]) -> None:
  """The actual writer (a seam for tests that simulate an interrupted write)."""
  safetensors_numpy.save_file(tensors, path, metadata=metadata)


def _host(x: Any) -> np.ndarray:
  """NumPy copy of a gallery; a ShardedGallery without its padding rows."""
  return x.to_numpy() if isinstance(x, sharding.ShardedGallery) else np.asarray(x)


def _dtype_name(dtype: np.dtype) -> str:
  """safetensors' name of a NumPy dtype ("F32", "I32", ...)."""
  dtype = np.dtype(dtype)
  kind = {"f": "F", "i": "I", "u": "U", "b": "BOOL"}.get(dtype.kind, dtype.kind)
  return kind if kind == "BOOL" else f"{kind}{8 * dtype.itemsize}"


def _tensor_digest(name: str, dtype: str, shape: Sequence[int], data: np.ndarray) -> str:
  """Checksum of one tensor: its name, safetensors dtype, shape and (C-order) bytes."""
  digest = hashlib.new(_CHECKSUM_ALGORITHM)
  digest.update(json.dumps([name, dtype, [int(d) for d in shape]]).encode() + b"\0")
  digest.update(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
  return f"{_CHECKSUM_ALGORITHM}:{digest.hexdigest()}"


def _metadata_digest(metadata: dict[str, str]) -> str:
  """Checksum of every metadata field but "checksums"."""
  fields = sorted((k, v) for k, v in metadata.items() if k != "checksums")
  digest = hashlib.new(_CHECKSUM_ALGORITHM, json.dumps(fields).encode())
  return f"{_CHECKSUM_ALGORITHM}:{digest.hexdigest()}"


def _checksums(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> dict[str, str]:
  """The "checksums" metadata field of an index holding `tensors` and `metadata`."""
  out = {_METADATA_DIGEST_KEY: _metadata_digest(metadata)}
  for name, value in tensors.items():
    out[name] = _tensor_digest(name, _dtype_name(value.dtype), value.shape, value)
  return out


def _parse_json(where: str, key: str, text: str) -> Any:
  try:
    return json.loads(text)
  except (ValueError, RecursionError) as e:  # Deep nesting: RecursionError.
    raise ValueError(f"{where}: metadata field {key!r} is not valid JSON ({e})") from None


def _positive_int(value) -> bool:
  return not isinstance(value, bool) and isinstance(value, int) and value >= 1


def _check_patchcore_config(where: str, config: dict[str, Any]) -> None:
  """The PatchCore-only fields of feature_config (PatchCoreConfig.feature_config)."""
  keys = list(_PATCHCORE_CONFIG_KEYS)
  if config.get("reduction") == "random_projection":
    keys = sorted(keys + ["reduction_seed"])
  if sorted(config) != keys:
    raise ValueError(f"{where}: metadata field 'feature_config' must have the fields "
                     f"{keys} (PatchCoreConfig.feature_config), got {sorted(config)!r:.200}")
  if config["reduction"] not in patches.REDUCTIONS:
    raise ValueError(f"{where}: metadata field 'feature_config' has reduction="
                     f"{config['reduction']!r:.100}, expected one of {patches.REDUCTIONS}")
  size = config["patch_size"]
  if not _positive_int(size) or size % 2 == 0:
    raise ValueError(f"{where}: metadata field 'feature_config' has patch_size="
                     f"{size!r:.100}, expected an odd positive int")
  if config["embed_dim"] is not None and not _positive_int(config["embed_dim"]):
    raise ValueError(f"{where}: metadata field 'feature_config' has embed_dim="
                     f"{config['embed_dim']!r:.100}, expected a positive int or null")
  seed = config.get("reduction_seed", 0)
  if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
    raise ValueError(f"{where}: metadata field 'feature_config' has reduction_seed="
                     f"{seed!r:.100}, expected a non-negative int")


def _check_fields(where: str, metadata: dict[str, str]) -> list[str]:
  """Checks backbone, levels and feature_config (for the file's format); returns the
  levels."""
  backbone = metadata["backbone"]
  if not isinstance(backbone, str) or not backbone:
    raise ValueError(f"{where}: metadata field 'backbone' must be a non-empty name, got "
                     f"{backbone!r}")
  levels = _parse_json(where, "levels", metadata["levels"])
  if not isinstance(levels, list):
    raise ValueError(f"{where}: metadata field 'levels' must be a JSON list of names, got "
                     f"{type(levels).__name__}")
  if not levels:
    raise ValueError(f"{where}: metadata field 'levels' is empty")
  if not all(isinstance(l, str) and l for l in levels):
    raise ValueError(f"{where}: metadata field 'levels' must be a list of names, got "
                     f"{levels!r:.200}")
  if len(set(levels)) != len(levels):
    raise ValueError(f"{where}: metadata field 'levels' has duplicates: {levels}")
  config = _parse_json(where, "feature_config", metadata["feature_config"])
  if not isinstance(config, dict):
    raise ValueError(f"{where}: metadata field 'feature_config' must be a JSON object, got "
                     f"{type(config).__name__}")
  if config.get("backbone") != backbone:
    raise ValueError(f"{where}: metadata field 'feature_config' names backbone "
                     f"{config.get('backbone')!r:.100} but the index is for {backbone!r}")
  if config.get("layers") != levels:
    raise ValueError(f"{where}: metadata field 'feature_config' lists layers "
                     f"{config.get('layers')!r:.200} but the levels are {levels}")
  # image_size is there exactly when crop is null (whole-image geometry): checked below.
  fields = {k: v for k, v in config.items() if not (k == "image_size"
                                                    and config.get("crop") is None)}
  if metadata.get("format") == PATCHCORE_INDEX_FORMAT:
    _check_patchcore_config(where, fields)
  elif metadata.get("format") == PADIM_INDEX_FORMAT:
    index_padim.check_config(where, fields)
  elif sorted(fields) != _FEATURE_CONFIG_KEYS:
    raise ValueError(f"{where}: metadata field 'feature_config' must have the fields "
                     f"{_FEATURE_CONFIG_KEYS} (SpadeConfig.feature_config), got "
                     f"{sorted(config)!r:.200}")
  _check_geometry_fields(where, config)
  return levels


def _check_geometry_fields(where: str, config: dict[str, Any]) -> None:
  """resize, crop (a positive int, or null with an image_size [H, W])."""
  for key in ("resize", "crop"):
    value = config[key]
    if key == "crop" and value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{where}: metadata field 'feature_config' has {key}={value!r:.100}, "
                       f"expected a positive int{' or null' * (key == 'crop')}")
  if config["crop"] is None:
    size = config.get("image_size")
    if not isinstance(size, list) or len(size) != 2 or not all(_positive_int(v)
                                                               for v in size):
      raise ValueError(f"{where}: metadata field 'feature_config' has crop=null and "
                       f"image_size={size!r:.100}, expected [H, W] of positive ints")


def _check_bank_spec(where: str, specs: dict[str, tuple[str, Sequence[int]]],
                     metadata: dict[str, str], levels: Sequence[str]) -> None:
  """Checks a PatchCore file's tensors: "bank" (F32, [B, D], D <= embed_dim, + 2 with
  tile positions) and its kernel's (F32; their shapes are the kernel's own, checked
  when it is built)."""
  expected = _tensor_names(where, metadata, levels)
  extra = sorted(set(specs) - set(expected))
  if "bank" not in specs:
    raise ValueError(f"{where}: no tensor 'bank' (a PatchCore index holds {expected})")
  missing = [n for n in expected if n not in specs]
  if missing:
    raise ValueError(f"{where}: no tensor {missing[0]!r} (the index's kernel)")
  if extra:
    raise ValueError(f"{where}: unexpected tensors {extra!r:.200} (a PatchCore index holds "
                     f"{expected})")
  for name in expected[1:]:
    if specs[name][0] != "F32":
      raise ValueError(f"{where}: tensor {name!r} has dtype {specs[name][0]}, expected F32 "
                       "(float32)")
  dtype, shape = specs["bank"]
  if dtype != "F32":
    raise ValueError(f"{where}: tensor 'bank' has dtype {dtype}, expected F32 (float32)")
  if len(shape) != 2:
    raise ValueError(f"{where}: tensor 'bank' has shape {list(shape)}, expected 2 dimensions "
                     "[entries, channels]")
  if not all(d >= 1 for d in shape):
    raise ValueError(f"{where}: tensor 'bank' has shape {list(shape)}: empty")
  embed_dim = json.loads(metadata["feature_config"])["embed_dim"]
  # Tiles with their positions as a feature (detector.tiling, settings'
  # "tile_position_weight"): 2 more channels, the tile's (y, x).
  settings = _parse_json(where, "settings", metadata.get("settings") or "{}")
  positions = 2 if isinstance(settings, dict) and settings.get("tile_position_weight") else 0
  if embed_dim is not None and shape[1] > embed_dim + positions:
    raise ValueError(f"{where}: tensor 'bank' has {shape[1]} channels but feature_config's "
                     f"embed_dim is {embed_dim}"
                     + (f" (+ {positions} tile position channels)" if positions else ""))


def _check_tensor_specs(where: str, specs: dict[str, tuple[str, Sequence[int]]],
                        levels: Sequence[str], metadata: dict[str, str] | None = None) -> None:
  """Checks the names, dtypes and shapes of an index's tensors: (dtype name, shape)."""
  if metadata is not None and metadata.get("format") == PATCHCORE_INDEX_FORMAT:
    _check_bank_spec(where, specs, metadata, levels)
    return
  if metadata is not None and metadata.get("format") == PADIM_INDEX_FORMAT:
    index_padim.check_specs(where, specs, metadata)
    return
  expected = _tensor_names(where, metadata or {}, levels)
  for name in expected:
    if name.startswith(index_kernels.PREFIX) and name in specs and specs[name][0] != "F32":
      raise ValueError(f"{where}: tensor {name!r} has dtype {specs[name][0]}, expected F32 "
                       "(float32)")
  missing = [n for n in expected if n not in specs]
  if missing:
    raise ValueError(f"{where}: no tensor {missing[0]!r} (levels are {list(levels)})")
  extra = sorted(set(specs) - set(expected))
  if extra:
    raise ValueError(f"{where}: unexpected tensors {extra!r:.200} (an index holds "
                     f"{expected})")
  num_images = None
  for name in expected:
    if name.startswith(index_kernels.PREFIX):
      continue  # Shapes are the kernel's own (checked when it is built).
    dtype, shape = specs[name]
    if dtype != "F32":
      raise ValueError(f"{where}: tensor {name!r} has dtype {dtype}, expected F32 (float32)")
    ndim, layout = (2, "[images, channels]") if name == "pool" else (
        4, "[images, height, width, channels]")
    if len(shape) != ndim:
      raise ValueError(f"{where}: tensor {name!r} has shape {list(shape)}, expected "
                       f"{ndim} dimensions {layout}")
    if not all(d >= 1 for d in shape):
      raise ValueError(f"{where}: tensor {name!r} has shape {list(shape)}: empty")
    if num_images is None:
      num_images = shape[0]
    elif shape[0] != num_images:
      raise ValueError(f"{where}: tensor {name!r} holds {shape[0]} images but 'pool' "
                       f"holds {num_images}")


def save_index(path: str | os.PathLike, index: SpadeIndex | PatchCoreIndex | PadimIndex, *,
               threshold: Threshold | None = None,
               settings: dict[str, Any] | None = None) -> None:
  """Writes `index` to `path` (safetensors + JSON metadata; no pickle), atomically.

  The file is written next to `path` under a temporary name, synced, then renamed
  over `path`, so an interrupted save leaves either the old file or none, never a
  truncated one. Every tensor and the metadata are checksummed (SHA-256), so that
  load_index detects a damaged or edited file. The galleries (a SpadeIndex), the
  memory bank (a PatchCoreIndex) or the Gaussians (a PadimIndex: mean, precision) are
  stored as float32, a sharded one without its padding (PaDiM's channels as int32).
  `threshold` (e.g. from calibration.spade_threshold) and `settings` (JSON values) are
  stored with them.

  Raises:
    ValueError: the folder of `path` does not exist, index is not a SpadeIndex, a
      PatchCoreIndex or a PadimIndex, or its tensors or metadata are inconsistent
      (load_index would refuse the file).
  """
  if not isinstance(index, (SpadeIndex, PatchCoreIndex, PadimIndex)):
    raise ValueError(f"index must be a PadimIndex, a SpadeIndex or a PatchCoreIndex, got "
                     f"{type(index).__name__}")
  if threshold is not None and not isinstance(threshold, Threshold):
    raise ValueError(f"threshold must be a calibration.Threshold, got "
                     f"{type(threshold).__name__}")
  path = pathlib.Path(path)
  folder = path.parent
  if not folder.is_dir():
    raise ValueError(f"cannot save index to {path}: folder {folder} does not exist")
  where = f"cannot save index to {path}"
  extra_metadata = {}
  kernels_field = None
  if isinstance(index, (PatchCoreIndex, PadimIndex)):
    if isinstance(index, PadimIndex):
      tensors, extra_metadata[index_padim.FIELD] = index_padim.to_file(index)
      fmt = PADIM_INDEX_FORMAT
    else:
      fmt, tensors = PATCHCORE_INDEX_FORMAT, {"bank": _host(index.bank)}
      kernels_field = index_kernels.to_file(where, index, tensors)
    config = _parse_json(where, "feature_config", index.feature_config)
    if not isinstance(config, dict):
      raise ValueError(f"{where}: feature_config must be a JSON object, got "
                       f"{index.feature_config!r:.200}")
    levels = config.get("layers")
  else:
    fmt, tensors = INDEX_FORMAT, {"pool": _host(index.train_pool)}
    tensors.update({f"features/{l}": _host(v) for l, v in index.train_features.items()})
    levels = list(index.train_features)
    kernels_field = index_kernels.to_file(where, index, tensors)
  ints = ("channels",) if fmt == PADIM_INDEX_FORMAT else ()  # Written as int32.
  for name, value in tensors.items():
    if name not in ints and not jnp.issubdtype(value.dtype, jnp.floating):
      raise ValueError(f"{where}: tensor {name!r} has dtype {value.dtype}, not float")
  tensors = {k: np.ascontiguousarray(v, dtype="<i4" if k in ints else "<f4")
             for k, v in tensors.items()}
  metadata = {"format": fmt, "version": _PLAIN_VERSION,
              "backbone": index.backbone_name, "feature_config": index.feature_config,
              "levels": json.dumps(levels), **extra_metadata}
  if kernels_field is not None:
    metadata.update(version=INDEX_VERSION, kernels=kernels_field)
  if index.weights_id is not None:
    metadata["weights"] = _check_weights_id(where, index.weights_id)
  if threshold is not None:
    metadata["threshold"] = Threshold.from_json(threshold.to_json(), where).to_json()
  if settings is not None:
    try:
      metadata["settings"] = json.dumps(settings, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{where}: settings must be JSON values ({e})") from None
    _check_settings(where, metadata["settings"])
  levels = _check_fields(where, metadata)
  index_padim.check_field(where, metadata)
  _check_tensor_specs(where, {k: (_dtype_name(v.dtype), v.shape) for k, v in tensors.items()},
                      levels, metadata)
  if fmt == PADIM_INDEX_FORMAT:
    index_padim.check_channels(where, metadata, tensors["channels"])
  metadata["checksums"] = json.dumps(_checksums(tensors, metadata))
  with atomic.atomic_path(path) as tmp:
    _save_file(tensors, str(tmp), metadata)


# expect's config -> (the index class it needs, the detector that fits it).
_EXPECTED = {SpadeConfig: (SpadeIndex, "Spade"), PatchCoreConfig: (PatchCoreIndex, "PatchCore"),
             PadimConfig: (PadimIndex, "Padim")}


def _check_expected(path: pathlib.Path, index: SpadeIndex | PatchCoreIndex | PadimIndex,
                    expect: Expect) -> None:
  """Refuses `index` unless it is for `expect`'s detector, backbone and features (and,
  for PaDiM, its fit settings and channel draw)."""
  weights = num_channels = None
  if isinstance(expect, (Spade, PatchCore, Padim)):
    name, config = expect.backbone.name, expect.config
    weights = common.weights_id(expect.backbone)
    num_channels = getattr(expect, "num_channels", None)  # Padim: C when known.
  elif isinstance(expect, tuple) and len(expect) == 2:
    name, config = expect
  else:
    raise ValueError(f"expect must be a Spade, a PatchCore, a Padim or (backbone_name, "
                     f"config), got {type(expect).__name__}")
  where = f"load_index({str(path)!r})"
  found = [v for cls, v in _EXPECTED.items() if isinstance(config, cls)]
  if not found:
    raise ValueError(f"expect's config must be a SpadeConfig, a PatchCoreConfig or a "
                     f"PadimConfig, got {type(config).__name__}")
  wanted, detector = found[0]
  if not isinstance(index, wanted):
    raise ValueError(f"{where}: the file holds a {type(index).__name__} but a "
                     f"{wanted.__name__} is expected; fit {detector} and save its index")
  if isinstance(index, PadimIndex):
    padim.check_index(index, name, config, where, weights=weights, num_channels=num_channels)
  elif isinstance(index, PatchCoreIndex):
    patchcore.check_compatible(index, name, config, where, weights=weights)
    patchcore.check_metric(index, config, where)
  else:
    check_compatible(index, name, config, where, weights=weights)


def _check_metadata(where: str, metadata: dict[str, str] | None
                    ) -> tuple[dict[str, str], list[str], dict[str, str]]:
  """Checks an index file's metadata; returns (metadata, levels, checksums)."""
  metadata = metadata or {}
  if metadata.get("format") not in _FORMATS:
    raise ValueError(f"{where} is not a spade_jax index (format "
                     f"{metadata.get('format')!r:.100})")
  version = metadata.get("version")
  if version is None:
    raise ValueError(f"{where}: index metadata has no 'version' field; the file is damaged")
  if version == "1":
    raise ValueError(f"{where}: index version 1 was written by an older spade_jax without "
                     "checksums; refit the index and save it again (its contents cannot "
                     "be checked)")
  if version not in _READ_VERSIONS:
    raise ValueError(f"{where}: unsupported index version {version!r:.100} (this spade_jax "
                     f"reads versions {', '.join(_READ_VERSIONS)}; written by a newer "
                     "spade_jax?)")
  for key in _REQUIRED_METADATA:
    if key not in metadata:
      raise ValueError(f"{where}: index metadata has no {key!r} field; the file is "
                       "damaged or was not written by save_index")
  levels = _check_fields(where, metadata)
  index_padim.check_field(where, metadata)
  checksums = _parse_json(where, "checksums", metadata["checksums"])
  if not isinstance(checksums, dict):
    raise ValueError(f"{where}: metadata field 'checksums' must be a JSON object, got "
                     f"{type(checksums).__name__}")
  expected = [_METADATA_DIGEST_KEY, *_tensor_names(where, metadata, levels)]
  missing = [n for n in expected if n not in checksums]
  if missing:
    raise ValueError(f"{where}: metadata field 'checksums' has no entry for {missing[0]!r}")
  extra = sorted(set(checksums) - set(expected))
  if extra:
    raise ValueError(f"{where}: metadata field 'checksums' names unknown tensors "
                     f"{extra!r:.200}")
  prefix = f"{_CHECKSUM_ALGORITHM}:"
  for name, value in checksums.items():
    if not (isinstance(value, str) and value.startswith(prefix) and len(value) == len(prefix)
            + 64 and all(c in "0123456789abcdef" for c in value[len(prefix):])):
      raise ValueError(f"{where}: metadata field 'checksums' has a malformed entry for "
                       f"{name!r} (expected {prefix}<64 hex digits>)")
  if checksums[_METADATA_DIGEST_KEY] != _metadata_digest(metadata):
    raise ValueError(f"{where}: the metadata does not match its checksum: the file was "
                     "damaged or edited; refit the index and save it again")
  if "threshold" in metadata:
    Threshold.from_json(metadata["threshold"], where)
  if "settings" in metadata:
    _check_settings(where, metadata["settings"])
  if "weights" in metadata:
    _check_weights_id(where, metadata["weights"])
  return metadata, levels, checksums


def _check_weights_id(where: str, value: Any) -> str:
  """The optional "weights" field: "sha256:<64 hex digits>" (Backbone.weights_id)."""
  prefix = f"{_CHECKSUM_ALGORITHM}:"
  if not (isinstance(value, str) and value.startswith(prefix)
          and len(value) == len(prefix) + 64
          and all(c in "0123456789abcdef" for c in value[len(prefix):])):
    raise ValueError(f"{where}: the weights identity {value!r:.100} is not "
                     f"{prefix}<64 hex digits> (Backbone.weights_id)")
  return value


def _check_settings(where: str, text: str) -> dict[str, Any]:
  """The optional "settings" field: a JSON object keyed by setting names."""
  settings = _parse_json(where, "settings", text)
  if not isinstance(settings, dict):
    raise ValueError(f"{where}: metadata field 'settings' must be a JSON object, got "
                     f"{type(settings).__name__}")
  return settings


class IndexFile(NamedTuple):
  """An index file's contents (load_index_file)."""
  index: SpadeIndex | PatchCoreIndex | PadimIndex
  threshold: Threshold | None  # None: not calibrated.
  settings: dict[str, Any] | None  # None: not recorded.


Expect = Spade | PatchCore | Padim | tuple[str, SpadeConfig | PatchCoreConfig | PadimConfig]


def load_index(path: str | os.PathLike, expect: Expect | None = None
               ) -> SpadeIndex | PatchCoreIndex | PadimIndex:
  """Reads an index written by save_index, checking it (see load_index_file)."""
  return load_index_file(path, expect).index


def load_index_file(path: str | os.PathLike, expect: Expect | None = None) -> IndexFile:
  """Reads an index written by save_index with its optional fields, checking them.

  The metadata fields, the tensors' names, dtypes (float32; PaDiM's channels int32)
  and shapes (one image count for all; PatchCore: one [B, D] bank; PaDiM: [P, d] and
  [P, d, d] with P = h w of its grid), all before any tensor is read, then the
  checksum of every tensor and of the metadata are checked before any array is
  returned. The index is unsharded; score(..., mesh=...) (or shard_index /
  shard_patchcore_index / shard_padim_index) shards it.

  Args:
    path: the file.
    expect: a Spade, a PatchCore or a Padim, or (backbone_name, SpadeConfig |
      PatchCoreConfig | PadimConfig): refuse an index of another detector, or written
      for another backbone or feature config (PaDiM: or other fit settings). None
      accepts any (score checks again).

  Returns:
    IndexFile(index, threshold or None, settings or None).

  Raises:
    ValueError: missing file, not a spade_jax index, damaged, edited or inconsistent
      (the message names the file and the tensor or field), written by an older
      version without checksums, for another detector, or for another backbone /
      config.
  """
  path = pathlib.Path(path)
  if path.is_dir():
    raise ValueError(f"no index file at {path}: it is a folder (an ensemble index folder, "
                     "fit.py --method=ensemble, holds a manifest.json; this one has none)")
  if not path.is_file():
    raise ValueError(f"no index file at {path}")
  where = str(path)
  try:  # safetensors checks the header: offsets within the file, no overlaps.
    handle = safe_open(str(path), framework="numpy")
  except Exception as e:  # safetensors raises its own error types on bad headers.
    raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
  tensors = {}
  with handle as f:
    metadata, levels, checksums = _check_metadata(where, f.metadata())
    specs = {}
    for name in f.keys():
      tensor = f.get_slice(name)
      specs[name] = (tensor.get_dtype(), tuple(tensor.get_shape()))
    _check_tensor_specs(where, specs, levels, metadata)
    for name in _tensor_names(where, metadata, levels):
      try:
        value = f.get_tensor(name)
      except Exception as e:  # pylint: disable=broad-except
        raise ValueError(f"{path}: cannot read tensor {name!r}: {e}") from e
      if _tensor_digest(name, specs[name][0], specs[name][1], value) != checksums[name]:
        raise ValueError(f"{path}: tensor {name!r} does not match its checksum: the file "
                         "was damaged or edited; refit the index and save it again")
      tensors[name] = value
  if metadata["format"] == PADIM_INDEX_FORMAT:
    index = index_padim.from_file(where, metadata, tensors)
  elif metadata["format"] == PATCHCORE_INDEX_FORMAT:
    index = PatchCoreIndex(bank=jnp.asarray(tensors["bank"]),
                           backbone_name=metadata["backbone"],
                           feature_config=metadata["feature_config"],
                           weights_id=metadata.get("weights"))
    field = index_kernels.check_field(where, metadata, levels)
    if field is not None:
      index = index_kernels.from_file(where, index, field, tensors)
  else:
    index = SpadeIndex(train_pool=jnp.asarray(tensors["pool"]),
                       train_features={l: jnp.asarray(tensors[f"features/{l}"])
                                       for l in levels},
                       backbone_name=metadata["backbone"],
                       feature_config=metadata["feature_config"],
                       weights_id=metadata.get("weights"))
    field = index_kernels.check_field(where, metadata, levels)
    if field is not None:
      index = index_kernels.from_file(where, index, field, tensors)
  if expect is not None:
    _check_expected(path, index, expect)
  threshold, settings = metadata.get("threshold"), metadata.get("settings")
  return IndexFile(index, None if threshold is None else Threshold.from_json(threshold, where),
                   None if settings is None else _check_settings(where, settings))
