"""Two processes on this machine (CPU, gloo, loopback) give the one-process results.

experiments/evaluate.py runs once as a single process and once as two processes
joined by jax.distributed (2 CPU devices each: the gallery is sharded over 4 devices,
2 per process, so shards live both within and across processes). Each of the two
reads half the images (p::2); process 0 writes results.json. 6 training images in
shares of 3 fill 2 devices per process as 2 + 1 rows, so padding sits inside the
gallery (end of process 0's block), not only at its end; 5 test images make uneven
shares (3 + 2). The metrics must agree to 1e-6: an image's features do not depend on
which process computed them and the sharded search returns the single-device
neighbours. The same holds for PatchCore, for SPADE with a kernel metric and on tiles
(METHODS).

One pair of processes (and one single process) evaluates every method in turn: each
process is a script server (tests/script_server.py) that runs evaluate.py's main() once
per method, as a fresh run would (flags parsed afresh), so the processes, their
jax.distributed start-up and backbone load are paid once, not once per method. The
first method's run joins the processes (jax.distributed.initialize); the others find
them joined (spade_jax.host.distributed.initialize).
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest
import script_server

from spade_jax import evaluation
from spade_jax.data import builtin

pytestmark = pytest.mark.slow  # Several processes: the slow tier (pyproject.toml).

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "evaluate.py"


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env() -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # Device counts come from --num_cpu_devices.
  return env


def _serve(runs: list[list[str]], requests: pathlib.Path) -> subprocess.Popen:
  """One process running evaluate.py's main() once per argument list of `runs`, in turn
  (a script server reading its requests from a file; tests/script_server.py)."""
  requests.write_text("".join(json.dumps({"args": args, "cwd": os.getcwd()}) + "\n"
                              for args in runs))
  with open(requests, encoding="utf-8") as stdin:
    return subprocess.Popen([sys.executable, "-u", script_server.__file__, str(SCRIPT)],
                            stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env())


def _replies(out: str) -> list[dict]:
  """The script server's replies: per run, its returncode, stdout and stderr."""
  return [json.loads(line[len(script_server.REPLY):]) for line in out.splitlines()
          if line.startswith(script_server.REPLY)]


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


@pytest.fixture(name="runs", scope="module")
def _runs(tmp_path_factory):
  """Every method evaluated by two processes and by one: the output folder root, and
  per process (0, 1, single) the per-method replies {method: (code, stderr)}."""
  root = tmp_path_factory.mktemp("multihost")
  data = builtin.generate_builtin_benchmark(root / "data", categories=["brick"],
                                            num_train=6, num_test=5)
  runs = {}
  for method, flags in METHODS.items():
    geometry = [] if "tiles" in method else ["--resize=96", "--crop=96"]
    runs[method] = [f"--data_dir={data}", "--categories=brick", *geometry,
                    "--num_heatmaps=1", "--batch_size=4", *flags]
    if method != "patchcore":
      runs[method] += ["--k_images=3", "--k_image_score=2"]
  port = _free_port()
  multi = [_serve([[*args, f"--output_dir={root / method / 'two'}",
                    f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                    f"--process_id={i}", "--num_cpu_devices=2"]
                   for method, args in runs.items()], root / f"requests_{i}.jsonl")
           for i in (0, 1)]
  single = _serve([[*args, f"--output_dir={root / method / 'one'}"]
                   for method, args in runs.items()], root / "requests_single.jsonl")
  processes = []
  # 240 s per method, as each method had in a pair of its own.
  for code, out, err in _finish([*multi, single], timeout=240 * len(METHODS)):
    replies = _replies(out)
    assert code == 0 and len(replies) == len(METHODS), err[-3000:]
    processes.append({m: (r["returncode"], r["stderr"]) for m, r in zip(METHODS, replies)})
  return root, processes


@pytest.mark.parametrize("method", list(METHODS))
def test_two_processes_match_one(runs, method):
  root, processes = runs
  for process in processes:  # Process 0, process 1, the single process.
    code, err = process[method]
    assert code == 0, err[-3000:]
  one = json.loads((root / method / "one" / "results.json").read_text())
  two = json.loads((root / method / "two" / "results.json").read_text())
  assert one["config"] == two["config"]
  a, b = one["categories"]["brick"], two["categories"]["brick"]
  assert (a["n_train"], a["n_test"]) == (b["n_train"], b["n_test"]) == (6, 5)
  for metric in evaluation.METRIC_NAMES:
    assert b[metric] == pytest.approx(a[metric], abs=1e-6), metric
    assert two["mean"][metric] == pytest.approx(one["mean"][metric], abs=1e-6)
  assert len(list((root / method / "two" / "heatmaps" / "brick").glob("*.png"))) == 1


def test_script_rejects_inconsistent_process_flags(tmp_path):
  """Refused before any process starts (in a script server: no process is the point)."""
  for flags, match in ((["--num_processes=2", "--process_id=2",
                         "--coordinator_address=127.0.0.1:1"], "process_id=2"),
                       (["--coordinator_address=127.0.0.1:1"], "without num_processes")):
    proc = script_server.run_script("evaluate.py", *flags, f"--output_dir={tmp_path}",
                                    env=_env(), timeout=120)
    assert proc.returncode != 0 and match in proc.stderr, proc.stderr[-2000:]
  assert not (tmp_path / "results.json").exists()
