"""A plain folder of images (spade_jax.data.folder): which files are images, their
order, and unreadable files reported instead of raised."""

from hostile_fixtures import write_bomb_png
import numpy as np
import PIL.Image
import pytest

from spade_jax.data import folder


def _save(path, seed=0, size=(12, 10), fmt=None):
  path.parent.mkdir(parents=True, exist_ok=True)
  array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
  PIL.Image.fromarray(array).save(path, format=fmt)
  return array


def test_lists_images_at_any_depth_sorted_and_skips_the_rest(tmp_path):
  root = tmp_path / "images"
  for rel, fmt in [("b.png", None), ("a/z.JPG", "jpeg"), ("a/deep/er/x.jpeg", "jpeg"),
                   ("c.BMP", "bmp"), ("d.tif", "tiff"), ("d.TIFF", "tiff"), ("e.webp", "webp"),
                   (".hidden.png", None), (".git/f.png", None), ("a/.cache/g.png", None)]:
    _save(root / rel, fmt=fmt)
  (root / "notes.txt").write_text("not an image")
  (root / "a" / "h.gif").write_bytes(b"GIF89a")  # Not a format fit.py reads.
  (root / "sub.png").mkdir()  # A folder named like an image: not a file.
  found = folder.list_images(root)
  assert [f.relative for f in found] == ["a/deep/er/x.jpeg", "a/z.JPG", "b.png", "c.BMP",
                                         "d.TIFF", "d.tif", "e.webp"]
  assert all(f.path == root / f.relative for f in found)


def test_excluded_folder_and_symlink_loops(tmp_path):
  root = tmp_path / "images"
  _save(root / "a.png")
  _save(root / "out" / "heatmaps" / "a.png.png")
  (root / "loop").symlink_to(root, target_is_directory=True)
  assert [f.relative for f in folder.list_images(root, exclude=[root / "out"])] == ["a.png"]


@pytest.mark.parametrize("what", ["missing", "file"])
def test_bad_root_is_a_clear_error(tmp_path, what):
  path = tmp_path / "nope"
  if what == "file":
    path.write_text("x")
  error = FileNotFoundError if what == "missing" else NotADirectoryError
  with pytest.raises(error, match="nope"):
    folder.list_images(path)


def test_read_chunks_skips_unreadable_files_and_keeps_full_chunks(tmp_path):
  root = tmp_path / "images"
  arrays = {f"{i}.png": _save(root / f"{i}.png", seed=i) for i in range(5)}
  (root / "1b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # Truncated PNG.
  (root / "2b.jpg").write_text("text, not a jpeg")
  write_bomb_png(root / "3b.png")  # Claims 100000 x 100000 pixels.
  (root / "4b.png").symlink_to(root / "missing.png")  # Dangling link.
  gray = np.full((10, 12), 77, np.uint8)
  PIL.Image.fromarray(gray).save(root / "5.png")  # Grayscale: read as RGB.
  files = folder.list_images(root)
  skipped = []
  chunks = list(folder.read_chunks(files, 2, skipped.append))
  assert [len(images) for images, _ in chunks] == [2, 2, 2]
  read = [f.relative for _, fs in chunks for f in fs]
  assert read == ["0.png", "1.png", "2.png", "3.png", "4.png", "5.png"]
  for (images, fs) in chunks:
    for image, f in zip(images, fs):
      expected = arrays.get(f.relative, np.repeat(gray[..., None], 3, -1))
      np.testing.assert_array_equal(image, expected)
  assert [s.relative for s in skipped] == ["1b.png", "2b.jpg", "3b.png", "4b.png"]
  assert "too large" in skipped[2].reason and str(root / "3b.png") in skipped[2].reason
  assert all(s.reason for s in skipped)


def test_read_chunks_without_callback_and_bad_chunk(tmp_path):
  (tmp_path / "x.png").write_text("broken")
  assert list(folder.read_chunks(folder.list_images(tmp_path), 4)) == []
  with pytest.raises(ValueError, match="chunk_size"):
    list(folder.read_chunks([], 0))
