"""What predict.py writes into its output folder, and how.

  <output_dir>/scores.csv        header "path,score" (+ ",anomalous" with a threshold);
                                 one row per scored image, sorted by path (relative to
                                 the image folder, '/'-separated); anomalous is 1 when
                                 score > threshold, else 0
  <output_dir>/skipped.csv       "path,reason" of the files that are not readable
                                 images (only when there are some)
  <output_dir>/heatmaps/<path>.png   per image: the image as the detector saw it |
                                 its anomaly map over it (one colour scale for all)
  <output_dir>/summary.png       the most anomalous images, highest score first

Every file is written atomically (spade_jax.host.atomic).
"""

from __future__ import annotations

from collections.abc import Sequence
import csv
import io
import os
import pathlib
import tempfile

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

from spade_jax.evaluation import heatmaps
from spade_jax.host import atomic

SCORES_FILE = "scores.csv"
SKIPPED_FILE = "skipped.csv"
SUMMARY_FILE = "summary.png"
HEATMAPS_DIR = "heatmaps"
_LINE_HEIGHT = 16  # Caption lines of the summary, in pixels.
_MIN_PANEL = 160  # Smaller crops are enlarged (nearest) in the summary to fit captions.
_GAP = 6


def check_output_dir(output_dir: str | os.PathLike[str]) -> pathlib.Path:
  """Creates `output_dir` if needed and checks that files can be written in it.

  Raises:
    ValueError: it (or a folder on its path, or its heatmaps/) is a file, or it
      cannot be created or written to; the message names it and the fix.
  """
  out = pathlib.Path(output_dir)
  fix = "choose another output folder (--output_dir)"
  if out.exists() and not out.is_dir():
    raise ValueError(f"output folder {str(out)!r} is a file; {fix}")
  try:
    out.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=out, prefix=".write_test.")
    os.close(fd)
    os.unlink(probe)
  except OSError as e:
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    why = (f"{str(blocker)!r} is a file" if blocker is not None else e.strerror or str(e))
    raise ValueError(f"cannot write to output folder {str(out)!r} ({why}); {fix}") from e
  if (out / HEATMAPS_DIR).exists() and not (out / HEATMAPS_DIR).is_dir():
    raise ValueError(f"{str(out / HEATMAPS_DIR)!r} is a file, but heatmaps go in a folder "
                     f"of that name; move it away or {fix}")
  return out


def heatmap_path(out: pathlib.Path, relative: str) -> pathlib.Path:
  """<out>/heatmaps/<relative>.png: the image folder's tree, one PNG per image.

  The image's own name is kept whole ('a/1.jpg' -> 'heatmaps/a/1.jpg.png'), so images
  that differ only in their extension get different heatmaps.
  """
  return out / HEATMAPS_DIR / f"{relative}.png"


def _write_csv(path: pathlib.Path, rows: Sequence[Sequence[object]]) -> None:
  buffer = io.StringIO()
  csv.writer(buffer, lineterminator="\n").writerows(rows)
  with atomic.atomic_path(path) as tmp:
    tmp.write_text(buffer.getvalue(), encoding="utf-8")


def write_scores(out: pathlib.Path, paths: Sequence[str], scores: np.ndarray,
                 threshold: float | None) -> pathlib.Path:
  """Writes <out>/scores.csv (rows in the order given; callers pass sorted paths)."""
  header = ["path", "score"] + ([] if threshold is None else ["anomalous"])
  rows: list[list[object]] = [header]
  for path, score in zip(paths, np.asarray(scores, np.float64)):
    row: list[object] = [path, f"{score:.9g}"]  # 9 digits: float32 exactly.
    if threshold is not None:
      row.append(int(score > threshold))
    rows.append(row)
  _write_csv(out / SCORES_FILE, rows)
  return out / SCORES_FILE


def write_skipped(out: pathlib.Path, skipped: Sequence[tuple[str, str]]) -> pathlib.Path | None:
  """Writes <out>/skipped.csv ("path,reason"), or removes an old one when none was."""
  path = out / SKIPPED_FILE
  if not skipped:
    path.unlink(missing_ok=True)  # Left by an earlier run: it would mislead.
    return None
  _write_csv(path, [["path", "reason"], *[[p, r] for p, r in skipped]])
  return path


def _font(size: int) -> PIL.ImageFont.ImageFont | PIL.ImageFont.FreeTypeFont:
  try:
    return PIL.ImageFont.load_default(size=size)
  except (TypeError, ValueError, OSError):  # Older Pillow or no FreeType: bitmap font.
    return PIL.ImageFont.load_default()


def _fit_text(draw: PIL.ImageDraw.ImageDraw, text: str, font, width: int) -> str:
  """`text`, its start cut (with '...') until it fits in `width` pixels."""
  if draw.textlength(text, font=font) <= width:
    return text
  while text and draw.textlength("..." + text, font=font) > width:
    text = text[1:]
  return "..." + text


def _enlarge(x: np.ndarray, scale: int) -> np.ndarray:
  return np.repeat(np.repeat(x, scale, axis=0), scale, axis=1)


def render_summary(views: np.ndarray, maps: np.ndarray,
                   captions: Sequence[tuple[str, str]], *, vmin: float, vmax: float
                   ) -> np.ndarray:
  """One row per image, top to bottom: two caption lines above image | overlay.

  Args:
    views: [n, H, W, 3] uint8 images as the detector saw them (heatmaps.model_view).
    maps: [n, H, W] float anomaly maps.
    captions: n (first line, second line) pairs; a line too long for the row is cut
      at its start ('...').
    vmin, vmax: the colour scale (as the per-image heatmaps use).

  Returns:
    [n (2 lines + H' + gap) - gap, 2 W' + gap, 3] uint8, where H', W' are H, W
    enlarged (nearest) to at least 160 pixels.
  """
  if len(views) == 0:
    raise ValueError("render_summary needs at least one image")
  font = _font(_LINE_HEIGHT - 3)
  rows = []
  for view, anomaly_map, lines in zip(views, maps, captions):
    scale = max(1, -(-_MIN_PANEL // min(view.shape[:2])))
    figure = heatmaps.render_prediction(_enlarge(np.asarray(view), scale),
                                        _enlarge(np.asarray(anomaly_map), scale),
                                        vmin=vmin, vmax=vmax)
    strip = PIL.Image.new("RGB", (figure.shape[1], _LINE_HEIGHT * len(lines)), "white")
    draw = PIL.ImageDraw.Draw(strip)
    for i, line in enumerate(lines):
      draw.text((2, 1 + i * _LINE_HEIGHT), _fit_text(draw, line, font, figure.shape[1] - 4),
                fill="black", font=font)
    gap = np.full((_GAP, figure.shape[1], 3), 255, np.uint8)
    rows += [np.asarray(strip), figure, gap]
  return np.concatenate(rows[:-1], axis=0)


def summary_captions(paths: Sequence[str], scores: Sequence[float],
                     threshold: float | None) -> list[tuple[str, str]]:
  """('#1  score 3.21  ANOMALOUS', 'a/1.png') for each image, ranked as given."""
  captions = []
  for rank, (path, score) in enumerate(zip(paths, scores), 1):
    flag = "" if threshold is None else ("  ANOMALOUS" if score > threshold else "  normal")
    captions.append((f"#{rank}  score {score:.4g}{flag}", path))
  return captions
