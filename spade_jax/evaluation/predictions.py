"""What predict.py writes into its output folder, and how.

  <output_dir>/scores.csv        header "path,score" (+ ",anomalous" with a threshold);
                                 one row per scored image, sorted by path (relative to
                                 the image folder, '/'-separated); anomalous is 1 when
                                 score > threshold, else 0
  <output_dir>/skipped.csv       "path,reason" of the files left out: not readable
                                 images, and image formats that are not read (GIF,
                                 HEIC, ...: folder.UNSUPPORTED_EXTENSIONS); only when
                                 there are some
  <output_dir>/heatmaps/<path>.png   per image: the image at its own size | its
                                 anomaly map over it (one colour scale for all)
  <output_dir>/maps/<path>.npy   per image with save_maps: its anomaly map, float32
                                 [H, W] at the image's own size (NaN outside a crop)
  <output_dir>/summary.png       the most anomalous images, highest score first
  <output_dir>/.predict-complete JSON naming the run (finished, images_dir, images,
                                 skipped, threshold, outputs: the files above it
                                 wrote), written last
  <output_dir>/.predict.lock     the folder's lock; holds the pid of the run holding it

A run's outputs appear together or not at all (start_run):
* One run at a time: a run holds an exclusive lock on .predict.lock (fcntl.flock,
  spade_jax.host.locks) from before it reads the folder until it is done. A second run
  on the folder is refused with a ValueError naming the first one's pid. The kernel
  releases the lock of a run that dies, so a killed run never blocks the next.
* Staging: a run writes every output, and its temporary arrays, into a fresh hidden
  folder of the output folder, named after its writer as spade_jax.host.atomic names
  temporary files (.predict-run.spade-tmp.<host>.<pid>.<random>/). Nothing else in the
  output folder changes meanwhile.
* Commit: once everything is written, the run's marker goes into the staging folder,
  the old .predict-complete is removed, the previous run's outputs (scores.csv,
  skipped.csv, heatmaps/, maps/, summary.png: only these) are replaced by this run's or
  removed (scores.csv last), and the marker is renamed into place last.
* What a reader can rely on: where .predict-complete exists, the outputs beside it
  are those of the one complete run it names, and no file of an earlier run is among
  them. A run that fails or is killed before its commit leaves the previous complete
  run as it was, or nothing. One killed during the commit (a few renames) leaves no
  .predict-complete, and the next run on the folder completes that commit first.
* Leftovers: every run first removes the staging folders of killed runs (written on
  this host by a process no longer alive, as atomic's stale temporary files), and the
  .predict-XXXXXXXX/ folders of temporary arrays that older versions left.
* Other files: nothing else in the output folder is touched. A folder holding
  scores.csv, skipped.csv, heatmaps/ or summary.png that no predict run wrote (no
  .predict-complete, no scores.csv with a "path,score" header; e.g. evaluate.py's
  heatmaps/) is refused, not replaced. An output folder that a failed run created is
  removed again.

File names in the CSVs and heatmaps:
* The CSVs are UTF-8. A file name that is not valid UTF-8 (possible on Linux) is
  written with its original bytes (Python's errors='surrogateescape'), so its cell
  names the file exactly and heatmaps/<cell>.png is its heatmap. Read such a CSV
  with encoding="utf-8", errors="surrogateescape". Valid UTF-8 names are unchanged.
* A text cell (path, reason) that starts with '=', '+', '-', '@', a tab or a carriage
  return, which spreadsheets take for a formula (OWASP's CSV injection rule), or with
  a "'", is written with a "'" in front: drop one leading "'" to get the name back
  (path_from_cell).
* Names with newlines or other control characters are quoted by the CSV rules. The
  summary's captions (and predict.py's messages) show them escaped: display_name.

Every file is written atomically (spade_jax.host.atomic).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
import contextlib
import csv
import dataclasses
import io
import json
import os
import pathlib
import re
import shutil
import tempfile
from typing import Any
import unicodedata

from absl import logging
import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

from spade_jax.evaluation import heatmaps
from spade_jax.host import atomic, locks

SCORES_FILE = "scores.csv"
SKIPPED_FILE = "skipped.csv"
SUMMARY_FILE = "summary.png"
HEATMAPS_DIR = "heatmaps"
MAPS_DIR = "maps"
COMPLETE_FILE = ".predict-complete"
LOCK_FILE = ".predict.lock"
RUN_OUTPUTS = (SCORES_FILE, SKIPPED_FILE, HEATMAPS_DIR, MAPS_DIR, SUMMARY_FILE)
_COMMIT_ORDER = (HEATMAPS_DIR, MAPS_DIR, SUMMARY_FILE, SKIPPED_FILE, SCORES_FILE)
_FOLDERS = (HEATMAPS_DIR, MAPS_DIR)
_STAGING = "predict-run"  # Staging folders: atomic.new_temp_dir(<out>/predict-run).
_TRASH = ".replaced"  # In a staging folder: the outputs its commit replaced.
_LEGACY_TEMP = re.compile(r"\.predict-[a-z0-9_]{8}")  # tempfile folders of old versions.
_LEGACY_FILES = {"maps", "views"}
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
                           "\u2066\u2067\u2068\u2069")
_FIX = "choose another output folder (--output_dir)"
_LINE_HEIGHT = 16  # Caption lines of the summary, in pixels.
_MIN_PANEL = 160  # Smaller crops are enlarged (nearest) in the summary to fit captions.
_GAP = 6


def display_name(name: str) -> str:
  r"""`name` safe to show on one line: control characters escaped as \n, \t, \x1b,
  \u2028 (also bidirectional overrides), and bytes that were not valid UTF-8 (Python's
  surrogateescape) as \xff. Other characters, backslashes included, are unchanged."""
  out = []
  for ch in name:
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # An undecodable byte of a file name.
      out.append(f"\\x{code - 0xDC00:02x}")
    elif unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp") or ch in _BIDI_CONTROLS:
      out.append(ch.encode("unicode_escape").decode("ascii"))
    else:
      out.append(ch)
  return "".join(out)


def csv_cell(text: str) -> str:
  """`text` as a CSV cell: a "'" in front when it starts like a formula or with "'"."""
  return "'" + text if text.startswith(_FORMULA_START) else text


def path_from_cell(cell: str) -> str:
  """The text of a cell written by csv_cell (one leading "'" dropped)."""
  return cell[1:] if cell.startswith("'") else cell


def _in_use(out: pathlib.Path, pid: int | None) -> ValueError:
  return ValueError(f"output folder {str(out)!r} is in use by another predict run "
                    f"({locks.holder_text(pid)}); wait for it or choose another "
                    "--output_dir")


def _check_writable(out: pathlib.Path) -> None:
  try:
    fd, probe = tempfile.mkstemp(dir=out, prefix=".write_test.")
    os.close(fd)
    os.unlink(probe)
  except OSError as e:
    raise ValueError(f"cannot write to output folder {str(out)!r} ({e.strerror or e}); "
                     f"{_FIX}") from e


def _staging_folders(out: pathlib.Path) -> list[pathlib.Path]:
  """Every staging folder in `out`, of any writer."""
  prefix = f".{_STAGING}{atomic.TEMP_MARK}"
  try:
    return sorted(out / e.name for e in os.scandir(out)
                  if e.name.startswith(prefix) and e.is_dir(follow_symlinks=False))
  except OSError:
    return []


def _written_by_predict(out: pathlib.Path) -> bool:
  """Whether the outputs in `out` are predict runs' (a marker, an interrupted commit,
  or the scores.csv of a version before markers)."""
  if (out / COMPLETE_FILE).is_file():
    return True
  if any((stage / COMPLETE_FILE).is_file() for stage in _staging_folders(out)):
    return True
  try:
    with open(out / SCORES_FILE, "rb") as f:
      return f.read(10) == b"path,score"
  except OSError:
    return False


def _check_outputs(out: pathlib.Path) -> None:
  """The names a run replaces are free, or a predict run's outputs."""
  for name in (SCORES_FILE, SKIPPED_FILE, SUMMARY_FILE, COMPLETE_FILE):
    if (out / name).is_dir() and not (out / name).is_symlink():
      raise ValueError(f"{str(out / name)!r} is a folder, but predict.py writes a file of "
                       f"that name; move it away or {_FIX}")
  for name in _FOLDERS:
    if (out / name).exists() and not (out / name).is_dir():
      raise ValueError(f"{str(out / name)!r} is a file, but {name} go in a folder of that "
                       f"name; move it away or {_FIX}")
  present = [name + "/" * (name in _FOLDERS) for name in RUN_OUTPUTS
             if os.path.lexists(out / name)]
  if present and not _written_by_predict(out):
    raise ValueError(f"output folder {str(out)!r} holds {', '.join(present)}, which no "
                     f"predict run wrote (no {COMPLETE_FILE}); a run would replace them: "
                     f"move them away or {_FIX}")


def check_output_dir(output_dir: str | os.PathLike[str]) -> pathlib.Path:
  """Checks, before any work, that a predict run can write to `output_dir`.

  Creates nothing: a run creates the folder once it has images to score (start_run).

  Raises:
    ValueError: it (or a folder on its path) is a file, or it cannot be created or
      written to; its heatmaps/ is a file (or an output file name a folder); it holds
      outputs that no predict run wrote; or another predict run is using it. The
      message names it and the fix.
  """
  out = pathlib.Path(output_dir)
  if out.is_dir():
    _check_writable(out)
    try:
      locks.check_free(out / LOCK_FILE)
    except locks.LockHeld as e:
      raise _in_use(out, e.pid) from None
    _check_outputs(out)
    return out
  if out.exists() or out.is_symlink():
    raise ValueError(f"output folder {str(out)!r} is a file; {_FIX}")
  ancestor = next(p for p in out.absolute().parents if p.exists())
  if not ancestor.is_dir():
    raise ValueError(f"cannot write to output folder {str(out)!r} ({str(ancestor)!r} is a "
                     f"file); {_FIX}")
  if not os.access(ancestor, os.W_OK | os.X_OK):
    raise ValueError(f"cannot create output folder {str(out)!r} (folder {str(ancestor)!r} "
                     f"is not writable); {_FIX}")
  return out


@dataclasses.dataclass
class OutputRun:
  """One run's claim on its output folder (start_run).

  Attributes:
    out: the output folder.
    stage: this run's staging folder in it: write every output there (write_scores,
      write_skipped, heatmap_path, ...), then commit.
    committed: the outputs are in place.
  """
  out: pathlib.Path
  stage: pathlib.Path
  committed: bool = False

  def commit(self, record: Mapping[str, Any]) -> pathlib.Path:
    """Puts the staged outputs in place of the previous run's; returns the marker.

    record: what .predict-complete says about the run (JSON values); "outputs" (the
    outputs staged) is added.
    """
    if self.committed:
      raise ValueError("this run is committed already")
    outputs = [name for name in RUN_OUTPUTS if os.path.lexists(self.stage / name)]
    with atomic.atomic_path(self.stage / COMPLETE_FILE) as tmp:
      tmp.write_text(json.dumps({**record, "outputs": outputs}, indent=2) + "\n",
                     encoding="utf-8")
    _publish(self.out, self.stage)  # From the marker on, the next run would finish it.
    self.committed = True
    return self.out / COMPLETE_FILE


def _fsync_folder(folder: pathlib.Path) -> None:
  try:
    fd = os.open(folder, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass  # Not every filesystem syncs folders.
  finally:
    os.close(fd)


def _discard(path: pathlib.Path, stage: pathlib.Path) -> None:
  """Removes an output of the previous run (a folder: moved into the staging folder's
  trash in one rename, deleted with it)."""
  if path.is_dir() and not path.is_symlink():
    trash = stage / _TRASH
    trash.mkdir(exist_ok=True)
    if os.path.lexists(trash / path.name):  # From an earlier, interrupted try.
      shutil.rmtree(trash / path.name)
    os.rename(path, trash / path.name)
  else:
    path.unlink()


def _put_in_place(out: pathlib.Path, stage: pathlib.Path, name: str, staged: bool) -> None:
  """One output of a commit: the staged one replaces the old one; an old one the run
  did not write goes. Repeatable: a moved output is not staged any more."""
  new, old = stage / name, out / name
  if os.path.lexists(new):
    if old.is_dir() and not old.is_symlink():
      _discard(old, stage)
    os.replace(new, old)
  elif not staged and os.path.lexists(old):
    _discard(old, stage)


def _publish(out: pathlib.Path, stage: pathlib.Path) -> None:
  """The commit of a staging folder that holds its marker (also a killed one's)."""
  record = json.loads((stage / COMPLETE_FILE).read_text(encoding="utf-8"))
  staged = set(record["outputs"])
  (out / COMPLETE_FILE).unlink(missing_ok=True)  # Until the end: no complete run here.
  for name in _COMMIT_ORDER:
    _put_in_place(out, stage, name, name in staged)
  _fsync_folder(out)
  os.replace(stage / COMPLETE_FILE, out / COMPLETE_FILE)
  _fsync_folder(out)
  shutil.rmtree(stage, ignore_errors=True)  # What was replaced, the temporary arrays.


def _recover(out: pathlib.Path) -> None:
  """Finishes the commit of a killed run, removes what killed runs left (under the lock).

  Staging folders of this process are stale too: the lock shows none is in use.
  """
  for stage in atomic.stale_temps(out / _STAGING, folders=True, include_own=True):
    if (stage / COMPLETE_FILE).is_file():
      logging.warning("%s: completing the predict run that was interrupted while its "
                      "outputs were put in place", display_name(str(out)))
      _publish(out, stage)
    else:
      logging.info("removing %s, left by an interrupted predict run",
                   display_name(str(stage)))
      shutil.rmtree(stage, ignore_errors=True)
  try:
    entries = [e for e in os.scandir(out) if _LEGACY_TEMP.fullmatch(e.name)
               and e.is_dir(follow_symlinks=False)]
  except OSError:
    return
  for entry in entries:
    try:
      if set(os.listdir(entry.path)) <= _LEGACY_FILES:
        shutil.rmtree(entry.path)
        logging.info("removed %s, left by an interrupted predict run",
                     display_name(entry.path))
    except OSError:
      continue


def _make_folders(out: pathlib.Path) -> list[pathlib.Path]:
  """Creates `out` and its missing parents; returns those this call created, outer first."""
  missing = []
  path = out
  while not path.exists() and not path.is_symlink() and path != path.parent:
    missing.append(path)
    path = path.parent
  created = []
  try:
    for path in reversed(missing):
      try:
        path.mkdir()
      except FileExistsError:
        if not path.is_dir():
          raise
        continue
      created.append(path)
  except OSError as e:
    raise ValueError(f"cannot create output folder {str(out)!r} ({e.strerror or e}); "
                     f"{_FIX}") from e
  return created


def _remove_created(out: pathlib.Path, created: Sequence[pathlib.Path]) -> None:
  """Removes the folders a failed run created, if it left nothing but its lock file."""
  try:
    if set(os.listdir(out)) - {LOCK_FILE}:
      return
    (out / LOCK_FILE).unlink(missing_ok=True)
    for path in reversed(created):
      path.rmdir()
  except OSError:
    pass


@contextlib.contextmanager
def start_run(output_dir: str | os.PathLike[str]) -> Iterator[OutputRun]:
  """Claims `output_dir` for one run (see the module docstring).

  Creates the folder if needed, locks it, finishes or removes what interrupted runs
  left, and yields an OutputRun whose staging folder is empty. Leaving the block
  without OutputRun.commit (an exception) removes the staging folder: the output folder
  is as it was, and is removed if this call created it.

  Raises:
    ValueError: check_output_dir's reasons, e.g. another predict run holds the folder.
  """
  out = check_output_dir(output_dir)
  created = _make_folders(out)
  try:
    with contextlib.ExitStack() as stack:
      try:
        stack.enter_context(locks.exclusive(out / LOCK_FILE, blocking=False))
      except locks.LockHeld as e:
        raise _in_use(out, e.pid) from None
      _recover(out)
      _check_outputs(out)  # Again, now that no other run can change the folder.
      run = OutputRun(out, atomic.new_temp_dir(out / _STAGING))
      try:
        yield run
      finally:
        if not run.committed and not (run.stage / COMPLETE_FILE).is_file():
          shutil.rmtree(run.stage, ignore_errors=True)
  except BaseException:
    if created:
      _remove_created(out, created)
    raise


def heatmap_path(out: pathlib.Path, relative: str) -> pathlib.Path:
  """<out>/heatmaps/<relative>.png: the image folder's tree, one PNG per image.

  The image's own name is kept whole ('a/1.jpg' -> 'heatmaps/a/1.jpg.png'), so images
  that differ only in their extension get different heatmaps.
  """
  return out / HEATMAPS_DIR / f"{relative}.png"


def map_path(out: pathlib.Path, relative: str) -> pathlib.Path:
  """<out>/maps/<relative>.npy: the image folder's tree, one map per image (its name kept
  whole, as heatmap_path)."""
  return out / MAPS_DIR / f"{relative}.npy"


def write_map(out: pathlib.Path, relative: str, anomaly_map: np.ndarray) -> pathlib.Path:
  """Writes one image's map, float32 [H, W] at the image's own size, to map_path."""
  path = map_path(out, relative)
  path.parent.mkdir(parents=True, exist_ok=True)
  with atomic.atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      np.save(f, np.asarray(anomaly_map, np.float32), allow_pickle=False)
  return path


def _write_csv(path: pathlib.Path, rows: Sequence[Sequence[object]]) -> None:
  """UTF-8, a file name's undecodable bytes as they were (surrogateescape)."""
  buffer = io.StringIO()
  csv.writer(buffer, lineterminator="\n").writerows(rows)
  text = buffer.getvalue()
  try:
    data = text.encode("utf-8", "surrogateescape")  # A file name's original bytes.
  except UnicodeEncodeError:  # A lone surrogate no file name on POSIX holds.
    data = text.encode("utf-8", "backslashreplace")
  with atomic.atomic_path(path) as tmp:
    tmp.write_bytes(data)


def write_scores(out: pathlib.Path, paths: Sequence[str], scores: np.ndarray,
                 threshold: float | None) -> pathlib.Path:
  """Writes <out>/scores.csv (rows in the order given; callers pass sorted paths)."""
  header = ["path", "score"] + ([] if threshold is None else ["anomalous"])
  rows: list[list[object]] = [header]
  for path, score in zip(paths, np.asarray(scores, np.float64)):
    row: list[object] = [csv_cell(path), f"{score:.9g}"]  # 9 digits: float32 exactly.
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
  _write_csv(path, [["path", "reason"], *[[csv_cell(p), csv_cell(r)] for p, r in skipped]])
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
    views: n images [H_i, W_i, 3] uint8 (an array or a list).
    maps: n anomaly maps [H_i, W_i] float, each its image's size.
    captions: n (first line, second line) pairs; a line too long for the row is cut
      at its start ('...').
    vmin, vmax: the colour scale (as the per-image heatmaps use).

  Returns:
    [n (2 lines + H' + gap) - gap, 2 W' + gap, 3] uint8, where H', W' are H, W
    enlarged (nearest) to at least 160 pixels (rows of narrower images padded white).
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
  width = max(r.shape[1] for r in rows)  # Images of other sizes: rows padded white.
  rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255)
          for r in rows]
  return np.concatenate(rows[:-1], axis=0)


def summary_captions(paths: Sequence[str], scores: Sequence[float],
                     threshold: float | None) -> list[tuple[str, str]]:
  """('#1  score 3.21  ANOMALOUS', 'a/1.png') for each image, ranked as given; the
  path as display_name shows it (control characters escaped: one line)."""
  captions = []
  for rank, (path, score) in enumerate(zip(paths, scores), 1):
    flag = "" if threshold is None else ("  ANOMALOUS" if score > threshold else "  normal")
    captions.append((f"#{rank}  score {score:.4g}{flag}", display_name(path)))
  return captions
