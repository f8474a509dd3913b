"""The deployed folder on disk: flattened arrays, the manifest, and the atomic write.

A folder appears complete under its name, or not at all: it is built in a temporary
folder beside it (host/atomic.py's naming) and renamed into place. The manifest names
every other file with its SHA-256; run.py refuses the folder when one differs.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import pathlib
import re
import shutil
import sys
import time
from typing import Any

import jax
import numpy as np
import safetensors.numpy

from spade_jax.detector import calibration, tiling
from spade_jax.host import atomic

FORMAT = "spade_jax.deploy"
FORMAT_VERSION = 3  # 2: the detector's geometry (input size, crop or not); 3: tiles.
MANIFEST = "manifest.json"
PROGRAM = "program.jaxexport"
ARRAYS = "arrays.safetensors"
RUNNER = "run.py"
_RUNNER_SOURCE = pathlib.Path(__file__).with_name("runner.py")

_CUSTOM_CALL = re.compile(r'custom_call\s*@([\w.$-]+)|call_target_name\s*=\s*"([^"]+)"')


def custom_call_targets(module_text: str) -> list[str]:
  """The sorted targets of every custom_call in an MLIR module's text."""
  return sorted({a or b for a, b in _CUSTOM_CALL.findall(module_text)})


def check_output_dir(output_dir: str | os.PathLike[str]) -> pathlib.Path:
  """The folder to write: it must not exist or be empty, and its parent must exist.

  Raises:
    ValueError: it is a file, a folder with files in it, or its parent is missing.
  """
  out = pathlib.Path(output_dir)
  if out.exists() and not out.is_dir():
    raise ValueError(f"output_dir {str(out)!r} is a file")
  if out.is_dir() and any(out.iterdir()):
    raise ValueError(f"output_dir {str(out)!r} is not empty; choose a new folder (an "
                     "export never overwrites one)")
  if not out.absolute().parent.is_dir():
    raise ValueError(f"the folder of output_dir {str(out)!r} does not exist")
  return out


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def flatten_arrays(tree: Any) -> tuple[dict[str, np.ndarray], Any]:
  """A pytree -> ({"a/b/c": array} of its array leaves, rebuild(named arrays) -> tree).

  String leaves (metric names) are settings, not arrays: rebuild puts them back.

  Raises:
    ValueError: two leaves with one name (keys containing "/").
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  names, statics, arrays = [], {}, {}
  for i, (path, leaf) in enumerate(leaves):
    if isinstance(leaf, str):
      statics[i] = leaf
      names.append(None)
      continue
    name = "/".join(_key_name(k) for k in path)
    if name in arrays:
      raise ValueError(f"two arrays are named {name!r}")
    arrays[name] = np.ascontiguousarray(np.asarray(leaf))
    names.append(name)

  def rebuild(named: dict[str, Any]) -> Any:
    return jax.tree_util.tree_unflatten(
        treedef, [statics[i] if n is None else named[n] for i, n in enumerate(names)])

  return arrays, rebuild


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def manifest(*, method: str, settings: dict[str, Any], platforms: tuple[str, ...],
             batch_size: int, input_size: tuple[int, int], resize: int, crop: int | None,
             fixed_image_size: tuple[int, int] | None, tiles: tiling.TileConfig | None,
             arrays: dict[str, np.ndarray], threshold: calibration.Threshold | None,
             index_info: dict[str, Any], custom_calls: list[str]) -> dict[str, Any]:
  """The manifest's fields, all but "files" and "export_seconds" (write adds them).

  "input" records the detector's geometry (features/geometry.py): the program's input
  [batch_size, H, W, 3] with (H, W) = input_size; crop an int (shorter side to resize,
  centre crop) or None (the whole image resized to image_size = input_size); and
  fixed_image_size, the only image size run.py accepts (None: any); tiles: None, or
  the tiling ({"tile_size", "tile_overlap", "merge"}) run.py cuts every image with at its
  native resolution (the program's input is then one tile: input_size = (T, T)).
  """
  height, width = input_size
  outputs = {"scores": {"shape": [batch_size], "dtype": "float32"},
             "maps": {"shape": [batch_size, height, width], "dtype": "float32"}}
  if threshold is not None:
    outputs["anomalous"] = {"shape": [batch_size], "dtype": "bool"}
  return {
      "format": FORMAT, "format_version": FORMAT_VERSION,
      # The package is imported whenever this module is; importing it here would make
      # a cycle (spade_jax resolves export_detector lazily from this stage).
      "spade_jax_version": sys.modules["spade_jax"].__version__,
      "jax_version": jax.__version__, "jaxlib_version": _version("jaxlib"),
      "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      "method": method, "settings": settings, "index": index_info,
      "platforms": list(platforms),
      "input": {"layout": "NHWC", "dtype": "uint8", "color": "RGB",
                "shape": [batch_size, height, width, 3], "batch_size": batch_size,
                "input_size": [height, width], "resize": resize, "crop": crop,
                "image_size": None if crop is not None else [height, width],
                "fixed_image_size": (None if fixed_image_size is None
                                     else list(fixed_image_size)),
                "tiles": None if tiles is None else {
                    "tile_size": int(tiles.tile_size),
                    "tile_overlap": int(tiles.tile_overlap), "merge": tiles.merge},
                "preprocessing": _preprocessing(crop, tiles)},
      "outputs": outputs,
      "threshold": None if threshold is None else json.loads(threshold.to_json()),
      "custom_calls": custom_calls,
      "program": PROGRAM, "arrays": ARRAYS,
      "array_shapes": {name: [str(a.dtype), list(a.shape)] for name, a in arrays.items()},
      "runner": RUNNER,
  }


def _preprocessing(crop: int | None, tiles: tiling.TileConfig | None) -> str:
  if tiles is not None:
    return ("each image cut into tile_size x tile_size tiles at its native resolution (no "
            "resize; step tile_size - tile_overlap, the last row and column flush with the "
            "image's edges); normalisation is in the program; tile maps stitched at the "
            "image's size (merge: mean, weighted across the overlap, or max); image score "
            "= the largest tile score")
  return (("shorter side to resize (PIL bilinear), centre crop" if crop is not None
           else "resize to image_size (PIL bilinear), no crop")
          + "; normalisation is in the program; maps back to each image's size "
          "(bilinear, half-pixel centres; NaN outside a crop)")


def manifest_digest(fields: dict[str, Any]) -> str:
  """SHA-256 of a manifest's canonical JSON without its own "manifest_sha256" field (so
  that an edited manifest is refused as an edited program or array file is)."""
  rest = {k: v for k, v in fields.items() if k != "manifest_sha256"}
  text = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
  return hashlib.sha256(text.encode()).hexdigest()


def sha256_file(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def write(out: pathlib.Path, program: bytes | bytearray, arrays: dict[str, np.ndarray],
          fields: dict[str, Any], *, export_seconds: float) -> None:
  """Writes the folder: program, arrays, run.py, then manifest.json with their SHA-256."""
  tmp = atomic.new_temp_dir(out)
  try:
    (tmp / PROGRAM).write_bytes(bytes(program))
    safetensors.numpy.save_file(arrays, str(tmp / ARRAYS),
                                metadata={"format": FORMAT, "method": fields["method"]})
    shutil.copyfile(_RUNNER_SOURCE, tmp / RUNNER)
    files = {name: sha256_file(tmp / name) for name in (PROGRAM, ARRAYS, RUNNER)}
    fields = {**fields, "files": files, "export_seconds": round(export_seconds, 3)}
    fields["manifest_sha256"] = manifest_digest(fields)
    (tmp / MANIFEST).write_text(json.dumps(fields, indent=1, sort_keys=True) + "\n",
                                encoding="utf-8")
    umask = os.umask(0)  # What a plain open() / mkdir would give (mkdtemp: 0o700).
    os.umask(umask)
    for name in (PROGRAM, ARRAYS, RUNNER, MANIFEST):
      os.chmod(tmp / name, 0o666 & ~umask)
    os.chmod(tmp, 0o777 & ~umask)
    if out.is_dir():
      out.rmdir()  # Checked empty; a file put there since makes this fail, not vanish.
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
