"""The performance suite behind experiments/benchmark.py, one module per section.

  backbone   images/s of a backbone's forward pass
  knn        spade_jax.knn GFLOP/s against NumPy's and jnp.dot's matmul rate
  pixel      seconds per test image of pixel scoring + anomaly maps
  scaling    weak scaling of knn on a sharded gallery over fake CPU devices
  memory     scoring working set (peak RSS - RSS with inputs) as the gallery grows
  precision  bfloat16 distances and lax.approx_min_k: speed and accuracy vs exact search
  pipeline   end to end: images/s of fit and score per method; predict.py with a cold
             and a warm compilation cache

`suite` runs the sections and renders their Markdown; `common` holds the timing,
input, reporting and subprocess helpers they share; `machine` describes the machine;
`worker` is the entry point of the sections' subprocesses. Importing the package puts
the repository root on sys.path, so a checkout runs without `pip install -e`.
"""

import pathlib
import sys

EXPERIMENTS_DIR = pathlib.Path(__file__).resolve().parent.parent
REPO_ROOT = EXPERIMENTS_DIR.parent
if str(REPO_ROOT) not in sys.path:  # Run from a checkout without `pip install -e`.
  sys.path.insert(0, str(REPO_ROOT))
