"""The built-in benchmark: small MVTec-layout categories made from real images.

Nothing is downloaded: the images ship inside the scikit-image wheel. Three texture
categories (skimage.data.brick, grass, gravel, tinted) and two aligned-object
categories (the coffee cup of skimage.data.coffee, the cat face of
skimage.data.chelsea). A normal image is a 256x256 view of the source with a
random crop position (textures) or a small shift (objects), a small rotation and
scale change, lighting and colour-balance jitter, an illumination gradient and
Gaussian sensor noise. A test image is a normal image with one defect kind of
`defects.DEFECT_KINDS` (scratch, hole, foreign patch, stain) in 1-3 regions; its
mask is exactly the set of pixels the defect changed, and lies inside the centre
224x224 crop that SPADE's evaluation keeps.

The hard variant (variant="hard", cached apart as builtin_hard_benchmark_v1) has
the same categories, counts and layout, and the same normal images (train/ and
test/good/ are byte-identical to the standard benchmark's for the same seed), but
its defects are those of `defects.HARD_DEFECT_KINDS`: thin faint streaks, light
stains, weak colour casts and rotated pastes of the image's own texture, in 1-2
regions. Their masks follow the same rule (no pixel outside changed), with the
faint rims of stains and casts cut at `defects.HARD_MASK_THRESHOLD` grey levels;
sizes and contrasts are documented in `defects`.

Generation is deterministic: the same seed gives byte-identical PNGs, whatever
`categories` is, because each image has its own SeedSequence((seed, category,
split, index)). A benchmark is written atomically: into a temporary folder next
to `root`, then renamed.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
import json
import os
import pathlib
import shutil
import tempfile
import zlib

from absl import logging
import numpy as np
import PIL.Image
from scipy import ndimage

from spade_jax.data import defects
from spade_jax.host import paths

VERSION = "v1"
VARIANTS = ("standard", "hard")
# Benchmark names (evaluate.py --benchmark) -> variant.
BENCHMARKS = {"builtin": "standard", "builtin_hard": "hard"}
IMAGE_SIZE = 256
EVAL_CROP = 224  # The evaluation keeps the centre 224x224 of the 256x256 images.
INFO_FILE = "builtin_benchmark.json"
# Defects stay within rows / columns [_BOX_LO, _BOX_HI): the centre crop less 6 px.
_BOX_LO = (IMAGE_SIZE - EVAL_CROP) // 2 + 6
_BOX_HI = IMAGE_SIZE - _BOX_LO
_TEXTURES = ("brick", "grass", "gravel")


@dataclasses.dataclass(frozen=True)
class _Spec:
  """How to view a source image. Lengths in source pixels unless said otherwise."""
  source: str  # A skimage.data function.
  tint: tuple[float, float, float] | None  # RGB gains for grayscale textures.
  centre: tuple[float, float] | None  # Object centre (row, col); None: any (texture).
  scale: float  # Source pixels per output pixel.
  max_shift: float
  max_angle: float  # Degrees.
  zone_radius: float | None  # Objects: defect centres within this disc (output px).


_SPECS = {
    "brick": _Spec("brick", (1.3, 0.85, 0.68), None, 1.0, 0, 5.0, None),
    "grass": _Spec("grass", (0.8, 1.15, 0.55), None, 1.0, 0, 5.0, None),
    "gravel": _Spec("gravel", (1.05, 1.0, 0.9), None, 1.0, 0, 5.0, None),
    "cup": _Spec("coffee", None, (205.0, 278.0), 420 / IMAGE_SIZE, 6.0, 4.0, 78.0),
    "cat": _Spec("chelsea", None, (150.0, 225.0), 290 / IMAGE_SIZE, 6.0, 4.0, 80.0),
}
BUILTIN_CATEGORIES = tuple(_SPECS)
# Materials pasted by the 'foreign' defect (skimage.data names; textures tinted).
_FOREIGN = ("brick", "grass", "gravel", "astronaut", "rocket")


@functools.cache
def _source(name: str) -> np.ndarray:
  """A skimage.data image as [H, W, 3] float32 in [0, 255], tinted if a texture."""
  import skimage.data  # pylint: disable=import-outside-toplevel
  image = np.asarray(getattr(skimage.data, name)(), np.float32)
  if image.ndim == 2:
    tint = np.asarray(_SPECS[name].tint if name in _SPECS else (1, 1, 1), np.float32)
    image = image[..., None] * tint
  image = np.clip(image[..., :3], 0, 255)
  image.setflags(write=False)
  return image


def _warp(source: np.ndarray, centre: np.ndarray, scale: float, angle: float) -> np.ndarray:
  """The IMAGE_SIZE^2 view of `source` centred at `centre`, rotated and scaled.

  Output pixel p maps to source point centre + scale * R(angle) (p - c_out);
  bilinear, reflecting at the source's borders. Returns [S, S, 3] float32.
  """
  half = (IMAGE_SIZE - 1) / 2
  rows, cols = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float64) - half
  cos, sin = np.cos(np.deg2rad(angle)), np.sin(np.deg2rad(angle))
  src_rows = centre[0] + scale * (cos * rows - sin * cols)
  src_cols = centre[1] + scale * (sin * rows + cos * cols)
  return np.stack([
      ndimage.map_coordinates(source[..., c], [src_rows, src_cols], order=1,
                              mode="reflect") for c in range(3)], axis=-1).astype(np.float32)


def _view(rng: np.random.Generator, spec: _Spec) -> np.ndarray:
  """A normal image before noise: [S, S, 3] float32 (geometry + lighting jitter)."""
  source = _source(spec.source)
  scale = spec.scale * rng.uniform(0.96, 1.04)
  if spec.centre is None:  # Texture: any position that keeps the view inside.
    reach = scale * IMAGE_SIZE * 0.71
    centre = rng.uniform(reach, np.array(source.shape[:2]) - reach)
  else:
    centre = np.array(spec.centre) + rng.uniform(-spec.max_shift, spec.max_shift, 2)
  image = _warp(source, centre, scale, rng.uniform(-spec.max_angle, spec.max_angle))
  mean = image.mean()
  image = (image - mean) * rng.uniform(0.9, 1.1) + mean  # Contrast.
  image *= rng.uniform(0.9, 1.1) * (1 + rng.uniform(-0.03, 0.03, 3))  # Gain, colour.
  direction = rng.uniform(0, 2 * np.pi)
  ramp = np.linspace(-1, 1, IMAGE_SIZE, dtype=np.float32)
  gradient = np.cos(direction) * ramp[:, None] + np.sin(direction) * ramp[None, :]
  image *= (1 + rng.uniform(0, 0.06) * gradient)[..., None]  # Uneven illumination.
  return np.clip(image, 0, 255)


def _zone(spec: _Spec):
  """zone(rng, radius) -> a defect centre (row, col) for this category."""
  def texture_zone(rng, radius):
    lo, hi = _BOX_LO + radius, _BOX_HI - radius
    return rng.uniform(lo, max(hi, lo + 1), 2)

  def object_zone(rng, radius):
    r = (spec.zone_radius - radius / 2) * np.sqrt(rng.uniform())
    phi = rng.uniform(0, 2 * np.pi)
    return (IMAGE_SIZE - 1) / 2 + r * np.array([np.sin(phi), np.cos(phi)])

  return texture_zone if spec.centre is None else object_zone


def _foreign(rng: np.random.Generator, category: str) -> np.ndarray:
  names = [n for n in _FOREIGN if n != _SPECS[category].source]
  source = _source(names[rng.integers(len(names))])
  centre = rng.uniform(IMAGE_SIZE * 0.72, np.array(source.shape[:2]) - IMAGE_SIZE * 0.72)
  return _warp(source, centre, 1.0, rng.uniform(0, 360))


def _rng(seed: int, category: str, split: str, index: int) -> np.random.Generator:
  key = [seed, zlib.crc32(category.encode()), zlib.crc32(split.encode()), index]
  return np.random.default_rng(np.random.SeedSequence(key))


def render_example(seed: int, category: str, split: str, index: int,
                   kind: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """One image, with and without its defect.

  Args:
    seed, category, split, index: identify the image (and seed its generator).
    kind: a defect kind of defects.DEFECT_KINDS (standard benchmark) or of
      defects.HARD_DEFECT_KINDS (hard variant), or None for a normal image.

  Returns:
    (normal, image, mask): normal and image [S, S, 3] uint8 share the view, the
    lighting and the noise; image = normal + the defect; mask [S, S] bool = the
    defect's support (all False if kind is None).
  """
  if category not in _SPECS:
    raise ValueError(f"unknown built-in category {category!r}; expected one of "
                     f"{BUILTIN_CATEGORIES}")
  rng = _rng(seed, category, split, index)
  spec = _SPECS[category]
  clean = _view(rng, spec)
  defective = clean.copy()
  mask = np.zeros(clean.shape[:2], bool)
  if kind in defects.HARD_DEFECT_KINDS:  # self_paste takes its patches from `clean`.
    mask = defects.paint_defect(rng, defective, kind, (_BOX_LO, _BOX_HI), _zone(spec),
                                clean)
  elif kind is not None:
    mask = defects.paint_defect(rng, defective, kind, (_BOX_LO, _BOX_HI), _zone(spec),
                                _foreign(rng, category))
  noise = rng.normal(0, rng.uniform(1.0, 2.5), clean.shape).astype(np.float32)
  to_uint8 = lambda x: np.clip(np.rint(x + noise), 0, 255).astype(np.uint8)
  return to_uint8(clean), to_uint8(defective), mask


def _defect_kinds(variant: str) -> tuple[str, ...]:
  if variant not in VARIANTS:
    raise ValueError(f"unknown built-in benchmark variant {variant!r}; expected one of "
                     f"{VARIANTS}")
  return defects.HARD_DEFECT_KINDS if variant == "hard" else defects.DEFECT_KINDS


def _test_kinds(num_test: int, variant: str = "standard") -> list[str | None]:
  """About a third good (None), the rest cycling through the variant's defect kinds."""
  num_good = max(1, num_test // 3)
  kinds = _defect_kinds(variant)
  return [None] * num_good + [kinds[i % len(kinds)] for i in range(num_test - num_good)]


def _save_png(path: pathlib.Path, array: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  PIL.Image.fromarray(array).save(path, format="png")


def _write_category(root: pathlib.Path, seed: int, category: str, num_train: int,
                    num_test: int, variant: str = "standard") -> dict:
  for i in range(num_train):
    _save_png(root / category / "train" / "good" / f"{i:03d}.png",
              render_example(seed, category, "train", i, None)[1])
  counts: dict[str, int] = {}
  for i, kind in enumerate(_test_kinds(num_test, variant)):
    folder = kind or "good"
    n = counts.get(folder, 0)
    counts[folder] = n + 1
    _, image, mask = render_example(seed, category, "test", i, kind)
    _save_png(root / category / "test" / folder / f"{n:03d}.png", image)
    if kind is not None:
      _save_png(root / category / "ground_truth" / folder / f"{n:03d}_mask.png",
                mask.astype(np.uint8) * 255)
  return {"source": f"skimage.data.{_SPECS[category].source}", "n_train": num_train,
          "n_test": num_test, "test_counts": dict(sorted(counts.items()))}


def generate_builtin_benchmark(root: str | os.PathLike, *, seed: int = 0,
                               categories: Sequence[str] | None = None,
                               num_train: int = 60, num_test: int = 30,
                               variant: str = "standard") -> pathlib.Path:
  """Writes the built-in benchmark in MVTec AD layout to `root`, atomically.

  Args:
    root: the folder to create; must not exist or be empty.
    seed: the same seed gives byte-identical files.
    categories: a subset of BUILTIN_CATEGORIES (default: all).
    num_train: normal training images per category (256x256 PNG).
    num_test: test images per category, a third of them good.
    variant: "standard" (defects.DEFECT_KINDS) or "hard" (defects.HARD_DEFECT_KINDS;
      the same normal images).

  Returns:
    `root`, holding <category>/{train,test,ground_truth}/ and INFO_FILE.

  Raises:
    ValueError: unknown category or variant, or bad count. FileExistsError: `root` is
      not empty.
  """
  _defect_kinds(variant)  # Checks it.
  categories = list(BUILTIN_CATEGORIES if categories is None else categories)
  unknown = [c for c in categories if c not in _SPECS]
  if unknown or not categories:
    raise ValueError(f"categories must be a non-empty subset of {BUILTIN_CATEGORIES}, "
                     f"got {categories!r}")
  if num_train < 1 or num_test < 2:
    raise ValueError(f"need num_train >= 1 and num_test >= 2, got {num_train}, {num_test}")
  root = pathlib.Path(root)
  if root.exists() and any(root.iterdir()):
    raise FileExistsError(f"{str(root)!r} already exists and is not empty")
  root.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
  try:
    info = {"version": VERSION, "seed": seed, "image_size": IMAGE_SIZE,
            "defects_inside_centre_crop": EVAL_CROP, "categories": {}}
    if variant != "standard":  # The standard benchmark's file is as it always was.
      info.update(variant=variant, defect_kinds=list(_defect_kinds(variant)),
                  mask_threshold=defects.HARD_MASK_THRESHOLD)
    for category in categories:
      logging.info("built-in benchmark: writing %s (%d train, %d test)", category,
                   num_train, num_test)
      info["categories"][category] = _write_category(tmp, seed, category, num_train,
                                                     num_test, variant)
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    try:
      os.rename(tmp, root)  # Atomic; replaces an empty folder, fails on a full one.
    except OSError as e:
      raise FileExistsError(f"{str(root)!r} appeared while generating: {e}") from e
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return root


def builtin_benchmark_dir(variant: str = "standard", seed: int = 0) -> pathlib.Path:
  """The benchmark's cache folder, generated (full size) on first use.

  cache_dir()/builtin_benchmark_v1 for the standard benchmark and
  cache_dir()/builtin_hard_benchmark_v1 for the hard variant (seed 0), never the same
  folder; another seed (other views, defects and noise; a spread over seeds shows how
  much a figure owes to one draw) gets its own folder, ..._v1_seed<seed>.

  Raises:
    ValueError: an unknown variant, or a seed that is not an int >= 0.
  """
  _defect_kinds(variant)  # Checks it.
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be an int >= 0, got {seed!r}")
  name = "builtin" if variant == "standard" else f"builtin_{variant}"
  suffix = f"_seed{int(seed)}" if seed else ""
  root = paths.cache_dir() / f"{name}_benchmark_{VERSION}{suffix}"
  if (root / INFO_FILE).is_file():
    return root
  logging.info("generating the built-in %s benchmark (seed %d) into %s (first use)", variant,
               seed, root)
  try:
    extra = {"seed": int(seed)} if seed else {}  # Seed 0: the generator's default.
    generate_builtin_benchmark(root, variant=variant, **extra)
  except FileExistsError:
    if not (root / INFO_FILE).is_file():  # Not another process's finished benchmark.
      raise
  return root
