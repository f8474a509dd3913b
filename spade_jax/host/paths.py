"""Where spade_jax keeps downloaded weights and generated data on the host."""

from __future__ import annotations

import os
import pathlib

CACHE_ENV = "SPADE_JAX_CACHE"
OFFLINE_ENV = "SPADE_JAX_OFFLINE"


def cache_dir() -> pathlib.Path:
  """Returns the cache folder: $SPADE_JAX_CACHE, else ~/.cache/spade_jax (not created)."""
  env = os.environ.get(CACHE_ENV)
  if env:
    return pathlib.Path(env).expanduser()
  return pathlib.Path("~/.cache/spade_jax").expanduser()


def offline() -> bool:
  """True when $SPADE_JAX_OFFLINE is set to a true value: never touch the network."""
  return os.environ.get(OFFLINE_ENV, "").lower() in ("1", "true", "yes")
