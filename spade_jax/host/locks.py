"""Exclusive locks on a lock file, for runs that share a folder: fcntl.flock.

  with locks.exclusive(folder / ".run.lock"):                  # waits for the holder
  with locks.exclusive(folder / ".run.lock", blocking=False):  # LockHeld if held

The kernel releases a flock when the holder's file is closed, which includes the
holder dying (SIGKILL, a crash): a lock of a dead process never blocks anyone. The
holder writes its pid into the file, so a refused caller can say who holds it.

The lock file is never removed: a run that removed it could let a second run lock a
new file of that name while a third still holds the removed one.

Without fcntl (Windows) nothing is locked.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import errno
import os
import pathlib

try:
  import fcntl
except ImportError:  # Not POSIX: nothing is locked.
  fcntl = None

PathLike = str | os.PathLike


class LockHeld(Exception):
  """Another process (or another open file of this one) holds the lock.

  Attributes:
    path: the lock file.
    pid: the pid the holder wrote into it, or None (unknown: it has not written it yet).
  """

  def __init__(self, path: pathlib.Path, pid: int | None):
    self.path, self.pid = path, pid
    super().__init__(f"{str(path)!r} is locked by {holder_text(pid)}")


def holder_text(pid: int | None) -> str:
  """'pid 123', or 'pid unknown'."""
  return f"pid {pid}" if pid is not None else "pid unknown"


def _recorded_pid(fd: int) -> int | None:
  try:
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
  except OSError:
    return None
  return int(text) if text.isdigit() else None


def _try_lock(fd: int, path: pathlib.Path, blocking: bool) -> None:
  flags = fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB)
  try:
    fcntl.flock(fd, flags)
  except OSError as e:
    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      raise LockHeld(path, _recorded_pid(fd)) from None
    raise


@contextlib.contextmanager
def exclusive(path: PathLike, *, blocking: bool = True) -> Iterator[pathlib.Path]:
  """Holds an exclusive lock on `path` (created if needed) for the block.

  The holder's pid replaces the file's content. Closing the file (the end of the
  block, or the end of the process) releases the lock.

  Raises:
    LockHeld: blocking=False and someone else holds it.
    OSError: the lock file cannot be created or opened.
  """
  path = pathlib.Path(path)
  if fcntl is None:
    yield path
    return
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
  try:
    _try_lock(fd, path, blocking)
    try:  # Only for messages: a failure here must not fail the run.
      os.ftruncate(fd, 0)
      os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    except OSError:
      pass
    yield path
  finally:
    os.close(fd)  # Releases the lock.


def check_free(path: PathLike) -> None:
  """Raises LockHeld if someone holds the lock on `path` now (no file: free).

  Only a snapshot, for checks before any work: the lock may be taken right after.
  Does not create the file.
  """
  path = pathlib.Path(path)
  if fcntl is None:
    return
  try:
    fd = os.open(path, os.O_RDWR)
  except OSError:  # No file: free. Not openable: exclusive() will say so.
    return
  try:
    _try_lock(fd, path, blocking=False)
  finally:
    os.close(fd)
