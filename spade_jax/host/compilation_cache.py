"""JAX's persistent compilation cache, set up the same way by every script.

A script run compiles every jitted program it calls (backbone, search, maps) before
its first result; with the cache, a later run with the same shapes, devices and
versions loads them from disk instead (jax.readthedocs.io: persistent compilation
cache). The default folder is $SPADE_JAX_COMPILATION_CACHE when that is set (a
folder, or 'none' for no cache), else <cache_dir()>/jax_compilation_cache, i.e.
$SPADE_JAX_CACHE/jax_compilation_cache (~/.cache/spade_jax/jax_compilation_cache).

Every program is cached, however small and quick to compile: JAX's defaults skip
programs compiled in under a second, which is most of a CPU run.

The cache is trusted code: whoever can write to its folder can make a JAX process
that uses it run anything. Keep it in a folder only you can write to.
"""

from __future__ import annotations

import logging as std_logging
import os
import pathlib
import tempfile

from absl import logging

from spade_jax.host import paths

CACHE_SUBDIR = "jax_compilation_cache"
CACHE_ENV = "SPADE_JAX_COMPILATION_CACHE"  # Overrides the default folder; 'none': off.
OFF = ("", "none")  # Values that turn the cache off (case-insensitive).
_FIX = ("choose another folder (--compilation_cache_dir=DIR) or run without the cache "
        "(--compilation_cache_dir=none)")


def default_dir() -> pathlib.Path:
  """<cache_dir()>/jax_compilation_cache (not created)."""
  return paths.cache_dir() / CACHE_SUBDIR


def resolve(value: str | os.PathLike[str] | None) -> pathlib.Path | None:
  """The cache folder a setting names: '' or 'none' -> None (off); None -> the default:
  $SPADE_JAX_COMPILATION_CACHE if set (read the same way), else default_dir()."""
  if value is None:
    value = os.environ.get(CACHE_ENV)
    if value is None:
      return default_dir()
  text = os.fspath(value)
  if text.strip().lower() in OFF:
    return None
  return pathlib.Path(text).expanduser()


def _check_folder(folder: pathlib.Path) -> None:
  """Creates `folder` and writes (and removes) a file in it; ValueError naming it if not."""
  if folder.exists() and not folder.is_dir():
    raise ValueError(f"compilation cache folder {str(folder)!r} is a file; {_FIX}")
  try:
    folder.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".write_test.")
    os.close(fd)
    os.unlink(probe)
  except OSError as e:
    raise ValueError(f"cannot use compilation cache folder {str(folder)!r} "
                     f"({e.strerror or e}); {_FIX}") from e


def _reset() -> None:
  """JAX's compilation_cache.reset_cache(), without its log line ("Resetting cache")."""
  from jax.experimental.compilation_cache import (
    compilation_cache,  # pylint: disable=import-outside-toplevel
  )
  logger = std_logging.getLogger("jax._src.compilation_cache")
  level = logger.level
  logger.setLevel(std_logging.WARNING)
  try:
    compilation_cache.reset_cache()
  finally:
    logger.setLevel(level)


def disable() -> None:
  """Turns the persistent compilation cache off for this process."""
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_enable_compilation_cache", False)
  jax.config.update("jax_compilation_cache_dir", None)
  _reset()


def enable(value: str | os.PathLike[str] | None = None) -> pathlib.Path | None:
  """Turns on JAX's persistent compilation cache in the folder `value` names.

  Call it before the first jitted call of the process (programs already compiled in
  this process are not written). A folder named by `value` or $SPADE_JAX_COMPILATION_CACHE
  that cannot be used is an error; default_dir() falls back to no cache, with a
  warning (a read-only home must not stop a run).

  Args:
    value: a folder; '' or 'none': no cache (see disable()); None: the default (see
      resolve()).

  Returns:
    The folder in use, or None when the cache is off.

  Raises:
    ValueError: `value` names a folder that cannot be created or written to.
  """
  import jax  # pylint: disable=import-outside-toplevel
  folder = resolve(value)
  if folder is None:
    disable()
    return None
  try:
    _check_folder(folder)
  except ValueError as e:
    if value is not None or os.environ.get(CACHE_ENV) is not None:
      raise
    logging.warning("running without the compilation cache: %s", e)
    disable()
    return None
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", str(folder))
  # Cache every program: JAX's defaults skip those compiled in under 1 s and, on some
  # file systems, small ones; on CPU that is nearly all of them.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  _reset()  # Takes the new folder even if JAX looked before.
  return folder


def cache_entries(folder: str | os.PathLike[str]) -> list[pathlib.Path]:
  """The compiled programs stored in a cache folder (JAX names them '<key>-cache')."""
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    return []
  return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith("-cache"))
