"""experiments/kernels.py end to end on a tiny built-in benchmark: every variant's
results.json in evaluate.py's layout, the comparison table, resume, bad flags; and the
named variants of spade_jax.scoring.variants."""

import json
import pathlib

import numpy as np
import pytest
import script_server

import spade_jax
from spade_jax import evaluation
from spade_jax.data import builtin
from spade_jax.scoring import variants

pytestmark = pytest.mark.slow  # Scripts end to end: the slow tier (pyproject.toml).

REPO = pathlib.Path(__file__).resolve().parents[1]
FLAGS = ["--k_images=4", "--k_image_score=2", "--resize=128", "--crop=112", "--steps=3"]


@pytest.fixture(scope="module")
def tiny_benchmark(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp("kernels_bench") / "data"
  return builtin.generate_builtin_benchmark(root, categories=["cup"], num_train=8,
                                            num_test=9)


def _run(*args):
  return script_server.run_script("kernels.py", *args, cwd=str(REPO), timeout=900)


def test_script_writes_each_variant_and_the_comparison(tiny_benchmark, tmp_path):
  out = tmp_path / "out"
  proc = _run(f"--data_dir={tiny_benchmark}", f"--output_dir={out}",
              "--variants=l2,learned,softmin", "--objective=synthetic", *FLAGS)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in ("l2", "learned", "softmin"):
    results = json.loads((out / name / "results.json").read_text())
    assert set(results) == {"config", "categories", "mean"}
    entry = results["categories"]["cup"]
    assert {"image_auroc", "pixel_auroc", "au_pro", "n_train", "n_test", "seconds",
            "stage_seconds"} == set(entry)
    assert tuple(entry["stage_seconds"]) == evaluation.STAGE_NAMES
    assert entry["n_train"] == 8 and entry["n_test"] == 9
    assert results["config"]["variant"] == name and results["config"]["k_images"] == 4
    for m in evaluation.METRIC_NAMES:
      assert 0 <= entry[m] <= 1 and results["mean"][m] == entry[m]
  assert json.loads((out / "learned" / "results.json").read_text())["config"][
      "objective"] == "synthetic"
  table = (out / "comparison.md").read_text()
  assert "| learned |" in table and "| softmin |" in table
  # A rerun resumes: nothing left to do.
  again = _run(f"--data_dir={tiny_benchmark}", f"--output_dir={out}",
               "--variants=l2,learned,softmin", "--objective=synthetic", *FLAGS)
  assert again.returncode == 0 and "every variant done" in again.stderr


def test_script_refuses_bad_flags(tiny_benchmark, tmp_path):
  proc = _run(f"--data_dir={tiny_benchmark}", f"--output_dir={tmp_path}", "--variants=nope")
  assert proc.returncode != 0 and "unknown --variants ['nope']" in proc.stderr
  proc = _run(f"--data_dir={tiny_benchmark}", f"--output_dir={tmp_path}", "--k_images=50")
  assert proc.returncode != 0 and "k_images=50" in proc.stderr
  proc = _run(f"--data_dir={tiny_benchmark}", f"--output_dir={tmp_path}", "--crop=whole")
  assert proc.returncode != 0 and "--crop must be a positive int or 'none'" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_script_accepts_crop_none(tiny_benchmark, tmp_path):
  """--crop=none as evaluate.py: the whole image at the first training image's size, the
  masks resized to it; results.json records crop null. (--resize=112: the images then
  have FLAGS' crop size, so the script server reuses the programs the first test
  compiled, about 2 s instead of 15.)"""
  out = tmp_path / "out"
  proc = _run(f"--data_dir={tiny_benchmark}", f"--output_dir={out}", "--variants=l2",
              "--k_images=4", "--k_image_score=2", "--resize=112", "--crop=none")
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((out / "l2" / "results.json").read_text())
  assert results["config"]["crop"] is None
  for m in evaluation.METRIC_NAMES:
    assert 0 <= results["categories"]["cup"][m] <= 1


@pytest.mark.parametrize("name", sorted(variants.VARIANTS))
def test_every_variant_fits_and_scores(name):
  rng = np.random.default_rng(0)
  pool = rng.standard_normal((12, 6)).astype(np.float32)
  levels = {"a": rng.standard_normal((12, 3, 3, 4)).astype(np.float32)}
  fitted = variants.fit_variant(name, pool, levels, steps=2)
  scores, nbrs = spade_jax.image_scores(pool[:3], pool, 2, num_neighbors=4,
                                        **fitted.image_kwargs())
  maps = spade_jax.pixel_scores({"a": levels["a"][:3]}, levels, nbrs, kappa=2,
                                **fitted.pixel_kwargs())
  assert np.isfinite(np.asarray(scores)).all() and np.asarray(maps).shape == (3, 3, 3)
  assert (fitted.aggregate == "mean") == (fitted.pool_bandwidth is None)
  with pytest.raises(ValueError, match="unknown variant"):
    variants.fit_variant("nope", pool, levels)
