"""Atomic file writes: a file appears complete under its final name, or not at all.

Everything spade_jax writes that a later run reads back (converted weights, indexes,
results.json, heatmaps, downloads) goes through here: written to a temporary file in
the destination's folder, fsynced, given the permissions a plain open() would give,
then renamed with os.replace (atomic on one filesystem). An exception, including
KeyboardInterrupt, removes the temporary file and leaves any old file intact.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
from collections.abc import Iterator

PathLike = str | os.PathLike


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

  Usage:
    with atomic_path(dest) as tmp:
      write(tmp)
  """
  path = pathlib.Path(path)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
  os.close(fd)
  try:
    yield pathlib.Path(tmp)
    publish(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
