"""Atomic file writes: a file appears complete under its final name, or not at all.

Everything spade_jax writes that a later run reads back (converted weights, indexes,
results.json, heatmaps, downloads) goes through here: written to a temporary file in
the destination's folder, fsynced, given the permissions a plain open() would give,
then renamed with os.replace (atomic on one filesystem). An exception, including
KeyboardInterrupt, removes the temporary file and leaves any old file intact.

A killed writer (SIGKILL, SIGTERM, power loss) runs no cleanup, so its temporary file
stays. Temporary files are therefore named after their destination and their writer,

  .<name>.spade-tmp.<host tag>.<pid>.<random><suffix>

(the host tag is a hash of the host name and pid namespace), and every new write to a
destination first removes that destination's temporary files whose writer ran on this
host and is no longer alive. A live writer's file, or one from another host (a shared
folder), is never touched. Temporary folders (new_temp_dir: work built in place, then
moved, as predict.py's runs) are named the same way; stale_temps(path, folders=True)
lists those of dead writers for their owner to clean up.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import functools
import hashlib
import os
import pathlib
import re
import socket
import tempfile

PathLike = str | os.PathLike

# Marks a temporary file of this module: ".<name>" + TEMP_MARK + "<tag>.<pid>.<random>".
TEMP_MARK = ".spade-tmp."


@functools.cache
def _host_tag() -> str:
  """8 hex digits naming this host and pid namespace (pids mean nothing elsewhere)."""
  try:
    namespace = str(os.stat("/proc/self/ns/pid").st_ino)
  except OSError:
    namespace = ""
  return hashlib.sha256(f"{socket.gethostname()}\0{namespace}".encode()).hexdigest()[:8]


def _temp_pattern(name: str) -> re.Pattern[str]:
  return re.compile(re.escape(f".{name}{TEMP_MARK}") +
                    r"([0-9a-f]{8})\.([1-9][0-9]{0,9})\.[a-z0-9_]{8}(?!.*spade-tmp)(.*)",
                    re.DOTALL)


def temp_owner(tmp: PathLike, dest: PathLike) -> tuple[str, int] | None:
  """(host tag, pid) of the writer of `tmp`, a temporary file of `dest`; else None."""
  if pathlib.Path(tmp).parent != pathlib.Path(dest).parent:
    return None
  match = _temp_pattern(pathlib.Path(dest).name).fullmatch(pathlib.Path(tmp).name)
  return None if match is None else (match.group(1), int(match.group(2)))


def _is_alive(pid: int) -> bool:
  """Whether process `pid` of this host may still write (a zombie cannot)."""
  if pid == os.getpid():
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:  # PermissionError: it exists, under another user.
    return True
  try:  # Linux: a killed child nobody has reaped yet still answers os.kill.
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
  except OSError:
    return True
  fields = stat.rsplit(")", 1)[-1].split()
  return not (fields and fields[0] in ("Z", "X"))


def stale_temps(path: PathLike, *, folders: bool = False,
                include_own: bool = False) -> list[pathlib.Path]:
  """The temporary files (or folders) of destination `path` left by dead writers.

  Only entries named as this module names temporaries for `path` and written on this
  host by a process that no longer runs; with include_own, also this process's own
  (for a caller that knows none of them is in use, e.g. under a lock).

  Args:
    path: the destination.
    folders: list temporary folders (new_temp_dir) instead of regular files.
    include_own: also list those of this process.

  Returns:
    Sorted paths; [] if the folder cannot be read.
  """
  path = pathlib.Path(path)
  folder = path.parent
  prefix = f".{path.name}{TEMP_MARK}"
  pattern = _temp_pattern(path.name)
  found = []
  try:
    entries = [e for e in os.scandir(folder) if e.name.startswith(prefix)]
  except OSError:
    return found
  for entry in entries:
    match = pattern.fullmatch(entry.name)
    if match is None or match.group(1) != _host_tag():
      continue
    pid = int(match.group(2))
    if (pid == os.getpid() and not include_own) or (pid != os.getpid() and _is_alive(pid)):
      continue
    try:
      kind_ok = (entry.is_dir(follow_symlinks=False) if folders
                 else entry.is_file(follow_symlinks=False))
    except OSError:
      continue
    if kind_ok:
      found.append(folder / entry.name)
  return sorted(found)


def remove_stale_temps(path: PathLike) -> list[pathlib.Path]:
  """Removes the temporary files of destination `path` left by dead writers.

  Only regular files named as this module names temporaries for `path`, written on
  this host by a process that no longer runs, are removed. Errors (a file another
  process removed first, no permission) are ignored: cleanup never fails a write.

  Returns:
    The removed files.
  """
  removed = []
  for stale in stale_temps(path):
    try:
      os.unlink(stale)
    except OSError:
      continue
    removed.append(stale)
  return removed


def new_temp(path: PathLike, suffix: str = ".tmp") -> pathlib.Path:
  """Creates an empty temporary file for destination `path`, in its folder.

  Stale temporaries of `path` (remove_stale_temps) are removed first. The file is
  named after `path` and this process (see the module docstring); the caller owns
  it: publish it to `path`, or unlink it.
  """
  path = pathlib.Path(path)
  if TEMP_MARK.strip(".") in suffix:
    raise ValueError(f"suffix {suffix!r} must not contain {TEMP_MARK!r}")
  remove_stale_temps(path)
  fd, tmp = tempfile.mkstemp(
      dir=path.parent, prefix=f".{path.name}{TEMP_MARK}{_host_tag()}.{os.getpid()}.",
      suffix=suffix)
  os.close(fd)
  return pathlib.Path(tmp)


def new_temp_dir(path: PathLike) -> pathlib.Path:
  """Creates an empty temporary folder for destination `path`, in its folder.

  Named like new_temp's files (no suffix), so stale_temps(path, folders=True) finds
  it once its writer is dead. Nothing is removed here: the caller decides what to do
  with stale folders (they may hold finished work). The caller owns the folder.
  """
  path = pathlib.Path(path)
  return pathlib.Path(tempfile.mkdtemp(
      dir=path.parent, prefix=f".{path.name}{TEMP_MARK}{_host_tag()}.{os.getpid()}."))


def publish(tmp: PathLike, dest: PathLike) -> None:
  """fsyncs a finished temp file, gives it the usual permissions, renames it to `dest`.

  mkstemp creates files readable by the owner only; the final file should get what
  a plain open() would give (0o666 minus the umask).
  """
  with open(tmp, "rb+") as f:
    os.fsync(f.fileno())
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o666 & ~umask)
  os.replace(tmp, dest)


@contextlib.contextmanager
def atomic_path(path: PathLike, suffix: str = ".tmp") -> Iterator[pathlib.Path]:
  """Yields a temporary path next to `path`; publishes it to `path` when the block ends.

  Temporary files of `path` left by killed writers are removed first (see
  remove_stale_temps).

  Usage:
    with atomic_path(dest) as tmp:
      write(tmp)
  """
  path = pathlib.Path(path)
  tmp = new_temp(path, suffix)
  try:
    yield tmp
    publish(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
