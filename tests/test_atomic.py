"""spade_jax.host.atomic: temp files carry their writer's pid; stale ones are removed."""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import spade_jax
from spade_jax.host import atomic

REPO = pathlib.Path(__file__).resolve().parent.parent


def _dead_pid() -> int:
  """The pid of a process that has finished (and been reaped)."""
  proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        check=True, capture_output=True, text=True)
  pid = int(proc.stdout)
  with pytest.raises(ProcessLookupError):  # Not reused already (would be a fluke).
    os.kill(pid, 0)
  return pid


def _temp(dest: pathlib.Path, pid: int, tag: str | None = None, suffix=".tmp"
          ) -> pathlib.Path:
  """A temp file as atomic_path names it, owned by `pid` (on this host by default)."""
  tag = atomic._host_tag() if tag is None else tag  # pylint: disable=protected-access
  path = dest.parent / f".{dest.name}{atomic.TEMP_MARK}{tag}.{pid}.abc123xy{suffix}"
  path.write_bytes(b"half written")
  return path


def test_temp_name_is_recognisable_and_carries_pid(tmp_path):
  dest = tmp_path / "out.bin"
  with atomic.atomic_path(dest) as tmp:
    assert tmp.parent == tmp_path
    assert tmp.name.startswith(f".out.bin{atomic.TEMP_MARK}")
    owner = atomic.temp_owner(tmp, dest)
    assert owner == (atomic._host_tag(), os.getpid())  # pylint: disable=protected-access
    assert tmp.name.endswith(".tmp")
    tmp.write_bytes(b"data")
  assert dest.read_bytes() == b"data"
  assert os.listdir(tmp_path) == ["out.bin"]


def test_publishes_with_umask_permissions(tmp_path):
  dest = tmp_path / "out.bin"
  with atomic.atomic_path(dest) as tmp:
    tmp.write_bytes(b"x")
  umask = os.umask(0)
  os.umask(umask)
  assert dest.stat().st_mode & 0o777 == 0o666 & ~umask


def test_exception_removes_temp_and_keeps_old_file(tmp_path):
  dest = tmp_path / "out.bin"
  dest.write_bytes(b"old")
  with pytest.raises(KeyboardInterrupt):
    with atomic.atomic_path(dest) as tmp:
      tmp.write_bytes(b"new, half")
      raise KeyboardInterrupt
  assert dest.read_bytes() == b"old"
  assert os.listdir(tmp_path) == ["out.bin"]


def test_stale_temps_of_dead_writers_are_removed(tmp_path):
  dest = tmp_path / "idx.spade"
  dead = _dead_pid()
  stale = _temp(dest, dead)
  stale_other_suffix = _temp(dest, dead, suffix=".part")
  live = _temp(dest, os.getpid())  # E.g. another thread of this process writing.
  other_host = _temp(dest, dead, tag="0badc0de")  # Its pid means nothing here.
  other_dest = _temp(tmp_path / "other.spade", dead)  # Not this destination.
  unrelated = tmp_path / ".idx.spade.notes"
  unrelated.write_text("mine")
  with atomic.atomic_path(dest) as tmp:
    tmp.write_bytes(b"fresh")
  assert not stale.exists() and not stale_other_suffix.exists()
  for kept in (live, other_host, other_dest, unrelated):
    assert kept.exists(), kept
  assert dest.read_bytes() == b"fresh"


def test_temp_of_live_other_process_is_kept(tmp_path):
  dest = tmp_path / "idx.spade"
  proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    live = _temp(dest, proc.pid)
    with atomic.atomic_path(dest) as tmp:
      tmp.write_bytes(b"fresh")
    assert live.exists()
  finally:
    proc.kill()
    proc.wait()
  with atomic.atomic_path(dest) as tmp:  # Now its writer is gone.
    tmp.write_bytes(b"again")
  assert not live.exists()


def test_remove_stale_temps_reports_what_it_removed(tmp_path):
  dest = tmp_path / "idx.spade"
  stale = _temp(dest, _dead_pid())
  _temp(dest, os.getpid())
  assert atomic.remove_stale_temps(dest) == [stale]
  assert atomic.remove_stale_temps(dest) == []
  assert atomic.temp_owner(stale, tmp_path / "other") is None
  assert atomic.temp_owner(dest, dest) is None


_SLOW_WRITER = textwrap.dedent("""
    import sys, time
    from spade_jax.host import atomic
    with atomic.atomic_path(sys.argv[1]) as tmp:
      with open(tmp, "wb") as f:
        f.write(b"x" * 100000)
        f.flush()
        print(tmp, flush=True)
        time.sleep(60)
""")


@pytest.mark.parametrize("reap", [True, False])
def test_kill_9_mid_write_leaves_a_temp_the_next_write_removes(tmp_path, reap):
  dest = tmp_path / "idx.spade"
  dest.write_bytes(b"old")
  env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
  proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(dest)],
                          stdout=subprocess.PIPE, text=True, env=env)
  try:
    tmp = pathlib.Path(proc.stdout.readline().strip())
    assert tmp.exists() and tmp.stat().st_size == 100000
    assert atomic.remove_stale_temps(dest) == []  # Its writer is alive: kept.
    proc.send_signal(signal.SIGKILL)
    if reap:
      proc.wait()
    else:  # A zombie until its parent reaps it: it cannot write any more.
      while not _is_zombie(proc.pid):
        pass
    assert tmp.exists()  # SIGKILL runs no cleanup ...
    assert dest.read_bytes() == b"old"
    with atomic.atomic_path(dest) as new:  # ... the next write to `dest` does.
      new.write_bytes(b"new")
    assert not tmp.exists()
    assert os.listdir(tmp_path) == ["idx.spade"] and dest.read_bytes() == b"new"
  finally:
    proc.kill()
    proc.wait()
    proc.stdout.close()


def _is_zombie(pid):
  try:
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
  except OSError:
    pytest.skip("no /proc")
  return stat.rsplit(")", 1)[1].split()[0] == "Z"


def test_save_index_removes_stale_temps_of_killed_saves(tmp_path):
  rng = np.random.default_rng(0)
  from spade_fake_backbone import FakeBackbone  # pylint: disable=import-outside-toplevel
  spade = spade_jax.Spade(FakeBackbone(), spade_jax.SpadeConfig(
      k_images=2, k_image_score=2, layers=("layer1",)))
  index = spade.fit_features(rng.normal(size=(3, 4)).astype(np.float32),
                             {"layer1": rng.normal(size=(3, 2, 2, 5)).astype(np.float32)})
  dest = tmp_path / "idx.spade"
  stale = [_temp(dest, _dead_pid()) for _ in range(3)]
  spade_jax.save_index(dest, index)
  assert not any(p.exists() for p in stale)
  assert os.listdir(tmp_path) == ["idx.spade"]
  spade_jax.load_index(dest, expect=spade)


def test_unremovable_stale_temp_does_not_fail_the_write(tmp_path):
  dest = tmp_path / "out.bin"
  stale = _temp(dest, _dead_pid())
  stale.unlink()
  stale.mkdir()  # Something the cleanup cannot (or must not) unlink.
  (stale / "inside").write_text("x")
  with atomic.atomic_path(dest) as tmp:
    tmp.write_bytes(b"ok")
  assert dest.read_bytes() == b"ok" and stale.is_dir()
