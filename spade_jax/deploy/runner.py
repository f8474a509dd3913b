r"""Runs a detector exported by spade_jax.export_detector, without spade_jax.

  python DIR/run.py --images=FOLDER --output_dir=OUT [--maps]

Dependencies: jax, numpy, pillow, safetensors (nothing else; no spade_jax, flax, optax
or tensorflow-datasets). jax reads the program with flatbuffers, which it does not
install itself: pip install jax numpy pillow safetensors flatbuffers.

Reads every image under FOLDER (any depth; png, jpg/jpeg, bmp, tif/tiff, webp in any
case; names starting with '.' skipped), brings it to the program's input size as the
detector did (PIL bilinear; with a crop: shorter side to `resize`, then the centre
`crop`; without: the whole image resized to `image_size`), runs the exported program in
batches of the export's batch size (the last one padded), and writes

  OUT/scores.csv     "path,score" (+ ",anomalous" 1 / 0 when the export holds a
                     threshold), one row per image, sorted by path: predict.py's layout
  OUT/skipped.csv    "path,reason" of files that are not readable images (if any)
  OUT/maps/<path>.npy   with --maps: each image's anomaly map at the image's own size
                     [H_i, W_i] float32 (NaN outside the crop of a cropping detector),
                     as predict.py's --save_maps

An export of a tiled detector (fit.py --tile_size) takes no resize: every image is cut
into tile_size x tile_size tiles at its native resolution, exactly where
spade_jax.detector.tiling cuts them (a step of tile_size - tile_overlap, the last row
and column flush with the image's edges); tiles of consecutive images fill the program's
batches; the tile maps are stitched at the image's size (merge "mean": averaged with
weights that fade each tile out across the overlap; "max": their maximum), and the
image's score is its largest tile score (with a threshold: anomalous when a tile is).
Memory: one batch of tiles, plus the images whose tiles are in it and their maps.

Before any image is read it refuses, with a message and exit status 1: a folder whose
files fail the SHA-256 of manifest.json, a platform the program was not exported for,
and a jax that cannot deserialise the program (naming the jax that wrote it). With an
export for a fixed image size, an image of another size is refused too.

This file is spade_jax/deploy/runner.py, copied by the export.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import pathlib
import sys

import numpy as np
from PIL import Image

FORMAT = "spade_jax.deploy"
FORMAT_VERSION = 3
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 1 << 20  # A manifest is a few kB; a bigger file is not one.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")  # predict.py's csv_cell.


class ArtifactError(ValueError):
  """The exported folder cannot be run here (damaged, other platform, other jax)."""


# ----------------------------------------------------------------------------------
# The artifact: manifest, checksums, program, arrays.


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def read_manifest(folder: pathlib.Path) -> dict:
  """manifest.json, checked: format, and the SHA-256 of every file it names.

  Raises:
    ArtifactError: missing, too large, not JSON, another format, or a file that is
      missing or differs from its checksum.
  """
  path = folder / MANIFEST
  try:
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
      raise ArtifactError(f"{path} is {size} bytes: not a manifest")
    manifest = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ArtifactError(f"cannot read {path}: {e}") from e
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise ArtifactError(f"{path} is not a {FORMAT} manifest")
  if manifest.get("format_version") != FORMAT_VERSION:
    raise ArtifactError(f"{path} has format_version {manifest.get('format_version')!r}; this "
                        f"run.py reads {FORMAT_VERSION}")
  rest = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
  text = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
  if hashlib.sha256(text.encode()).hexdigest() != manifest.get("manifest_sha256"):
    raise ArtifactError(f"{path} fails its checksum (manifest_sha256): it was edited or "
                        "damaged; export again")
  files = manifest.get("files")
  needed = (manifest.get("program"), manifest.get("arrays"))
  if not isinstance(files, dict) or not all(n in files for n in needed):
    raise ArtifactError(f"{path} does not list the checksums of {list(needed)}")
  for name, expected in sorted(files.items()):
    file = folder / name
    if pathlib.Path(name).name != name or not file.is_file():
      raise ArtifactError(f"{folder}: {name!r} is missing (listed in {MANIFEST})")
    actual = _sha256(file)
    if actual != expected:
      raise ArtifactError(f"{file} fails its checksum (SHA-256 {actual[:16]}..., "
                          f"{MANIFEST} says {str(expected)[:16]}...): the file was changed "
                          "or damaged; export again")
  return manifest


def current_platform() -> str:
  """The jax.export platform name of the default device: cpu, cuda, rocm or tpu."""
  import jax  # pylint: disable=import-outside-toplevel
  backend = jax.default_backend()
  if backend == "gpu":
    version = str(getattr(jax.devices()[0].client, "platform_version", "")).lower()
    return "rocm" if "rocm" in version else "cuda"
  return backend


def check_platform(manifest: dict, platform: str) -> None:
  """Raises ArtifactError unless the program was exported for `platform`."""
  exported = list(manifest.get("platforms", []))
  if platform not in exported:
    raise ArtifactError(
        f"this program was exported for {exported}, and jax runs on {platform} here: export "
        f"it again with --platforms={','.join([*exported, platform])} (or run it on "
        f"{' / '.join(exported)})")


def load_program(data: bytes, manifest: dict):
  """jax.export.deserialize(data), or an ArtifactError naming the jax that wrote it."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax import export  # pylint: disable=import-outside-toplevel
  writer = manifest.get("jax_version", "an unknown version")
  try:
    exported = export.deserialize(bytearray(data))
  except Exception as e:  # pylint: disable=broad-except  # Any failure: the same advice.
    raise ArtifactError(
        f"jax {jax.__version__} cannot deserialise this program, written by jax {writer} "
        f"({type(e).__name__}: {e}); install jax=={writer}, or export again with this "
        "jax") from e
  return exported


def load_arrays(path: pathlib.Path, exported, manifest: dict) -> dict:
  """The program's array arguments from the safetensors file, checked against it."""
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  arrays = load_file(str(path))
  expected = manifest.get("array_shapes", {})
  if sorted(arrays) != sorted(expected):
    raise ArtifactError(f"{path} holds other arrays than the program reads")
  for name, (dtype, shape) in expected.items():
    if str(arrays[name].dtype) != dtype or list(arrays[name].shape) != list(shape):
      raise ArtifactError(f"{path}: array {name!r} is {arrays[name].dtype} "
                          f"{list(arrays[name].shape)}, the program reads {dtype} {shape}")
  avals = exported.in_avals
  if len(avals) != len(arrays) + 1:
    raise ArtifactError(f"{path} holds {len(arrays)} arrays, the program reads "
                        f"{len(avals) - 1}")
  return arrays


class Artifact:
  """A checked exported folder: manifest, program and arrays on the device."""

  def __init__(self, folder: str | os.PathLike):
    import jax  # pylint: disable=import-outside-toplevel
    self.folder = pathlib.Path(folder)
    self.manifest = read_manifest(self.folder)
    check_platform(self.manifest, current_platform())
    self.exported = load_program((self.folder / self.manifest["program"]).read_bytes(),
                                 self.manifest)
    self._call = jax.jit(self.exported.call)  # Compiled once, on the first batch.
    arrays = load_arrays(self.folder / self.manifest["arrays"], self.exported, self.manifest)
    self.arrays = {name: jax.device_put(a) for name, a in arrays.items()}
    spec = self.manifest["input"]
    self.batch_size, self.crop, self.resize = spec["batch_size"], spec["crop"], spec["resize"]
    self.input_size = tuple(spec["input_size"])  # (H, W): (crop, crop) or image_size.
    fixed = spec.get("fixed_image_size")
    self.fixed_image_size = None if fixed is None else tuple(fixed)
    self.has_threshold = "anomalous" in self.manifest.get("outputs", {})
    tiles = spec.get("tiles")
    self.tiles = None if tiles is None else TileSettings(
        int(tiles["tile_size"]), int(tiles["tile_overlap"]), str(tiles["merge"]))

  def check_batch(self, images: np.ndarray) -> None:
    """Raises ArtifactError unless images are the program's [B, H, W, 3] uint8."""
    want = (self.batch_size, *self.input_size, 3)
    if images.dtype != np.uint8 or tuple(images.shape) != want:
      raise ArtifactError(f"the program takes images {want} uint8 (brought to the input "
                          f"size as the detector does: to_input), got "
                          f"{tuple(images.shape)} {images.dtype}")

  def to_input(self, image: np.ndarray) -> np.ndarray:
    """[h, w, 3] uint8 -> [H, W, 3] uint8, the program's input (the detector's geometry)."""
    if self.crop is None:
      return resize_to(image, self.input_size)
    return resize_crop(image, self.resize, self.crop)

  def to_original(self, score_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """[H, W] map of the input -> [height, width] map of the image (NaN outside a crop)."""
    return to_original(score_map, height, width, resize=self.resize, crop=self.crop)

  def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """[n <= B, H, W, 3] uint8 -> {"scores": [n], "maps": [n, H, W]
    (, "anomalous": [n] bool)} as NumPy; a short batch is padded (images are scored
    independently, so padding changes nothing)."""
    n = images.shape[0]
    if not 1 <= n <= self.batch_size:
      raise ArtifactError(f"a batch holds 1 to {self.batch_size} images, got {n}")
    batch = np.zeros((self.batch_size, *images.shape[1:]), images.dtype)
    batch[:n] = images
    self.check_batch(batch)
    out = self._call(self.arrays, batch)
    return {name: np.asarray(value)[:n] for name, value in out.items()}


# ----------------------------------------------------------------------------------
# Images: the folder, decoding and the detector's geometry.


def list_images(root: pathlib.Path, exclude: pathlib.Path) -> list[tuple[pathlib.Path, str]]:
  """(path, relative POSIX path) of the image files under root, sorted by relative path."""
  if not root.is_dir():
    raise ValueError(f"image folder {str(root)!r} is not a folder")
  skip = exclude.resolve()
  found = []
  for folder, subfolders, files in os.walk(root):  # followlinks=False: no link loops.
    here = pathlib.Path(folder)
    subfolders[:] = [d for d in subfolders if not d.startswith(".")
                     and (here / d).resolve() != skip]
    for name in files:
      path = here / name
      if not name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS:
        found.append((path, path.relative_to(root).as_posix()))
  return sorted(found, key=lambda item: item[1])


def read_rgb(path: pathlib.Path) -> np.ndarray:
  """[H, W, 3] uint8 of an 8-bit image file (first frame), as spade_jax reads it.

  Raises:
    ValueError: not a readable 8-bit image (names the file).
  """
  try:
    with Image.open(path) as image:
      image.load()
      if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        raise ValueError(f"image file {str(path)!r} has mode {image.mode!r}; expected 8-bit "
                         "RGB or grayscale")
      return np.asarray(image if image.mode == "RGB" else image.convert("RGB"), np.uint8)
  except (OSError, SyntaxError, Image.DecompressionBombError) as e:
    raise ValueError(f"cannot decode image file {str(path)!r}: {e}") from e


def resize_crop(image: np.ndarray, resize: int, crop: int) -> np.ndarray:
  """torchvision Resize(resize) then CenterCrop(crop), as spade_jax's preprocess."""
  pil = Image.fromarray(image, "RGB")
  w, h = pil.size
  short, long = (w, h) if w <= h else (h, w)
  new_long = int(resize * long / short)
  size = (resize, new_long) if w <= h else (new_long, resize)
  if size != (w, h):
    pil = pil.resize(size, Image.BILINEAR)
  w, h = pil.size
  if crop > min(w, h):
    raise ValueError(f"crop={crop} is larger than the resized image {h}x{w}")
  top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
  return np.asarray(pil.crop((left, top, left + crop, top + crop)))


def resize_to(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """The whole image resized to size = (H, W) (PIL bilinear; not resized when it is
  that size already), as spade_jax's preprocess with crop=None and image_size."""
  h, w = size
  pil = Image.fromarray(image, "RGB")
  if pil.size != (w, h):
    pil = pil.resize((w, h), Image.BILINEAR)
  return np.asarray(pil)


# ----------------------------------------------------------------------------------
# Maps back to the image's own size: spade_jax.features.geometry.to_original.


def aspect_size(resize: int, height: int, width: int) -> tuple[int, int]:
  """(H, W) of an image with its shorter side resized to `resize` (torchvision's rule)."""
  if height <= width:
    return resize, int(resize * width / height)
  return int(resize * height / width), resize


def covered_box(height: int, width: int, resize: int, crop: int | None
                ) -> tuple[float, float, float, float]:
  """(top, left, box height, box width) in the image's pixels of what the input shows."""
  if crop is None:
    return 0.0, 0.0, float(height), float(width)
  rh, rw = aspect_size(resize, height, width)
  top, left = int(round((rh - crop) / 2.0)), int(round((rw - crop) / 2.0))
  sy, sx = height / rh, width / rw
  return top * sy, left * sx, crop * sy, crop * sx


def _taps(out_size: int, start: float, extent: float, in_size: int):
  """Per output pixel along one axis: two input taps, the second's weight, inside."""
  centre = np.arange(out_size, dtype=np.float64) + 0.5
  inside = (centre >= start) & (centre <= start + extent)
  src = np.clip((centre - start) / extent * in_size - 0.5, 0.0, in_size - 1)
  low = np.floor(src).astype(np.int64)
  high = np.minimum(low + 1, in_size - 1)
  return low, high, (src - low).astype(np.float32), inside


def to_original(score_map: np.ndarray, height: int, width: int, *, resize: int,
                crop: int | None) -> np.ndarray:
  """[H, W] map of the input -> [height, width] float32: bilinear (half-pixel centres)
  over the region the input covers, NaN outside it."""
  score_map = np.asarray(score_map, np.float32)
  top, left, box_h, box_w = covered_box(height, width, resize, crop)
  r0, r1, fy, rows_in = _taps(height, top, box_h, score_map.shape[0])
  c0, c1, fx, cols_in = _taps(width, left, box_w, score_map.shape[1])
  upper, lower = score_map[r0], score_map[r1]
  fy = fy[:, None]
  rows = upper * (1 - fy) + lower * fy
  out = rows[:, c0] * (1 - fx) + rows[:, c1] * fx
  if not (rows_in.all() and cols_in.all()):
    out[~rows_in] = np.nan
    out[:, ~cols_in] = np.nan
  return out.astype(np.float32)


# ----------------------------------------------------------------------------------
# Tiles: spade_jax.detector.tiling's arithmetic (tile_grid, ramp, stitch), repeated here
# (run.py imports no spade_jax; tests/test_deploy.py checks both give the same tiles).


class TileSettings:
  """The export's tiling: tile_size T, tile_overlap O, merge ("mean" or "max")."""

  def __init__(self, tile_size: int, tile_overlap: int, merge: str):
    if not 0 <= tile_overlap < tile_size or merge not in ("mean", "max"):
      raise ArtifactError(f"the manifest's tiles are not valid: tile_size={tile_size}, "
                          f"tile_overlap={tile_overlap}, merge={merge!r}")
    self.tile_size, self.tile_overlap, self.merge = tile_size, tile_overlap, merge


def tile_grid(length: int, tile: int, overlap: int) -> list[int]:
  """Start offsets of the tiles along an axis of `length` >= tile pixels: a step of
  tile - overlap, the last tile flush with the end (spade_jax.detector.tiling)."""
  starts = list(range(0, length - tile + 1, tile - overlap))
  if starts[-1] + tile < length:
    starts.append(length - tile)
  return starts


def tile_boxes(height: int, width: int, tiles: TileSettings) -> list[tuple[int, int]]:
  """(top, left) of every tile of a height x width image, row by row.

  Raises:
    ValueError: the image is smaller than a tile.
  """
  t = tiles.tile_size
  if height < t or width < t:
    raise ValueError(f"tile_size={t} is larger than the image ({height}x{width}); this "
                     f"program scores tiles of {t}x{t}")
  return [(top, left) for top in tile_grid(height, t, tiles.tile_overlap)
          for left in tile_grid(width, t, tiles.tile_overlap)]


def ramp(tile: int, overlap: int) -> np.ndarray:
  """[tile] float64 weights of "mean" stitching: 1 inside, falling linearly to
  1 / (overlap + 1) across the overlap at each edge."""
  i = np.arange(tile, dtype=np.float64)
  return np.minimum(1.0, (np.minimum(i, tile - 1 - i) + 1) / (overlap + 1))


class Stitched:
  """One image's map, stitched tile by tile in tile_boxes order (as tiling.stitch:
  float64 weighted sums for "mean", a float32 running maximum for "max"), its score
  the largest tile score, its decision whether any tile's is anomalous."""

  def __init__(self, name: str, height: int, width: int, boxes: list[tuple[int, int]],
               tiles: TileSettings):
    self.name, self.boxes, self.tiles, self.done = name, boxes, tiles, 0
    self.score, self.anomalous = np.float32(-np.inf), False
    if tiles.merge == "max":
      self.total = np.full((height, width), -np.inf, np.float32)
      self.weight = self.ramps = None
    else:
      self.total = np.zeros((height, width), np.float64)
      self.weight = np.zeros((height, width), np.float64)
      r = ramp(tiles.tile_size, tiles.tile_overlap)
      self.ramps = np.outer(r, r)

  def add(self, tile_map: np.ndarray, score: np.float32, anomalous: bool) -> None:
    """The next tile's [T, T] map, score and decision."""
    y, x = self.boxes[self.done]
    t = self.tiles.tile_size
    if self.ramps is None:
      np.maximum(self.total[y:y + t, x:x + t], tile_map, out=self.total[y:y + t, x:x + t])
    else:
      self.total[y:y + t, x:x + t] += self.ramps * tile_map
      self.weight[y:y + t, x:x + t] += self.ramps
    self.score = max(self.score, np.float32(score))
    self.anomalous = self.anomalous or bool(anomalous)
    self.done += 1

  @property
  def complete(self) -> bool:
    return self.done == len(self.boxes)

  def map(self) -> np.ndarray:
    """[height, width] float32, the stitched map (once complete)."""
    if self.ramps is None:
      return self.total
    return (self.total / self.weight).astype(np.float32)


# ----------------------------------------------------------------------------------
# Outputs.


def _write_csv(path: pathlib.Path, rows: list[list[object]]) -> None:
  buffer = io.StringIO()
  csv.writer(buffer, lineterminator="\n").writerows(rows)
  tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
  tmp.write_bytes(buffer.getvalue().encode("utf-8", "surrogateescape"))
  os.replace(tmp, path)


def _cell(text: str) -> str:
  return "'" + text if text.startswith(_FORMULA_START) else text


def _score_resized(artifact: Artifact, images, emit) -> None:
  """Whole images, each brought to the input size, artifact.batch_size at a time."""
  batch, pending = [], []

  def flush():
    out = artifact(np.stack(batch))
    for i, (name, (height, width)) in enumerate(pending):
      emit(name, out["scores"][i], out["anomalous"][i] if artifact.has_threshold else None,
           lambda m=out["maps"][i], h=height, w=width: artifact.to_original(m, h, w))
    batch.clear()
    pending.clear()

  for name, image in images:
    batch.append(artifact.to_input(image))
    pending.append((name, image.shape[:2]))
    if len(batch) == artifact.batch_size:
      flush()
  if batch:
    flush()


def _score_tiled(artifact: Artifact, images, emit) -> None:
  """Every image cut into tiles (tile_boxes); tiles of consecutive images fill batches
  of artifact.batch_size; an image is emitted once its last tile is scored."""
  tiles, size = artifact.tiles, artifact.batch_size
  t = tiles.tile_size
  batch = np.zeros((size, t, t, 3), np.uint8)
  owners: list[Stitched] = []  # The image of each tile in the batch.
  open_images: list[Stitched] = []  # In reading order.

  def flush():
    out = artifact(batch[:len(owners)])
    for i, stitched in enumerate(owners):
      stitched.add(out["maps"][i], out["scores"][i],
                   artifact.has_threshold and bool(out["anomalous"][i]))
    owners.clear()
    while open_images and open_images[0].complete:
      done = open_images.pop(0)
      emit(done.name, done.score, done.anomalous if artifact.has_threshold else None,
           done.map)

  for name, image in images:
    height, width = image.shape[:2]
    try:
      boxes = tile_boxes(height, width, tiles)
    except ValueError as e:
      raise ValueError(f"image {name!r}: {e}") from None
    stitched = Stitched(name, height, width, boxes, tiles)
    open_images.append(stitched)
    for y, x in boxes:
      batch[len(owners)] = image[y:y + t, x:x + t]
      owners.append(stitched)
      if len(owners) == size:
        flush()
  if owners:
    flush()


def score_folder(artifact: Artifact, images_dir: pathlib.Path, output_dir: pathlib.Path,
                 write_maps: bool = False) -> tuple[list[str], np.ndarray, list[list[str]]]:
  """Scores every image under images_dir; writes scores.csv (and skipped.csv, maps/).

  Returns:
    (relative paths, scores [N] float32, skipped [[path, reason]]).
  """
  files = list_images(images_dir, output_dir)
  if not files:
    raise ValueError(f"no images under {str(images_dir)!r}")
  output_dir.mkdir(parents=True, exist_ok=True)
  paths, scores, anomalous, skipped = [], [], [], []

  def emit(name, score, decision, full_map):
    """One image's results; full_map() its map at the image's own size."""
    paths.append(name)
    scores.append(np.float32(score))
    anomalous.append(None if decision is None else int(decision))
    if write_maps:
      target = output_dir / "maps" / f"{name}.npy"
      target.parent.mkdir(parents=True, exist_ok=True)
      np.save(target, full_map())

  def images():
    fixed = artifact.fixed_image_size
    for path, relative in files:
      try:
        image = read_rgb(path)
      except ValueError as e:
        print(f"warning: skipping {relative}: {e}", file=sys.stderr)
        skipped.append([_cell(relative), str(e)])
        continue
      if fixed is not None and image.shape[:2] != fixed:
        raise ValueError(f"image {relative!r} is {image.shape[0]}x{image.shape[1]}; this "
                         f"program was exported for {fixed[0]}x{fixed[1]} images only")
      yield relative, image

  (_score_resized if artifact.tiles is None else _score_tiled)(artifact, images(), emit)
  if not paths:
    raise ValueError(f"none of the {len(files)} image files under {str(images_dir)!r} is "
                     "readable")
  header = ["path", "score"] + (["anomalous"] if artifact.has_threshold else [])
  rows: list[list[object]] = [header]
  for i, (name, score) in enumerate(zip(paths, np.asarray(scores, np.float32))):
    row: list[object] = [_cell(name), f"{float(score):.9g}"]
    if artifact.has_threshold:
      row.append(anomalous[i])
    rows.append(row)
  _write_csv(output_dir / "scores.csv", rows)
  if skipped:
    _write_csv(output_dir / "skipped.csv", [["path", "reason"], *skipped])
  return paths, np.asarray(scores, np.float32), skipped


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--images", required=True, help="Folder of images (any depth).")
  parser.add_argument("--output_dir", required=True, help="Where scores.csv goes.")
  parser.add_argument("--maps", action="store_true", help="Also write maps/<path>.npy.")
  parser.add_argument("--artifact", default=str(pathlib.Path(__file__).resolve().parent),
                      help="The exported folder (default: this file's folder).")
  args = parser.parse_args(argv)
  try:
    artifact = Artifact(args.artifact)
    paths, scores, skipped = score_folder(artifact, pathlib.Path(args.images),
                                          pathlib.Path(args.output_dir), args.maps)
  except (ValueError, OSError) as e:  # A user's mistake or a bad folder: no traceback.
    print(f"run.py: error: {e}", file=sys.stderr)
    return 1
  print(f"scored {len(paths)} images: {pathlib.Path(args.output_dir) / 'scores.csv'}")
  if skipped:
    print(f"skipped {len(skipped)} files that are not readable images (skipped.csv)")
  del scores
  return 0


if __name__ == "__main__":
  sys.exit(main())
