"""ShanghaiTech Campus (STC) reader, for SPADE's pixel-level STC evaluation.

Assumed layout (the public release, with the training videos extracted to frames):

  <root>/training/frames/<video>/<frame>.jpg   e.g. training/frames/01_001/000.jpg;
                                               extract from training/videos/01_001.avi,
                                               e.g. ffmpeg -i 01_001.avi 01_001/%03d.jpg
  <root>/testing/frames/<video>/<frame>.jpg    e.g. testing/frames/01_0014/000.jpg
  <root>/testing/test_pixel_mask/<video>.npy   [T, H, W] pixel masks (0/1) of a video
  <root>/testing/test_frame_mask/<video>.npy   [T] frame labels (0/1); optional, else
                                               a frame is anomalous if its mask is not
                                               empty

Frames may be .jpg/.jpeg/.png; they are ordered by their number when every name is
a number, else by name. All training frames are normal.

SPADE's STC settings (STC_SETTINGS): K = 1 nearest training image, kappa = 1, frames
resized to 256. Our choice for "resized to 256": frames (480x856) and masks are
resized to 256x256 on load (aspect not kept; images LANCZOS, masks nearest), and
the evaluation crop is 256, i.e. no crop, so the whole frame is scored; a 224 centre
crop of a 256-high frame would drop the sides of the scene where anomalies happen.
Training videos are subsampled 1:5 (every 5th frame of each video), as the paper
says. Note: STC has 274,515 training frames, so 1:5 gives ~55k images, not the
"about 5000" quoted with it (that is ~1:55): use a larger frame_step if memory is
short (55k 256x256 frames are 10.8 GB of uint8).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import pathlib
import types

from absl import logging
import numpy as np

from spade_jax.data import mvtec

STC_SETTINGS = types.MappingProxyType({
    "k_images": 1, "kappa": 1, "resize": 256, "crop": 256, "frame_step": 5,
    "image_size": 256})
_FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png")
LAYOUT = ("<root>/training/frames/<video>/*.jpg, <root>/testing/frames/<video>/*.jpg, "
          "<root>/testing/test_pixel_mask/<video>.npy ([T, H, W]) and optionally "
          "<root>/testing/test_frame_mask/<video>.npy ([T])")


@dataclasses.dataclass(frozen=True)
class STCVideo:
  """One test video.

  Attributes:
    video: its id, e.g. '01_0014'.
    frames: [T, S, S, 3] uint8 (S = size, or the original H, W if size is None).
    masks: [T, S, S] uint8 in {0, 1}.
    labels: [T] int32, 1 = anomalous frame.
    paths: T frame paths relative to the root.
  """
  video: str
  frames: np.ndarray
  masks: np.ndarray
  labels: np.ndarray
  paths: list[str]


def _folder(root: pathlib.Path, *parts: str) -> pathlib.Path:
  path = root.joinpath(*parts)
  if not path.is_dir():
    hint = ""
    if parts[:2] == ("training", "frames") and (root / "training" / "videos").is_dir():
      hint = (" (found training/videos/: extract each video's frames first, e.g. "
              "ffmpeg -i training/videos/01_001.avi training/frames/01_001/%03d.jpg)")
    raise FileNotFoundError(f"STC folder {str(path)!r} does not exist{hint}; expected "
                            f"{LAYOUT}")
  return path


def _check_root(root: mvtec.PathLike) -> pathlib.Path:
  root = pathlib.Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f"STC root {str(root)!r} does not exist; expected {LAYOUT}")
  return root


def list_videos(root: mvtec.PathLike, split: str) -> list[str]:
  """Sorted video ids of split 'train' or 'test' (the folders under <split>/frames)."""
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  folder = _folder(_check_root(root), "training" if split == "train" else "testing",
                   "frames")
  videos = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
  if not videos:
    raise ValueError(f"no video folder in {str(folder)!r}; expected {LAYOUT}")
  return videos


def _frames(folder: pathlib.Path) -> list[pathlib.Path]:
  frames = [p for p in folder.iterdir()
            if p.is_file() and p.suffix.lower() in _FRAME_EXTENSIONS and not p.name.startswith(".")]
  if not frames:
    raise ValueError(f"no frame (.jpg/.png) in {str(folder)!r}")
  if all(p.stem.isdigit() for p in frames):
    return sorted(frames, key=lambda p: int(p.stem))
  return sorted(frames)


def _load_npy(path: pathlib.Path, what: str) -> np.ndarray:
  """np.load of a mask file, refusing what is not a plain .npy array of its size.

  Memory-mapped first, so a header that claims more data than the file holds is an
  error instead of a huge allocation; then copied into memory.

  Raises:
    ValueError: not a .npy file, an object (pickle) array, or truncated; names the file.
  """
  try:
    return np.array(np.load(path, mmap_mode="r", allow_pickle=False))
  except (ValueError, OSError, EOFError) as e:
    raise ValueError(f"{what} {str(path)!r} is not readable as a .npy array ({e}); "
                     f"expected {LAYOUT}") from e


def _read_frame(path: pathlib.Path, size: int | None) -> np.ndarray:
  image = mvtec.read_rgb(path)
  return image if size is None else mvtec.resize_image(image, size)


def load_stc_train(root: mvtec.PathLike, *, frame_step: int = 5, size: int | None = 256,
                   videos: Sequence[str] | None = None) -> tuple[np.ndarray, list[str]]:
  """Every `frame_step`-th frame (from the first) of each training video.

  Returns:
    images [N, S, S, 3] uint8, and their paths relative to `root`.
  """
  if frame_step < 1:
    raise ValueError(f"frame_step must be >= 1, got {frame_step}")
  root = _check_root(root)
  videos = list_videos(root, "train") if videos is None else list(videos)
  images, paths = [], []
  for i, video in enumerate(videos):
    for path in _frames(_folder(root, "training", "frames", video))[::frame_step]:
      images.append(_read_frame(path, size))
      paths.append(path.relative_to(root).as_posix())
    logging.log_every_n_seconds(logging.INFO, "STC train: %d/%d videos", 10, i + 1,
                                len(videos))
  return mvtec.stack_split(images, paths, "STC train"), paths


def load_stc_test_video(root: mvtec.PathLike, video: str, *, frame_step: int = 1,
                        size: int | None = 256) -> STCVideo:
  """The frames, pixel masks and frame labels of one test video (every frame_step-th).

  Raises:
    FileNotFoundError: missing frames folder or pixel mask file.
    ValueError: mask and frames disagree in count or size (names the files).
  """
  if frame_step < 1:
    raise ValueError(f"frame_step must be >= 1, got {frame_step}")
  root = _check_root(root)
  frames = _frames(_folder(root, "testing", "frames", video))
  mask_path = _folder(root, "testing", "test_pixel_mask") / f"{video}.npy"
  if not mask_path.is_file():
    raise FileNotFoundError(f"test video {video!r} has no pixel mask: expected "
                            f"{str(mask_path)!r} ([T, H, W])")
  masks = _load_npy(mask_path, "pixel mask")
  if masks.ndim != 3 or len(masks) != len(frames):
    raise ValueError(f"pixel mask {str(mask_path)!r} has shape {masks.shape}; expected "
                     f"[{len(frames)}, H, W], one mask per frame of testing/frames/{video}")
  masks = (masks > 0).astype(np.uint8)
  label_path = root / "testing" / "test_frame_mask" / f"{video}.npy"
  if label_path.is_file():
    labels = _load_npy(label_path, "frame mask").reshape(-1).astype(np.int32)
    if len(labels) != len(frames):
      raise ValueError(f"frame mask {str(label_path)!r} has {len(labels)} labels; expected "
                       f"{len(frames)}, one per frame of testing/frames/{video}")
    labels = (labels > 0).astype(np.int32)
  else:
    labels = masks.reshape(len(masks), -1).max(axis=1).astype(np.int32)
  keep = range(0, len(frames), frame_step)
  images, kept_masks = [], []
  for i in keep:
    image = mvtec.read_rgb(frames[i])
    if image.shape[:2] != masks.shape[1:]:
      raise ValueError(f"frame {str(frames[i])!r} is {image.shape[1]}x{image.shape[0]} "
                       f"(WxH) but pixel mask {str(mask_path)!r} is "
                       f"{masks.shape[2]}x{masks.shape[1]}; expected equal")
    images.append(image if size is None else mvtec.resize_image(image, size))
    kept_masks.append(masks[i] if size is None else mvtec.resize_mask(masks[i], size))
  paths = [frames[i].relative_to(root).as_posix() for i in keep]
  return STCVideo(video, mvtec.stack_split(images, paths, f"STC test {video}"),
                  np.stack(kept_masks), labels[::frame_step], paths)


def load_stc(root: mvtec.PathLike, *, frame_step: int = STC_SETTINGS["frame_step"],
             test_frame_step: int = 1, size: int | None = STC_SETTINGS["image_size"],
             train_videos: Sequence[str] | None = None,
             test_videos: Sequence[str] | None = None) -> mvtec.CategoryData:
  """STC as one CategoryData ('stc'), for the same evaluation as an MVTec category.

  Test items are frames: label from the frame mask, defect 'anomalous' or 'good'.
  """
  train_images, train_paths = load_stc_train(root, frame_step=frame_step, size=size,
                                             videos=train_videos)
  test_videos = list_videos(root, "test") if test_videos is None else list(test_videos)
  parts = [load_stc_test_video(root, v, frame_step=test_frame_step, size=size)
           for v in test_videos]
  labels = np.concatenate([p.labels for p in parts])
  paths = [path for p in parts for path in p.paths]
  return mvtec.CategoryData(
      category="stc",
      train_images=train_images,
      test_images=mvtec.stack_split([f for p in parts for f in p.frames], paths, "STC test"),
      test_labels=labels,
      test_masks=np.concatenate([p.masks for p in parts]),
      test_defects=["anomalous" if label else mvtec.GOOD for label in labels],
      test_paths=paths,
      train_paths=train_paths)
