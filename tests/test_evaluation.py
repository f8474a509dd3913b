"""End-to-end evaluation: results.json contract, resume, atomic writes, the script's flags."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import script_server

from spade_jax import evaluation
from spade_jax.data import builtin

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_benchmark(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp("bench") / "data"
  return builtin.generate_builtin_benchmark(root, categories=["brick", "cup"], num_train=8,
                                            num_test=9)


def _config(data_dir, **overrides) -> evaluation.EvalConfig:
  kwargs = dict(data_dir=str(data_dir), backbone="efficientnet_lite0", weights="imagenet",
                k_images=4, k_image_score=2, resize=128, crop=112)
  kwargs.update(overrides)
  return evaluation.EvalConfig(**kwargs)


def _check_contract(results: dict, categories: list[str]) -> None:
  assert set(results) == {"config", "categories", "mean"}
  assert sorted(results["categories"]) == sorted(categories)
  for entry in results["categories"].values():
    assert set(entry) == {"image_auroc", "pixel_auroc", "au_pro", "n_train", "n_test", "seconds",
                          "stage_seconds"}
    # The seconds of each stage, parts of the category's "seconds".
    assert tuple(entry["stage_seconds"]) == evaluation.STAGE_NAMES
    assert all(v >= 0 for v in entry["stage_seconds"].values())
    assert sum(entry["stage_seconds"].values()) <= entry["seconds"]
    for m in evaluation.METRIC_NAMES:
      assert 0.0 <= entry[m] <= 1.0
    assert isinstance(entry["n_train"], int) and isinstance(entry["n_test"], int)
  for m in evaluation.METRIC_NAMES:
    expected = np.mean([c[m] for c in results["categories"].values()])
    assert results["mean"][m] == pytest.approx(expected)


def test_evaluate_writes_contract_and_heatmaps(tiny_benchmark, tmp_path):
  out = tmp_path / "out"
  results = evaluation.evaluate(_config(tiny_benchmark), output_dir=out, num_heatmaps=2,
                                log=lambda _: None)
  on_disk = json.loads((out / "results.json").read_text())
  assert on_disk == results
  _check_contract(results, ["brick", "cup"])
  assert results["categories"]["brick"]["n_train"] == 8
  assert results["categories"]["brick"]["n_test"] == 9
  # Real ImageNet features on real textures: the pasted defects are found.
  assert results["categories"]["brick"]["pixel_auroc"] > 0.8
  for category in ("brick", "cup"):
    pngs = sorted((out / "heatmaps" / category).glob("*.png"))
    assert len(pngs) == 2
  table = evaluation.format_table(results)
  assert "| brick |" in table and "**mean**" in table


def test_resume_skips_finished_categories(tiny_benchmark, tmp_path, monkeypatch):
  out = tmp_path / "out"
  config = _config(tiny_benchmark, combine="cat")
  first = evaluation.evaluate(config, output_dir=out, categories=["cup"], num_heatmaps=0,
                              log=lambda _: None)
  seen = []
  real = evaluation.loop.evaluate_category

  def counting(spade, data, **kwargs):
    seen.append(data.category)
    return real(spade, data, **kwargs)

  monkeypatch.setattr(evaluation.loop, "evaluate_category", counting)
  second = evaluation.evaluate(config, output_dir=out, num_heatmaps=0, log=lambda _: None)
  assert seen == ["brick"]  # cup was finished with the same config: not recomputed.
  assert second["categories"]["cup"] == first["categories"]["cup"]
  _check_contract(second, ["brick", "cup"])


def test_interrupted_run_keeps_finished_categories(tiny_benchmark, tmp_path, monkeypatch):
  out = tmp_path / "out"
  config = _config(tiny_benchmark)
  real = evaluation.loop.evaluate_category

  def dies_on_cup(spade, data, **kwargs):
    if data.category == "cup":
      raise KeyboardInterrupt
    return real(spade, data, **kwargs)

  monkeypatch.setattr(evaluation.loop, "evaluate_category", dies_on_cup)
  with pytest.raises(KeyboardInterrupt):
    evaluation.evaluate(config, output_dir=out, num_heatmaps=0, log=lambda _: None)
  results = json.loads((out / "results.json").read_text())
  assert list(results["categories"]) == ["brick"]
  assert not [p for p in os.listdir(out) if p.endswith(".tmp")]  # No half-written file.


def test_other_config_in_same_output_dir_is_refused(tiny_benchmark, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "results.json").write_text(json.dumps(
      {"config": _config(tiny_benchmark, kappa=3).to_json(), "categories": {}, "mean": {}}))
  with pytest.raises(ValueError, match="another config"):
    evaluation.evaluate(_config(tiny_benchmark), output_dir=out, log=lambda _: None)


def test_unknown_category_is_refused(tiny_benchmark, tmp_path):
  with pytest.raises(ValueError, match="not in"):
    evaluation.evaluate(_config(tiny_benchmark), output_dir=tmp_path, categories=["nope"],
                        log=lambda _: None)


def _run_script(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return script_server.run_script("evaluate.py", *args, env=env, timeout=300)


@pytest.mark.slow
def test_script_rejects_unknown_flag_value(tmp_path):
  proc = _run_script("--combine=sum", f"--output_dir={tmp_path}")
  assert proc.returncode != 0
  assert "combine" in proc.stderr and "ensemble" in proc.stderr
  assert not (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_script_rejects_missing_data_dir(tmp_path):
  proc = _run_script(f"--data_dir={tmp_path / 'missing'}", f"--output_dir={tmp_path / 'out'}")
  assert proc.returncode != 0
  assert "missing" in proc.stderr
  assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.slow
def test_script_end_to_end(tiny_benchmark, tmp_path):
  proc = _run_script(f"--data_dir={tiny_benchmark}", "--categories=brick", "--k_images=4",
                     "--k_image_score=2", "--resize=96", "--crop=96", "--num_heatmaps=1",
                     f"--output_dir={tmp_path}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "| brick |" in proc.stdout
  results = json.loads((tmp_path / "results.json").read_text())
  _check_contract(results, ["brick"])
  assert results["config"]["resize"] == 96 and results["config"]["k_images"] == 4


@pytest.mark.slow
def test_stc_script_end_to_end(tmp_path):
  from stc_fixtures import make_stc_tree  # pylint: disable=import-outside-toplevel
  root = make_stc_tree(tmp_path / "stc")
  out = tmp_path / "out"
  proc = subprocess.run(
      [sys.executable, str(REPO / "experiments" / "evaluate_stc.py"), f"--data_dir={root}",
       "--backbone=efficientnet_lite0", "--size=64", "--num_heatmaps=1",
       f"--output_dir={out}"],
      capture_output=True, text=True, timeout=300,
      env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
  assert proc.returncode == 0, proc.stderr[-2000:]
  results = json.loads((out / "results.json").read_text())
  _check_contract(results, ["stc"])
  config = results["config"]
  # The paper's STC settings are the defaults: K = 1, kappa = 1, 256 -> here 64, 1:5.
  assert (config["k_images"], config["kappa"], config["frame_step"]) == (1, 1, 5)
  assert config["dataset"] == "stc" and config["resize"] == config["crop"] == 64
  assert results["categories"]["stc"]["n_train"] == 5  # 12 and 7 frames, every 5th.
  assert results["categories"]["stc"]["n_test"] == 8
  assert "| stc |" in proc.stdout
