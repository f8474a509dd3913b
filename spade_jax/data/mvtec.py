"""Reader for folders in the MVTec AD layout (the 15 official categories or any other).

Layout of one category (what MVTec AD's archive holds, and what
`spade_jax.data.builtin` writes):

  <root>/<category>/train/good/<name>.png                 normal training images
  <root>/<category>/test/good/<name>.png                  normal test images (no mask)
  <root>/<category>/test/<defect>/<name>.png              anomalous test images
  <root>/<category>/ground_truth/<defect>/<name>_mask.png their masks (0 / 255)

Images may be RGB or grayscale (MVTec's grid, screw and zipper): they are returned
with 3 channels. Masks are binarized (> 0 -> 1). Images of one split must share one
size (true of MVTec AD); a split with several sizes is an error, or pass `resize`
to resize everything on load. Files and folders whose names start with '.' and
files that are not images are ignored. Everything here is host NumPy + PIL.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import os
import pathlib

from absl import logging
import numpy as np
import PIL.Image

MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GOOD = "good"
LAYOUT = ("<root>/<category>/train/good/*.png, <root>/<category>/test/<defect>/*.png and "
          "<root>/<category>/ground_truth/<defect>/<name>_mask.png")

# progress(done, total) is called after every image read, if given.
ProgressFn = Callable[[int, int], None]
PathLike = str | os.PathLike


@dataclasses.dataclass(frozen=True)
class CategoryData:
  """One category, fully loaded.

  Attributes:
    category: the category's folder name.
    train_images: [N, H, W, 3] uint8, normal images.
    test_images: [T, H', W', 3] uint8.
    test_labels: [T] int32, 0 = good, 1 = anomalous.
    test_masks: [T, H', W'] uint8 in {0, 1}; all zero for good images.
    test_defects: T defect names ('good' for normal images).
    test_paths: T paths relative to the category folder, e.g. 'test/crack/000.png'.
    train_paths: N paths relative to the category folder.
  """
  category: str
  train_images: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  test_masks: np.ndarray
  test_defects: list[str]
  test_paths: list[str]
  train_paths: list[str]


@dataclasses.dataclass(frozen=True)
class TestFile:
  """One test image on disk: its path, defect name and mask path (None if good)."""
  path: pathlib.Path
  defect: str
  mask_path: pathlib.Path | None


@dataclasses.dataclass(frozen=True)
class CategoryFiles:
  """The files of one category, checked and in a fixed order (sorted defect, name)."""
  category_dir: pathlib.Path
  train: list[pathlib.Path]
  test: list[TestFile]

  def relative(self, path: pathlib.Path) -> str:
    return path.relative_to(self.category_dir).as_posix()


def _visible(path: pathlib.Path) -> bool:
  return not path.name.startswith(".")


def _image_files(folder: pathlib.Path) -> list[pathlib.Path]:
  """Image files of a folder (by extension), sorted by name."""
  return sorted(p for p in folder.iterdir()
                if p.is_file() and _visible(p) and p.suffix.lower() in IMAGE_EXTENSIONS)


def is_category_dir(path: PathLike) -> bool:
  """True if `path` has train/good/ and test/ subfolders (the MVTec category layout)."""
  path = pathlib.Path(path)
  return (path / "train" / GOOD).is_dir() and (path / "test").is_dir()


def _check_root(root: PathLike) -> pathlib.Path:
  root = pathlib.Path(root)
  if not root.exists():
    raise FileNotFoundError(
        f"data folder {str(root)!r} does not exist; expected a folder in MVTec AD layout: "
        f"{LAYOUT}")
  if not root.is_dir():
    raise NotADirectoryError(f"data folder {str(root)!r} is not a folder")
  return root


def list_categories(root: PathLike) -> list[str]:
  """Sorted names of the subfolders of `root` that are in MVTec category layout.

  Raises:
    FileNotFoundError: `root` does not exist.
    ValueError: no subfolder of `root` is in MVTec layout (the message says the layout).
  """
  root = _check_root(root)
  names = sorted(p.name for p in root.iterdir()
                 if p.is_dir() and _visible(p) and is_category_dir(p))
  if not names:
    hint = ""
    if is_category_dir(root):
      hint = (f" ({str(root)!r} itself looks like one category: pass its parent folder"
              f" {str(root.parent)!r} and category {root.name!r})")
    raise ValueError(
        f"no category in MVTec AD layout found in {str(root)!r}{hint}; expected {LAYOUT}")
  return names


def scan_category(root: PathLike, category: str) -> CategoryFiles:
  """Lists and checks the files of one category without decoding them.

  Raises:
    FileNotFoundError: root, the category, train/good/ or test/ is missing, or an
      anomalous test image has no mask (the message names both files).
    ValueError: train/good/ or test/ holds no image.
  """
  root = _check_root(root)
  cat_dir = root / category
  if not cat_dir.is_dir():
    raise FileNotFoundError(
        f"category folder {str(cat_dir)!r} does not exist; categories found in "
        f"{str(root)!r}: {sorted(p.name for p in root.iterdir() if is_category_dir(p))}")
  for sub in ("train/good", "test"):
    if not (cat_dir / sub).is_dir():
      raise FileNotFoundError(
          f"category {category!r}: folder {str(cat_dir / sub)!r} is missing; expected "
          f"{LAYOUT}")
  train = _image_files(cat_dir / "train" / GOOD)
  if not train:
    raise ValueError(f"category {category!r} has no training images: no image file in "
                     f"{str(cat_dir / 'train' / GOOD)!r}")
  test = []
  defects = sorted(p.name for p in (cat_dir / "test").iterdir() if p.is_dir() and _visible(p))
  for defect in defects:
    for path in _image_files(cat_dir / "test" / defect):
      mask_path = None
      if defect != GOOD:
        mask_path = _find_mask(cat_dir / "ground_truth" / defect, path)
      test.append(TestFile(path, defect, mask_path))
  if not test:
    raise ValueError(f"category {category!r} has no test images: no image file in the "
                     f"subfolders of {str(cat_dir / 'test')!r}")
  return CategoryFiles(cat_dir, train, test)


def _find_mask(gt_dir: pathlib.Path, image_path: pathlib.Path) -> pathlib.Path:
  """ground_truth/<defect>/<stem>_mask.png (or another image extension)."""
  for ext in IMAGE_EXTENSIONS:
    for candidate in (gt_dir / f"{image_path.stem}_mask{ext}",
                      gt_dir / f"{image_path.stem}_mask{ext.upper()}"):
      if candidate.is_file():
        return candidate
  raise FileNotFoundError(
      f"anomalous test image {str(image_path)!r} has no mask: expected "
      f"{str(gt_dir / (image_path.stem + '_mask.png'))!r}")


def _open(path: pathlib.Path) -> PIL.Image.Image:
  """Opens and decodes an image file.

  Raises:
    FileNotFoundError: no such file.
    ValueError: not decodable as an image, or its header claims more pixels than PIL
      decodes safely (a corrupt file or a decompression bomb); names the file.
  """
  try:
    with PIL.Image.open(path) as image:
      image.load()
      return image
  except FileNotFoundError:
    raise
  except PIL.Image.DecompressionBombError as e:
    raise ValueError(
        f"image file {str(path)!r} is too large to read ({e}); it is not readable as an "
        "image (corrupt, or not a data set image): replace or remove it") from e
  except (OSError, SyntaxError, ValueError, PIL.UnidentifiedImageError) as e:
    raise ValueError(f"cannot decode image file {str(path)!r} (corrupt or not an image): "
                     f"{e}") from e


def read_rgb(path: PathLike) -> np.ndarray:
  """Reads an image file as [H, W, 3] uint8; grayscale/palette/alpha become RGB."""
  path = pathlib.Path(path)
  image = _open(path)
  if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
    raise ValueError(f"image file {str(path)!r} has mode {image.mode!r}; expected 8-bit "
                     "RGB or grayscale")
  if image.mode != "RGB":
    image = image.convert("RGB")
  return np.asarray(image, dtype=np.uint8)


def read_mask(path: PathLike) -> np.ndarray:
  """Reads a mask file as [H, W] uint8 in {0, 1} (any non-zero pixel -> 1)."""
  path = pathlib.Path(path)
  image = _open(path)
  if image.mode in ("RGBA", "LA", "PA"):
    image = image.convert("RGB")  # Drop alpha: an opaque mask is not all foreground.
  elif image.mode == "P":
    image = image.convert("RGB")
  array = np.asarray(image)
  if array.ndim == 3:
    array = array.max(axis=-1)
  return (array > 0).astype(np.uint8)


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
  """[H, W, 3] uint8 -> [size, size, 3] uint8, PIL LANCZOS (SPADE's Image.ANTIALIAS)."""
  return np.asarray(PIL.Image.fromarray(image).resize((size, size), PIL.Image.LANCZOS))


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
  """[H, W] uint8 -> [size, size] uint8, nearest neighbour."""
  return np.asarray(PIL.Image.fromarray(mask).resize((size, size), PIL.Image.NEAREST))


def read_test_example(item: TestFile) -> tuple[np.ndarray, np.ndarray]:
  """Reads a test image [H, W, 3] uint8 and its mask [H, W] uint8 in {0, 1}.

  Raises:
    ValueError: the mask's size differs from the image's (both files named).
  """
  image = read_rgb(item.path)
  if item.mask_path is None:
    return image, np.zeros(image.shape[:2], np.uint8)
  mask = read_mask(item.mask_path)
  if mask.shape != image.shape[:2]:
    raise ValueError(
        f"mask {str(item.mask_path)!r} has size {mask.shape[1]}x{mask.shape[0]} (WxH) but "
        f"its image {str(item.path)!r} is {image.shape[1]}x{image.shape[0]}; expected equal")
  return image, mask


def stack_split(arrays: Sequence[np.ndarray], paths: Sequence[str], what: str) -> np.ndarray:
  """np.stack with a clear error naming the first file whose size differs."""
  first = arrays[0].shape
  for array, path in zip(arrays, paths):
    if array.shape != first:
      raise ValueError(
          f"{what}: {path!r} has shape {array.shape} but {paths[0]!r} has {first}; all "
          "images of a split must have one size (pass resize=... to resize on load)")
  return np.stack(arrays)


def load_category(root: PathLike, category: str, *, resize: int | None = None,
                  progress: ProgressFn | None = None) -> CategoryData:
  """Reads one category of a folder in MVTec AD layout.

  Args:
    root: the folder holding the category folders (e.g. mvtec_anomaly_detection/).
    category: a subfolder name of `root` (any name, not only MVTEC_CATEGORIES).
    resize: if given, every image is resized to [resize, resize] on load (LANCZOS),
      masks likewise (nearest); saves memory on MVTec's 1024x1024 categories.
    progress: called as progress(done, total) after every image read.

  Returns:
    CategoryData; test items ordered by (defect, file name), train by file name.

  Raises:
    FileNotFoundError: missing root / category / mask (names the file and what was
      expected). ValueError: no training or test images, corrupt image, mask size
      different from its image, images of different sizes within a split.
  """
  if resize is not None and (not isinstance(resize, int) or resize <= 0):
    raise ValueError(f"resize must be a positive int or None, got {resize!r}")
  files = scan_category(root, category)
  total = len(files.train) + len(files.test)
  logging.info("reading %s: %d train, %d test images", files.category_dir,
               len(files.train), len(files.test))
  done = 0

  def tick():
    nonlocal done
    done += 1
    if progress is not None:
      progress(done, total)

  train_images, train_paths = [], []
  for path in files.train:
    image = read_rgb(path)
    train_images.append(image if resize is None else resize_image(image, resize))
    train_paths.append(files.relative(path))
    tick()
  test_images, test_masks, test_paths = [], [], []
  for item in files.test:
    image, mask = read_test_example(item)
    if resize is not None:
      image, mask = resize_image(image, resize), resize_mask(mask, resize)
    test_images.append(image)
    test_masks.append(mask)
    test_paths.append(files.relative(item.path))
    tick()
  return CategoryData(
      category=category,
      train_images=stack_split(train_images, train_paths, f"{category} train"),
      test_images=stack_split(test_images, test_paths, f"{category} test"),
      test_labels=np.array([int(t.defect != GOOD) for t in files.test], np.int32),
      test_masks=stack_split(test_masks, test_paths, f"{category} test masks"),
      test_defects=[t.defect for t in files.test],
      test_paths=test_paths,
      train_paths=train_paths)
