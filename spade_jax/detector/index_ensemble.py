"""Ensemble index folders: every member's index file (index_file.save_index: no pickle,
checksummed) and manifest.json with the standardisation statistics and every member
file's SHA-256, written atomically. Loading reads JSON and safetensors only; it never
executes code.

manifest.json (ENSEMBLE_INDEX_VERSION 2) holds
  format, version   ENSEMBLE_INDEX_FORMAT, 2
  members           the members' names (Ensemble.names), in order
  statistics        "mean_std" or "median_mad"
  files             [{"file": "member_<m>.safetensors", "sha256": <hex>}] per member
  image_center, image_scale, pixel_center, pixel_scale   [M] numbers each
  threshold         a decision threshold on the combined image scores
                    (calibration.Threshold's fields), or null
  settings          the settings the ensemble was fitted with (fit.py's flags), or null
  checksum          "sha256:<hex>" of the canonical JSON (sorted keys) of every other
                    field: an edited manifest is refused.
Version 1 (no threshold, settings or checksum) is still read.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
from typing import Any, NamedTuple

import numpy as np

from spade_jax.detector import index_file
from spade_jax.detector.calibration import Threshold
from spade_jax.detector.ensemble import STATISTICS, Ensemble, EnsembleIndex
from spade_jax.host import atomic

ENSEMBLE_INDEX_FORMAT = "spade_jax.ensemble_index"
ENSEMBLE_INDEX_VERSION = 2
_READ_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
_STAT_NAMES = ("image_center", "image_scale", "pixel_center", "pixel_scale")
_V1_FIELDS = {"format", "version", "members", "statistics", "files", *_STAT_NAMES}
_V2_FIELDS = _V1_FIELDS | {"threshold", "settings", "checksum"}


class EnsembleIndexFile(NamedTuple):
  """An ensemble index folder's contents (load_ensemble_index_file)."""
  index: EnsembleIndex
  threshold: Threshold | None  # None: not calibrated.
  settings: dict[str, Any] | None  # None: not recorded.


def is_ensemble_index(path: Any) -> bool:
  """Whether `path` is a folder holding a manifest.json (what load_ensemble_index reads;
  an index file of one detector is a file)."""
  path = pathlib.Path(path)
  return path.is_dir() and (path / MANIFEST).is_file()


def _manifest_checksum(manifest: dict[str, Any]) -> str:
  """SHA-256 of the canonical JSON of every field but "checksum"."""
  fields = {k: v for k, v in manifest.items() if k != "checksum"}
  text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
  return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _member_file(m: int) -> str:
  return f"member_{m}.safetensors"


def _sha256(path: Any) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def save_ensemble_index(path: Any, index: EnsembleIndex, *, threshold: Threshold | None = None,
                        settings: dict[str, Any] | None = None) -> None:
  """Writes `index` to the folder `path`: member_<m>.safetensors (save_index) and
  manifest.json (module docstring: member names, statistics, each file's SHA-256, the
  threshold and settings, and the manifest's own checksum).

  Built in a temporary folder next to `path`, then renamed to it: `path` holds a whole
  index or none. An existing ensemble index at `path` is moved aside first and removed
  after the rename (a crash between the two renames leaves it under a temporary name,
  never a partial index at `path`); anything else at `path` is refused.

  Args:
    path: the folder to write.
    index: Ensemble.fit's.
    threshold: a decision threshold on the ensemble's image scores (Ensemble.threshold),
      or None.
    settings: JSON-able settings to record (fit.py's flags), or None.

  Raises:
    ValueError: not an EnsembleIndex, the parent folder does not exist, or `path` is
      something other than an ensemble index.
  """
  if not isinstance(index, EnsembleIndex):
    raise ValueError(f"index must be an EnsembleIndex, got {type(index).__name__}")
  path = pathlib.Path(path)
  if not path.parent.is_dir():
    raise ValueError(f"cannot save the ensemble index to {str(path)!r}: its folder "
                     f"{str(path.parent)!r} does not exist")
  if path.exists() and not is_ensemble_index(path):
    raise ValueError(f"cannot save the ensemble index to {str(path)!r}: it exists and is "
                     f"not an ensemble index (no {MANIFEST}); choose another path")
  tmp = atomic.new_temp_dir(path)
  try:
    files = []
    for m, member in enumerate(index.indices):
      index_file.save_index(tmp / _member_file(m), member)
      files.append({"file": _member_file(m), "sha256": _sha256(tmp / _member_file(m))})
    manifest = {"format": ENSEMBLE_INDEX_FORMAT, "version": ENSEMBLE_INDEX_VERSION,
                "members": list(index.members), "statistics": index.statistics,
                "files": files,
                **{n: [float(v) for v in np.asarray(getattr(index, n))] for n in _STAT_NAMES},
                "threshold": None if threshold is None else json.loads(threshold.to_json()),
                "settings": None if settings is None else dict(settings)}
    manifest["checksum"] = _manifest_checksum(manifest)
    with atomic.atomic_path(tmp / MANIFEST) as out:
      out.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    old = None
    if path.exists():
      old = atomic.new_temp_dir(path)
      os.replace(path, old / "old")
    os.replace(tmp, path)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def load_ensemble_index(path: Any, expect: Ensemble | None = None) -> EnsembleIndex:
  """Reads a folder written by save_ensemble_index (load_ensemble_index_file's index)."""
  return load_ensemble_index_file(path, expect).index


def load_ensemble_index_file(path: Any, expect: Ensemble | None = None) -> EnsembleIndexFile:
  """Reads a folder written by save_ensemble_index, checking it before it is used.

  The manifest's format, version, fields, checksum and statistics (finite, scales > 0),
  its threshold and settings, then each member file's SHA-256, then each member index
  (index_file.load_index, with its own checksums; against `expect`'s member detectors
  when given).

  Returns:
    EnsembleIndexFile(index, threshold or None, settings or None).

  Raises:
    ValueError: naming the folder and what is wrong (also: other members than
      `expect`'s).
  """
  path = pathlib.Path(path)
  where = f"ensemble index {str(path)!r}"
  if not path.is_dir():
    raise ValueError(f"{where}: no such folder (an ensemble index is a folder written by "
                     "save_ensemble_index or fit.py --method=ensemble)")
  try:
    manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
  except (OSError, ValueError, RecursionError) as e:
    raise ValueError(f"{where}: cannot read {MANIFEST} ({e})") from None
  version = manifest.get("version") if isinstance(manifest, dict) else None
  if not isinstance(manifest, dict) or manifest.get("format") != ENSEMBLE_INDEX_FORMAT \
      or isinstance(version, bool) or version not in _READ_VERSIONS:
    raise ValueError(f"{where}: {MANIFEST} is not {ENSEMBLE_INDEX_FORMAT!r} version "
                     f"{' or '.join(map(str, _READ_VERSIONS))}")
  fields = _V1_FIELDS if version == 1 else _V2_FIELDS
  if set(manifest) != fields:
    raise ValueError(f"{where}: {MANIFEST} must be an object with the fields "
                     f"{sorted(fields)}")
  members, files = manifest["members"], manifest["files"]
  count = len(members) if isinstance(members, list) else -1
  if count < 1 or not all(isinstance(m, str) for m in members) or not isinstance(
      files, list) or len(files) != count or manifest["statistics"] not in STATISTICS:
    raise ValueError(f"{where}: {MANIFEST} has malformed members, files or statistics")
  stats = {}
  for name in _STAT_NAMES:
    values = manifest[name]
    if not isinstance(values, list) or len(values) != count or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
        for v in values) or (name.endswith("scale") and min(values) <= 0):
      raise ValueError(f"{where}: {name} must be {count} finite numbers (scales > 0)")
    stats[name] = np.asarray(values, np.float32)
  if version > 1 and manifest["checksum"] != _manifest_checksum(manifest):
    raise ValueError(f"{where}: {MANIFEST} does not match its checksum (damaged or "
                     "edited); refit")
  if expect is not None and tuple(members) != expect.names:
    raise ValueError(f"{where}: fitted for members {members}, not this ensemble's "
                     f"{list(expect.names)}")
  indices = []
  for m, entry in enumerate(files):
    if not isinstance(entry, dict) or entry.get("file") != _member_file(m):
      raise ValueError(f"{where}: files[{m}] must name {_member_file(m)!r}")
    member_path = path / _member_file(m)
    if not member_path.is_file() or _sha256(member_path) != entry.get("sha256"):
      raise ValueError(f"{where}: {_member_file(m)} is missing or does not match its "
                       "SHA-256 in the manifest (damaged or edited); refit")
    indices.append(index_file.load_index(
        member_path, None if expect is None else expect.members[m]))
  index = EnsembleIndex(indices=tuple(indices), members=tuple(members),
                        statistics=manifest["statistics"], **stats)
  threshold, settings = manifest.get("threshold"), manifest.get("settings")
  if settings is not None and not isinstance(settings, dict):
    raise ValueError(f"{where}: settings must be a JSON object or null")
  return EnsembleIndexFile(
      index, None if threshold is None else Threshold.from_json(json.dumps(threshold), where),
      settings)
