"""Two processes on this machine (CPU, gloo, loopback) give the one-process results.

experiments/evaluate.py runs once as a single process and once as two processes
joined by jax.distributed (2 CPU devices each: the gallery is sharded over 4 devices,
2 per process, so shards live both within and across processes). Each of the two
reads half the images (p::2); process 0 writes results.json. 6 training images in
shares of 3 fill 2 devices per process as 2 + 1 rows, so padding sits inside the
gallery (end of process 0's block), not only at its end; 5 test images make uneven
shares (3 + 2). The metrics must agree to 1e-6: an image's features do not depend on
which process computed them and the sharded search returns the single-device
neighbours. The same holds for PatchCore and for SPADE with a kernel metric (METHODS).
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

from spade_jax import evaluation
from spade_jax.data import builtin

pytestmark = pytest.mark.slow  # Several processes: the slow tier (pyproject.toml).

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "evaluate.py"


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(*args: str) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # Device counts come from --num_cpu_devices.
  return subprocess.Popen([sys.executable, str(SCRIPT), *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env)


def _finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str, str]]:
  outs = []
  try:
    for proc in procs:
      out, err = proc.communicate(timeout=timeout)
      outs.append((proc.returncode, out, err))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  return outs


# SPADE as published; PatchCore (its coreset selected over the 4 devices of 2 processes,
# its memory bank sharded); SPADE with a Mahalanobis kernel and soft scores (the kernels
# fitted on the gathered training features, replicated on the mesh); SPADE on tiles
# (each process tiles its share of the 256 x 256 images, 9 tiles each; the gallery is
# every process's tiles, the maps stitched at the masks' resolution).
METHODS = {"spade": [], "patchcore": ["--method=patchcore", "--coreset_ratio=0.25"],
           "mahalanobis-softmin": ["--metric=mahalanobis", "--aggregate=softmin"],
           "spade-tiles": ["--crop=none", "--tile_size=128", "--tile_overlap=32"]}


@pytest.mark.parametrize("method", list(METHODS))
def test_two_processes_match_one(tmp_path, method):
  data = builtin.generate_builtin_benchmark(tmp_path / "data", categories=["brick"],
                                            num_train=6, num_test=5)
  geometry = [] if "tiles" in method else ["--resize=96", "--crop=96"]
  common = [f"--data_dir={data}", "--categories=brick", *geometry,
            "--num_heatmaps=1", "--batch_size=4", *METHODS[method]]
  if method != "patchcore":
    common += ["--k_images=3", "--k_image_score=2"]
  port = _free_port()
  multi = [_start(*common, f"--output_dir={tmp_path / 'two'}",
                  f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                  f"--process_id={i}", "--num_cpu_devices=2") for i in (0, 1)]
  single = _start(*common, f"--output_dir={tmp_path / 'one'}")
  for code, _, err in _finish([*multi, single], timeout=240):
    assert code == 0, err[-3000:]
  one = json.loads((tmp_path / "one" / "results.json").read_text())
  two = json.loads((tmp_path / "two" / "results.json").read_text())
  assert one["config"] == two["config"]
  a, b = one["categories"]["brick"], two["categories"]["brick"]
  assert (a["n_train"], a["n_test"]) == (b["n_train"], b["n_test"]) == (6, 5)
  for metric in evaluation.METRIC_NAMES:
    assert b[metric] == pytest.approx(a[metric], abs=1e-6), metric
    assert two["mean"][metric] == pytest.approx(one["mean"][metric], abs=1e-6)
  assert len(list((tmp_path / "two" / "heatmaps" / "brick").glob("*.png"))) == 1


def test_script_rejects_inconsistent_process_flags(tmp_path):
  for flags, match in ((["--num_processes=2", "--process_id=2",
                         "--coordinator_address=127.0.0.1:1"], "process_id=2"),
                       (["--coordinator_address=127.0.0.1:1"], "without num_processes")):
    proc = _start(*flags, f"--output_dir={tmp_path}")
    (code, _, err), = _finish([proc], timeout=120)
    assert code != 0 and match in err, err[-2000:]
  assert not (tmp_path / "results.json").exists()
