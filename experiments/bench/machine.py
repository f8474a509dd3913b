"""The machine a report was measured on: device, versions, CPU, load, library digest."""

from __future__ import annotations

import datetime
import hashlib
import os
import pathlib
import platform
import subprocess
from typing import Any

import jax
import numpy as np

from . import REPO_ROOT, common


def machine_info() -> dict[str, Any]:
  """Device kind, versions, CPU count, load: the header of every report."""
  import jaxlib  # pylint: disable=import-outside-toplevel
  dev = jax.devices()[0]
  return {
      "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "platform": dev.platform, "device_kind": dev.device_kind,
      "device_count": jax.device_count(), "jax": jax.__version__,
      "jaxlib": jaxlib.__version__, "numpy": np.__version__,
      "python": platform.python_version(), "cpu_count": os.cpu_count(),
      "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
      "cpu_model": _cpu_model(), "load_avg": list(os.getloadavg()),
      "git_head": _git_head(), "library_sha256": _library_digest(),
      "env": {name: os.environ.get(name) for name in
              ("XLA_FLAGS", "JAX_PLATFORMS", *common.BLAS_ENV_UNSET, "OMP_NUM_THREADS",
               "OPENBLAS_NUM_THREADS")},
  }


def _git_head() -> str | None:
  """The checkout's short HEAD, or None outside git."""
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                          capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


def _library_digest() -> str:
  """sha256 (12 hex) of spade_jax/**/*.py and *.cc as measured (the tree may be
  uncommitted)."""
  digest = hashlib.sha256()
  root = REPO_ROOT / "spade_jax"
  for path in sorted([*root.rglob("*.py"), *root.rglob("*.cc")]):
    digest.update(path.read_bytes())
  return digest.hexdigest()[:12]


def _cpu_model() -> str | None:
  """/proc/cpuinfo's model name, else platform.processor()."""
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or None
