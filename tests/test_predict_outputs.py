"""predict_folder's output folder against hostile names and interrupted or concurrent
runs (spade_jax.evaluation.predictions): names that are not UTF-8, hold control
characters or look like formulas; a reused folder; runs that fail, are killed or run at
once; unsupported and multi-frame images.

In process with the small FakeBackbone (32 x 32 crops): a second or less per test once
its process has compiled the detector. The kill tests start one Python process each.
"""

import csv
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest
from spade_fake_backbone import FakeBackbone

import spade_jax
from spade_jax.data import folder
from spade_jax.evaluation import folders, heatmaps, predictions
from spade_jax.host import atomic, locks

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = {"k_images": 2, "k_image_score": 1, "layers": ("layer1", "layer2"), "resize": 32,
          "crop": 32, "batch_size": 1}
OUTPUTS = {"scores.csv", "skipped.csv", "heatmaps", "summary.png"}


@pytest.fixture(name="detector", scope="module")
def fixture_detector():
  spade = spade_jax.Spade(FakeBackbone(), spade_jax.SpadeConfig(**CONFIG))
  index = spade.fit(np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), np.uint8))
  return spade, index


def _png(path, seed=0, fmt="png"):
  path = os.fsencode(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  array = np.random.default_rng(seed).integers(0, 256, (40, 40, 3), np.uint8)
  PIL.Image.fromarray(array).save(path, format=fmt)


def _folder(root, names):
  """A folder of small PNGs (names: str or bytes), plus 'broken' names that are not."""
  root.mkdir(parents=True, exist_ok=True)
  for i, name in enumerate(names):
    path = os.path.join(os.fsencode(root), os.fsencode(name))
    if b"broken" in path:
      with open(path, "wb") as f:
        f.write(b"not an image")
    else:
      _png(path, seed=i)
  return root


def _predict(detector, images, out, **kwargs):
  spade, index = detector
  kwargs.setdefault("num_summary", 8)
  return folders.predict_folder(spade, index, images, out, log=lambda _: None, **kwargs)


def _rows(path):
  with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
    return list(csv.reader(f))


def _snapshot(out):
  """{relative path: bytes} of every file under `out` (hidden ones too) but the lock file
  (it holds the pid of its last holder)."""
  return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*")
          if p.is_file() and p.name != predictions.LOCK_FILE}


def _hidden_leftovers(out):
  return sorted(n for n in os.listdir(out) if n.startswith(".")
                and n not in (predictions.COMPLETE_FILE, predictions.LOCK_FILE))


@pytest.mark.slow
def test_name_that_is_not_utf8_round_trips(tmp_path, detector):
  images = tmp_path / "images"
  try:
    _folder(images, [b"bad\xff.png", "caf\u00e9.png"])
  except (OSError, UnicodeError):
    pytest.skip("this filesystem refuses file names that are not UTF-8")
  out = tmp_path / "out"
  report = _predict(detector, images, out)
  bad = os.fsdecode(b"bad\xff.png")
  assert report.paths == [bad, "caf\u00e9.png"]
  raw = (out / "scores.csv").read_bytes()  # The original bytes; valid UTF-8 unchanged.
  assert b"\nbad\xff.png," in raw and "\ncaf\u00e9.png,".encode() in raw
  rows = _rows(out / "scores.csv")
  assert [r[0] for r in rows[1:]] == report.paths
  for cell, *_ in rows[1:]:  # Every cell names its image and its heatmap.
    assert (images / cell).is_file()
    assert predictions.heatmap_path(out, cell).is_file()
  assert b"bad\xff.png.png" in os.listdir(os.fsencode(out / "heatmaps"))
  assert (out / "summary.png").is_file()
  assert predictions.summary_captions([bad], [1.0], None)[0][1] == "bad\\xff.png"


def test_control_characters_in_names_are_escaped_in_the_summary(tmp_path, detector):
  names = ["new\nline.png", "esc\x1b[31m.png", "ok.png"]
  report = _predict(detector, _folder(tmp_path / "images", names), tmp_path / "out")
  assert sorted(report.paths) == sorted(names)
  assert (tmp_path / "out" / "summary.png").is_file()
  assert [r[0] for r in _rows(tmp_path / "out" / "scores.csv")[1:]] == report.paths
  assert (tmp_path / "out" / "heatmaps" / "new\nline.png.png").is_file()
  captions = predictions.summary_captions(names, [3.0, 2.0, 1.0], None)
  assert [c[1] for c in captions] == ["new\\nline.png", "esc\\x1b[31m.png", "ok.png"]
  assert predictions.display_name("a\tb\r\u2028\u202e\udcff\\x.png") == \
      "a\\tb\\r\\u2028\\u202e\\xff\\x.png"


def test_names_that_look_like_formulas_are_quoted(tmp_path, detector):
  names = ["=1+1.png", "+a.png", "-a.png", "@a.png", "\tt.png", "'q.png", "plain.png",
           "=broken.png"]
  report = _predict(detector, _folder(tmp_path / "images", names), tmp_path / "out")
  cells = [r[0] for r in _rows(tmp_path / "out" / "scores.csv")[1:]]
  assert cells == ["'\tt.png", "''q.png", "'+a.png", "'-a.png", "'=1+1.png", "'@a.png",
                   "plain.png"]
  assert [predictions.path_from_cell(c) for c in cells] == report.paths
  skipped = _rows(tmp_path / "out" / "skipped.csv")
  assert skipped[1][0] == "'=broken.png" and skipped[1][1][0] not in "=+-@'"
  predictions.write_scores(tmp_path, ["a.png"], np.array([-1.5]), None)  # A number: as is.
  assert _rows(tmp_path / "scores.csv")[1] == ["a.png", "-1.5"]


def test_reused_output_folder_holds_only_the_new_run(tmp_path, detector):
  out = tmp_path / "out"
  _predict(detector, _folder(tmp_path / "one", ["a.png", "b.png", "broken.png"]), out)
  (out / "notes.txt").write_text("the user's")
  (out / "mine").mkdir()
  second = _predict(detector, _folder(tmp_path / "two", ["c.png"]), out, num_summary=1)
  assert sorted(os.listdir(out / "heatmaps")) == ["c.png.png"]
  assert not (out / "skipped.csv").exists()  # The first run's, gone with it.
  assert np.asarray(PIL.Image.open(out / "summary.png")).shape[0] == 2 * 16 + 160
  marker = json.loads((out / predictions.COMPLETE_FILE).read_text())
  assert (marker["images"], marker["skipped"]) == (1, 0)
  assert marker["outputs"] == ["scores.csv", "heatmaps", "summary.png"]
  assert marker["images_dir"] == str(tmp_path / "two")
  assert [r[0] for r in _rows(out / "scores.csv")[1:]] == second.paths == ["c.png"]
  _predict(detector, tmp_path / "two", out, write_heatmaps=False, num_summary=0)
  assert sorted(os.listdir(out)) == [predictions.COMPLETE_FILE, predictions.LOCK_FILE,
                                     "mine", "notes.txt", "scores.csv"]
  assert (out / "notes.txt").read_text() == "the user's"


def test_outputs_no_predict_run_wrote_are_refused(tmp_path, detector):
  out = tmp_path / "evaluate_out"  # e.g. evaluate.py's folder: heatmaps/ of its own.
  _png(out / "heatmaps" / "x.png")
  with pytest.raises(ValueError, match=r"holds heatmaps/, which no predict run wrote"):
    _predict(detector, _folder(tmp_path / "images", ["a.png"]), out)
  assert os.listdir(out / "heatmaps") == ["x.png"]


def test_interrupted_run_leaves_the_previous_run(tmp_path, detector, monkeypatch):
  out = tmp_path / "out"
  _predict(detector, _folder(tmp_path / "one", ["a.png", "b.png", "broken.png"]), out)
  before = _snapshot(out)
  real, calls = heatmaps.save_png, []

  def failing(path, figure):
    calls.append(path)
    if len(calls) == 2:
      raise KeyboardInterrupt  # As a Ctrl-C while the heatmaps are written.
    return real(path, figure)

  monkeypatch.setattr(heatmaps, "save_png", failing)
  two = _folder(tmp_path / "two", ["c.png", "d.png", "e.png"])
  with pytest.raises(KeyboardInterrupt):
    _predict(detector, two, out)
  assert _snapshot(out) == before  # The previous complete run, nothing of the new one.
  assert _hidden_leftovers(out) == []
  calls.clear()
  with pytest.raises(KeyboardInterrupt):  # A first run into a new folder: no folder.
    _predict(detector, two, tmp_path / "new" / "out")
  assert not (tmp_path / "new").exists()
  monkeypatch.setattr(heatmaps, "save_png", real)
  _predict(detector, two, out)
  assert sorted(os.listdir(out / "heatmaps")) == ["c.png.png", "d.png.png", "e.png.png"]


def test_run_interrupted_during_its_commit_is_completed_by_the_next(tmp_path, detector,
                                                                   monkeypatch):
  out = tmp_path / "out"
  _predict(detector, _folder(tmp_path / "one", ["a.png", "b.png"]), out)
  real, calls = predictions._put_in_place, []  # pylint: disable=protected-access

  def failing(*args):
    calls.append(args)
    if len(calls) == 2:  # heatmaps/ replaced, summary.png not yet.
      raise OSError("killed")
    return real(*args)

  monkeypatch.setattr(predictions, "_put_in_place", failing)
  with pytest.raises(OSError, match="killed"):
    _predict(detector, _folder(tmp_path / "two", ["c.png", "broken.png"]), out)
  assert not (out / predictions.COMPLETE_FILE).exists()  # Not a complete run.
  assert len(_hidden_leftovers(out)) == 1  # The staged run, with its marker.
  monkeypatch.setattr(predictions, "_put_in_place", real)
  with pytest.raises(ValueError, match="none of the 1 image files"):  # Fails, but first
    _predict(detector, _folder(tmp_path / "three", ["broken.png"]), out)  # completes two.
  marker = json.loads((out / predictions.COMPLETE_FILE).read_text())
  assert (marker["images"], marker["skipped"]) == (1, 1)
  assert [r[0] for r in _rows(out / "scores.csv")[1:]] == ["c.png"]
  assert [r[0] for r in _rows(out / "skipped.csv")[1:]] == ["broken.png"]
  assert os.listdir(out / "heatmaps") == ["c.png.png"]
  assert _hidden_leftovers(out) == []


def _stage_name(out, pid, tag=None):
  tag = atomic._host_tag() if tag is None else tag  # pylint: disable=protected-access
  return out / f".predict-run{atomic.TEMP_MARK}{tag}.{pid}.abc123xy"


def _dead_pid():
  proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        check=True, capture_output=True, text=True)
  return int(proc.stdout)


@pytest.mark.slow
def test_temporary_folders_of_killed_runs_are_removed(tmp_path, detector):
  out = tmp_path / "out"
  images = _folder(tmp_path / "images", ["a.png"])
  _predict(detector, images, out)
  dead = _stage_name(out, _dead_pid())
  live = _stage_name(out, os.getppid())  # A live writer's: not touched.
  elsewhere = _stage_name(out, 1234, tag="0123abcd")  # Another host's: not touched.
  legacy = out / ".predict-k3j_9x0q"  # tempfile's folder of older versions.
  for stage, names in [(dead, ["maps", "views", "heatmaps/a.png.png"]), (live, ["maps"]),
                       (elsewhere, ["maps"]), (legacy, ["maps", "views"])]:
    for name in names:
      (stage / name).parent.mkdir(parents=True, exist_ok=True)
      (stage / name).write_bytes(b"\0" * 100)
  _predict(detector, images, out)
  assert not dead.exists() and not legacy.exists()
  assert live.exists() and elsewhere.exists()


def _start(code, *args):
  """A Python process running `code`; returns it once it printed its first line."""
  proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=REPO / "tests", env=dict(os.environ, JAX_PLATFORMS="cpu"))
  line = proc.stdout.readline()
  if not line:
    proc.wait()
    pytest.fail(proc.stderr.read()[-3000:])
  return proc


def _kill(proc):
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  proc.stdout.close()
  proc.stderr.close()


_KILLED_WHILE_WRITING_HEATMAPS = """
    import sys, time
    import numpy as np
    from spade_jax.evaluation import heatmaps, predictions
    with predictions.start_run(sys.argv[1]) as run:  # As predict_folder writes a run.
      predictions.write_scores(run.stage, ["b.png", "c.png"], np.array([1.0, 2.0]), None)
      heatmaps.save_png(predictions.heatmap_path(run.stage, "b.png"),
                        np.zeros((4, 4, 3), np.uint8))
      print("writing heatmaps", flush=True)
      time.sleep(600)
"""


@pytest.mark.slow
def test_kill_9_while_writing_heatmaps(tmp_path, detector):
  out = tmp_path / "out"
  _predict(detector, _folder(tmp_path / "one", ["a.png"]), out)
  before = _snapshot(out)
  two = _folder(tmp_path / "two", ["b.png", "c.png", "d.png"])
  proc = _start(_KILLED_WHILE_WRITING_HEATMAPS, out)
  with pytest.raises(ValueError, match=rf"in use by another predict run \(pid {proc.pid}\)"):
    _predict(detector, two, out)
  _kill(proc)
  stale = _hidden_leftovers(out)
  assert len(stale) == 1 and f".{proc.pid}." in stale[0]  # Its staging folder stays ...
  assert {k: v for k, v in _snapshot(out).items() if not k.startswith(stale[0])} == before
  report = _predict(detector, two, out)  # ... until the next run, which the lock let in.
  assert _hidden_leftovers(out) == []
  assert [r[0] for r in _rows(out / "scores.csv")[1:]] == report.paths == ["b.png", "c.png",
                                                                            "d.png"]


_HOLD_LOCK = """
    import sys, time
    from spade_jax.host import locks
    with locks.exclusive(sys.argv[1], blocking=False):
      print("locked", flush=True)
      time.sleep(600)
"""


@pytest.mark.slow
def test_second_run_on_the_folder_is_refused(tmp_path, detector):
  out = tmp_path / "out"
  images = _folder(tmp_path / "images", ["a.png"])
  _predict(detector, images, out)
  before = _snapshot(out)
  message = (rf"output folder '{out}' is in use by another predict run \(pid {os.getpid()}\); "
             r"wait for it or choose another --output_dir")
  with locks.exclusive(out / predictions.LOCK_FILE, blocking=False):  # A run in progress.
    with pytest.raises(ValueError, match=message):
      predictions.check_output_dir(out)  # What predict.py checks before any work.
    with pytest.raises(ValueError, match=message):
      _predict(detector, images, out)
  proc = _start(_HOLD_LOCK, out / predictions.LOCK_FILE)  # Another process holds it ...
  try:
    with pytest.raises(ValueError, match=rf"in use by another predict run \(pid {proc.pid}\)"):
      _predict(detector, images, out)
    assert _snapshot(out) == before
  finally:
    _kill(proc)  # ... and dies: the kernel releases its lock.
  _predict(detector, images, out)


@pytest.mark.parametrize("case", ["missing", "empty", "unreadable"])
def test_failed_run_leaves_no_output_folder(tmp_path, detector, case):
  images = tmp_path / "images"
  if case != "missing":
    images.mkdir()
  if case == "unreadable":
    _folder(images, ["broken.png"])
  out = tmp_path / "new" / "out"
  with pytest.raises(ValueError, match="images"):
    _predict(detector, images, out)
  assert os.listdir(tmp_path) == ([] if case == "missing" else ["images"])
  predictions.check_output_dir(out)  # A check creates nothing either.
  assert not (tmp_path / "new").exists()


def test_unsupported_formats_are_listed_as_skipped(tmp_path, detector):
  images = _folder(tmp_path / "images", ["a.png"])
  _png(images / "sub" / "b.GIF", fmt="gif")
  (images / "photo.heic").write_bytes(b"\0" * 16)
  (images / "notes.txt").write_text("not an image: not listed")
  report = _predict(detector, images, tmp_path / "out")
  assert report.paths == ["a.png"]
  assert _rows(tmp_path / "out" / "skipped.csv") == [
      ["path", "reason"], ["photo.heic", "HEIC is not a supported format; convert it to PNG"],
      ["sub/b.GIF", "GIF is not a supported format; convert it to PNG"]]
  assert [s.relative for s in report.skipped] == ["photo.heic", "sub/b.GIF"]


def test_multi_frame_image_is_read_as_its_first_frame_with_a_warning(tmp_path, detector,
                                                                     caplog):
  images = tmp_path / "images"
  images.mkdir()
  frames = [PIL.Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)) for i in range(3)]
  frames[0].save(images / "m.tif", save_all=True, append_images=frames[1:])
  files = folder.list_images(images)
  with caplog.at_level("WARNING"):
    [(read, _)] = list(folder.read_chunks(files, 4))
  np.testing.assert_array_equal(read[0], np.asarray(frames[0]))
  assert "m.tif has 3 frames; only the first is used" in caplog.text
  report = _predict(detector, images, tmp_path / "out")
  assert report.paths == ["m.tif"]
