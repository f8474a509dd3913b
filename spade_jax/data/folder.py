"""A plain folder of images (any tree, no labels): what fit.py and predict.py read.

Every file under the folder, at any depth, whose extension is an image format's
(IMAGE_EXTENSIONS, any case) is an image; names starting with '.' (files and
folders) are skipped, as are folders reached through symbolic links (no loops).
Images are decoded with the MVTec reader's safe decoder (mvtec.read_rgb: RGB,
grayscale and palette images become [H, W, 3] uint8; decompression bombs, 16-bit
and corrupt files are refused with a ValueError naming the file), so a caller can
report an unreadable file and go on.

Files of image formats that are not read (UNSUPPORTED_EXTENSIONS: GIF, HEIC, AVIF,
...) are listed by list_unsupported, with the reason, for the caller to report as
skipped; other files (.txt, ...) are ignored. A file of several frames (a multi-page
TIFF, an animated WebP or PNG) is read as its first frame, with a warning that names
it and its frame count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import dataclasses
import os
import pathlib

from absl import logging
import numpy as np
import PIL.Image

from spade_jax.data import mvtec

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# Image formats that are not read, by extension: their files are reported, not ignored.
UNSUPPORTED_EXTENSIONS = {
    ".gif": "GIF", ".heic": "HEIC", ".heif": "HEIF", ".avif": "AVIF", ".jxl": "JPEG XL",
    ".jp2": "JPEG 2000", ".j2k": "JPEG 2000", ".ico": "ICO", ".tga": "TGA", ".psd": "PSD",
    ".svg": "SVG", ".pbm": "PNM", ".pgm": "PNM", ".ppm": "PNM", ".pnm": "PNM",
    ".dng": "camera raw", ".cr2": "camera raw", ".nef": "camera raw", ".arw": "camera raw",
}


@dataclasses.dataclass(frozen=True)
class ImageFile:
  """One image file: its path and its path relative to the folder (POSIX, e.g. 'a/1.png')."""
  path: pathlib.Path
  relative: str


@dataclasses.dataclass(frozen=True)
class Skipped:
  """A file that is not a readable image, and why."""
  relative: str
  reason: str


def _inside(path: pathlib.Path, folder: pathlib.Path) -> bool:
  try:
    path.relative_to(folder)
  except ValueError:
    return False
  return True


def list_images(root: str | os.PathLike[str],
                exclude: Sequence[str | os.PathLike[str]] = ()) -> list[ImageFile]:
  """The image files under `root`, sorted by relative path.

  Args:
    root: the folder.
    exclude: folders whose files are left out (e.g. an output folder inside `root`).

  Raises:
    FileNotFoundError: `root` does not exist. NotADirectoryError: it is a file.
  """
  return sorted((f for f in _walk(root, exclude) if f.path.suffix.lower() in IMAGE_EXTENSIONS),
                key=lambda f: f.relative)


def list_unsupported(root: str | os.PathLike[str],
                     exclude: Sequence[str | os.PathLike[str]] = ()) -> list[Skipped]:
  """The files under `root` of image formats that are not read, with the reason.

  Chosen as list_images chooses (same depth, hidden names and `exclude`), by their
  extension (UNSUPPORTED_EXTENSIONS, any case); sorted by relative path.

  Raises:
    FileNotFoundError: `root` does not exist. NotADirectoryError: it is a file.
  """
  found = []
  for f in _walk(root, exclude):
    kind = UNSUPPORTED_EXTENSIONS.get(f.path.suffix.lower())
    if kind is not None:
      found.append(Skipped(f.relative, f"{kind} is not a supported format; convert it to PNG"))
  return sorted(found, key=lambda s: s.relative)


def _walk(root: str | os.PathLike[str],
          exclude: Sequence[str | os.PathLike[str]]) -> Iterator[ImageFile]:
  """Every visible file under `root` (not under `exclude`), in walk order."""
  root = pathlib.Path(root)
  if not root.exists():
    raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
  if not root.is_dir():
    raise NotADirectoryError(f"image folder {str(root)!r} is a file, not a folder")
  skip = [pathlib.Path(e).resolve() for e in exclude]
  for folder, subfolders, files in os.walk(root):  # followlinks=False: no link loops.
    here = pathlib.Path(folder)
    subfolders[:] = [d for d in subfolders if not d.startswith(".")
                     and not any(_inside((here / d).resolve(), s) for s in skip)]
    for name in files:
      if not name.startswith("."):
        path = here / name
        yield ImageFile(path, path.relative_to(root).as_posix())


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
  """[H, W, 3] uint8 of one file (mvtec.read_rgb).

  Raises:
    ValueError: not a readable 8-bit image (corrupt, truncated, a decompression bomb,
      16-bit or float); names the file. OSError: the file cannot be opened.
  """
  return mvtec.read_rgb(path)


def frame_count(path: str | os.PathLike[str]) -> int:
  """The number of frames (pages) of an image file; 1 if it has one or cannot say.

  A camera's MPO JPEG counts as one: its first frame is the photo, the others are
  previews or depth maps.
  """
  try:
    with PIL.Image.open(path) as image:
      if image.format == "MPO":
        return 1
      return max(1, int(getattr(image, "n_frames", 1)))
  except Exception:  # pylint: disable=broad-except  # Only a note: never fails a read.
    return 1


def read_chunks(files: Sequence[ImageFile], chunk_size: int,
                on_skip: Callable[[Skipped], None] | None = None
                ) -> Iterator[tuple[list[np.ndarray], list[ImageFile]]]:
  """Reads `files` in order, `chunk_size` readable images at a time.

  Yields (images [H_i, W_i, 3] uint8, their files): every chunk but the last holds
  exactly `chunk_size` images, however many files were skipped, so a detector sees
  the batches it would see for the readable images alone. A file that cannot be read
  as an image is passed to `on_skip` (with the reason) and left out, never raised.
  A file of several frames is read as its first frame, with a warning ("a.tif has 3
  frames; only the first is used").
  """
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
  images, read = [], []
  for item in files:
    try:
      images.append(read_image(item.path))
    except (ValueError, OSError) as e:
      if on_skip is not None:
        on_skip(Skipped(item.relative, str(e)))
      continue
    frames = frame_count(item.path)
    if frames > 1:
      logging.warning("%s has %d frames; only the first is used", item.relative, frames)
    read.append(item)
    if len(images) == chunk_size:
      yield images, read
      images, read = [], []
  if images:
    yield images, read
