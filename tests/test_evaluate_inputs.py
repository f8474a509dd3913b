"""Hostile inputs to the evaluation loop and its scripts: shared output folders,
unwritable output folders, out-of-range sigma, foreign results.json files, equivalent
data paths, categories whose metrics are undefined.

The library tests run evaluation.evaluate in-process on tiny random categories with the
fast FakeBackbone; the script tests check that a user's mistake ends with
"<script>: error: <message>" (no traceback) before any expensive work.
"""

import json
import os
import pathlib
import subprocess
import sys
import threading

from hostile_fixtures import write_bomb_png
from mvtec_fixtures import write_category
import numpy as np
import pytest
import script_server
from spade_fake_backbone import FakeBackbone

import spade_jax
from spade_jax import evaluation

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL = ("--weights=none", "--k_images=2", "--k_image_score=1", "--resize=64", "--crop=64",
         "--num_heatmaps=0", "--layers=layer1")  # Flags the tiny categories accept.


@pytest.fixture(name="data_dir")
def fixture_data_dir(tmp_path) -> pathlib.Path:
  root = tmp_path / "data"
  write_category(root, "alpha", n_train=3, seed=1)
  write_category(root, "beta", n_train=3, seed=2)
  return root


@pytest.fixture(name="calls")
def fixture_fake_backbone(monkeypatch) -> dict:
  """spade_jax.load_backbone -> FakeBackbone; counts the backbone loads and categories run."""
  calls = {"load_backbone": 0, "categories": []}

  def load_backbone(name, weights=None):
    del name, weights
    calls["load_backbone"] += 1
    return FakeBackbone()

  real = evaluation.loop.evaluate_category

  def counting(spade, data, **kwargs):
    calls["categories"].append(data.category)
    return real(spade, data, **kwargs)

  monkeypatch.setattr(spade_jax, "load_backbone", load_backbone)
  monkeypatch.setattr(evaluation.loop, "evaluate_category", counting)
  return calls


def _quiet(_: str) -> None:
  """A log sink that drops the progress lines."""


def _config(data_dir, **overrides) -> evaluation.EvalConfig:
  kwargs = {"data_dir": str(data_dir), "backbone": "fake", "weights": None, "k_images": 2,
            "k_image_score": 1, "resize": 64, "crop": 64}
  kwargs.update(overrides)
  return evaluation.EvalConfig(**kwargs)


def _evaluate(config, out, **kwargs):
  return evaluation.evaluate(config, output_dir=out, num_heatmaps=0, log=_quiet, **kwargs)


def _on_disk(out) -> dict:
  return json.loads((pathlib.Path(out) / evaluation.RESULTS_FILE).read_text())


def _run_script(script: str, *args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return script_server.run_script(script, *args, env=env, timeout=300)


def _assert_clean_error(proc: subprocess.CompletedProcess, script: str, *needles: str):
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert f"{script}: error:" in proc.stderr, proc.stderr[-3000:]
  for needle in needles:
    assert needle in proc.stderr, proc.stderr[-3000:]


# 1. Two runs on one output_dir: every category of every run ends up in results.json.


def test_interleaved_runs_merge_their_categories(data_dir, calls, tmp_path, monkeypatch):
  """Run A starts; run B finishes another category; then A writes its own."""
  out = tmp_path / "out"
  config = _config(data_dir)
  inner = evaluation.loop.evaluate_category
  b_results = {}

  def a_computes_alpha(spade, data, **kwargs):
    if data.category == "alpha" and not b_results:
      b_results.update(_evaluate(config, out, categories=["beta"]))  # B, start to end.
      assert list(_on_disk(out)["categories"]) == ["beta"]
    return inner(spade, data, **kwargs)

  monkeypatch.setattr(evaluation.loop, "evaluate_category", a_computes_alpha)
  a_results = _evaluate(config, out, categories=["alpha"])
  on_disk = _on_disk(out)
  assert sorted(on_disk["categories"]) == ["alpha", "beta"]
  assert on_disk["categories"]["beta"] == b_results["categories"]["beta"]
  # A returns (and the script prints) the merged file, mean over both categories.
  assert a_results == on_disk
  for m in evaluation.METRIC_NAMES:
    assert on_disk["mean"][m] == pytest.approx(
        np.mean([c[m] for c in on_disk["categories"].values()]))
  assert calls["categories"] == ["beta", "alpha"]


def test_concurrent_threads_lose_nothing(tmp_path, calls):
  """Four runs at once on one output_dir, one category each."""
  del calls
  root = tmp_path / "data"
  names = [f"c{i}" for i in range(4)]
  for i, name in enumerate(names):
    write_category(root, name, n_train=3, seed=i)
  out = tmp_path / "out"
  config = _config(root)
  errors = []

  def run(name):
    try:
      _evaluate(config, out, categories=[name])
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=run, args=(name,)) for name in names]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors
  assert sorted(_on_disk(out)["categories"]) == names


def test_run_that_skips_what_another_run_finished(data_dir, calls, tmp_path, monkeypatch):
  """A category finished by a concurrent run while this one works is not recomputed."""
  out = tmp_path / "out"
  config = _config(data_dir)
  inner = evaluation.loop.evaluate_category
  ran = []

  def b_finishes_beta_meanwhile(spade, data, **kwargs):
    if data.category == "alpha" and not ran:
      ran.append(1)
      _evaluate(config, out, categories=["beta"])
    return inner(spade, data, **kwargs)

  monkeypatch.setattr(evaluation.loop, "evaluate_category", b_finishes_beta_meanwhile)
  _evaluate(config, out)
  # Only B's beta and A's alpha were computed: A skipped beta, finished by B meanwhile.
  assert calls["categories"] == ["beta", "alpha"]
  assert sorted(_on_disk(out)["categories"]) == ["alpha", "beta"]


def test_concurrent_run_with_other_config_is_refused_before_work(data_dir, calls, tmp_path,
                                                                 monkeypatch):
  """B (other config) claims the folder while A loads its backbone: A refuses, computes nothing."""
  out = tmp_path / "out"
  fake = spade_jax.load_backbone

  def b_runs_while_a_loads(name, weights=None):
    monkeypatch.setattr(spade_jax, "load_backbone", fake)
    _evaluate(_config(data_dir, kappa=2), out, categories=["beta"])
    return fake(name, weights)

  monkeypatch.setattr(spade_jax, "load_backbone", b_runs_while_a_loads)
  with pytest.raises(ValueError, match="another config"):
    _evaluate(_config(data_dir), out, categories=["alpha"])
  assert calls["categories"] == ["beta"]  # B's only.
  assert _on_disk(out)["config"]["kappa"] == 2


def test_failed_run_leaves_no_claim(data_dir, calls, tmp_path, monkeypatch):
  """A run that fails before finishing a category leaves no results.json behind, so a
  corrected rerun with other settings is not refused."""
  del calls
  out = tmp_path / "out"

  def fails(spade, data, **kwargs):
    raise ValueError("broken image")

  with monkeypatch.context() as m:
    m.setattr(evaluation.loop, "evaluate_category", fails)
    with pytest.raises(ValueError, match="broken image"):
      _evaluate(_config(data_dir, kappa=2), out)
  assert not (out / evaluation.RESULTS_FILE).exists()
  assert sorted(_evaluate(_config(data_dir), out)["categories"]) == ["alpha", "beta"]


@pytest.mark.slow
def test_two_script_processes_merge(data_dir, tmp_path):
  out = tmp_path / "out"
  common = [f"--data_dir={data_dir}", *SMALL, f"--output_dir={out}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, str(REPO / "experiments" / "evaluate.py"),
                             *common, f"--categories={name}"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
           for name in ("alpha", "beta")]
  outs = [proc.communicate(timeout=300) for proc in procs]
  for proc, (_, stderr) in zip(procs, outs):
    assert proc.returncode == 0, stderr[-3000:]
  assert sorted(_on_disk(out)["categories"]) == ["alpha", "beta"]
  # The run that finished last prints both categories.
  assert any("| alpha |" in stdout and "| beta |" in stdout for stdout, _ in outs)


# 2. Unwritable output_dir: a clear error before any work.


@pytest.mark.parametrize("where", ["file", "under_file", "results_is_dir", "lock_is_dir",
                                   "heatmaps_is_file"])
def test_unusable_output_dir_is_refused_before_work(data_dir, calls, tmp_path, where):
  blocker = tmp_path / "blocker"
  blocker.write_text("x")
  out = {"file": blocker, "under_file": blocker / "sub" / "out"}.get(where, tmp_path / "out")
  if where == "results_is_dir":
    (out / evaluation.RESULTS_FILE).mkdir(parents=True)
  elif where == "lock_is_dir":
    (out / evaluation.LOCK_FILE).mkdir(parents=True)
  elif where == "heatmaps_is_file":
    out.mkdir()
    (out / "heatmaps").write_text("x")
  with pytest.raises(ValueError, match="output_dir|results.json") as e:
    evaluation.evaluate(_config(data_dir), output_dir=out, num_heatmaps=1, log=_quiet)
  assert str(blocker if where in ("file", "under_file") else out) in str(e.value)
  assert calls == {"load_backbone": 0, "categories": []}


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_dir_is_refused_before_work(data_dir, calls, tmp_path):
  out = tmp_path / "ro"
  out.mkdir()
  out.chmod(0o555)
  try:
    with pytest.raises(ValueError, match="not writable"):
      _evaluate(_config(data_dir), out)
  finally:
    out.chmod(0o755)
  assert calls == {"load_backbone": 0, "categories": []}


@pytest.mark.slow
def test_script_output_dir_is_a_file(data_dir, tmp_path):
  blocker = tmp_path / "blocker"
  blocker.write_text("x")
  proc = _run_script("evaluate.py", f"--data_dir={data_dir}", *SMALL,
                     f"--output_dir={blocker / 'out'}")
  _assert_clean_error(proc, "evaluate.py", str(blocker), "output_dir")


@pytest.mark.slow
def test_stc_script_output_dir_is_a_file(tmp_path):
  from stc_fixtures import make_stc_tree  # pylint: disable=import-outside-toplevel
  root = make_stc_tree(tmp_path / "stc")
  blocker = tmp_path / "blocker"
  blocker.write_text("x")
  proc = _run_script("evaluate_stc.py", f"--data_dir={root}", "--weights=none",
                     f"--output_dir={blocker}")
  _assert_clean_error(proc, "evaluate_stc.py", str(blocker), "output_dir")


# 3. sigma out of range: refused by EvalConfig and the scripts at once.


@pytest.mark.parametrize("sigma", [float("inf"), float("nan"), -1.0, 1e6, 1e10, 65.0])
def test_eval_config_rejects_sigma(sigma):
  with pytest.raises(ValueError, match="sigma"):
    _config("data", sigma=sigma)


def test_eval_config_accepts_sigma_up_to_the_map_side():
  assert _config("data", sigma=64.0).sigma == 64.0
  assert _config("data", sigma=0.0).sigma == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("sigma", ["inf", "1e6", "1e10", "-2"])
def test_script_rejects_sigma(data_dir, tmp_path, sigma):
  proc = _run_script("evaluate.py", f"--data_dir={data_dir}", *SMALL, f"--sigma={sigma}",
                     f"--output_dir={tmp_path / 'out'}")
  _assert_clean_error(proc, "evaluate.py", "EvalConfig.sigma")
  assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_stc_script_rejects_sigma(tmp_path):
  from stc_fixtures import make_stc_tree  # pylint: disable=import-outside-toplevel
  root = make_stc_tree(tmp_path / "stc")
  proc = _run_script("evaluate_stc.py", f"--data_dir={root}", "--weights=none", "--size=64",
                     "--sigma=inf", f"--output_dir={tmp_path / 'out'}")
  _assert_clean_error(proc, "evaluate_stc.py", "EvalConfig.sigma")
  assert not (tmp_path / "out").exists()


# 4. A decompression bomb among the images: ValueError naming the file.


def test_image_bomb_is_a_clear_error(data_dir, calls, tmp_path):
  bomb = data_dir / "beta" / "train" / "good" / "001.png"
  write_bomb_png(bomb)
  with pytest.raises(ValueError, match="too large") as e:
    _evaluate(_config(data_dir), tmp_path / "out", categories=["beta"])
  assert str(bomb) in str(e.value)
  del calls


# 5. A results.json that is not ours: a clear error naming the file, before work.


def _good_entry():
  return {"image_auroc": 0.5, "pixel_auroc": 0.5, "au_pro": 0.5, "n_train": 3, "n_test": 5,
          "seconds": 1.0}


@pytest.mark.parametrize("content", [
    "[]", "3", '"text"', "null",
    "{}",
    '{"config": [], "categories": {}}',
    "CONFIG_WITH:{\"categories\": []}",
    "CONFIG_WITH:{\"categories\": {\"alpha\": 3}}",
    "CONFIG_WITH:{\"categories\": {\"alpha\": {\"image_auroc\": \"high\"}}}",
    "CONFIG_WITH:{\"categories\": {\"alpha\": ENTRY_MISSING}}",
    "CONFIG_WITH:{\"categories\": {\"alpha\": ENTRY_BOOL}}",
    "CONFIG_WITH:{\"categories\": {}, \"mean\": 3}",
    "\xff\xfe not utf-8",
])
def test_foreign_results_json_is_refused_before_work(data_dir, calls, tmp_path, content):
  out = tmp_path / "out"
  out.mkdir()
  config_json = _config(data_dir).to_json()
  if content.startswith("CONFIG_WITH:"):
    body = content[len("CONFIG_WITH:"):]
    missing = {k: v for k, v in _good_entry().items() if k != "au_pro"}
    body = body.replace("ENTRY_MISSING", json.dumps(missing))
    body = body.replace("ENTRY_BOOL", json.dumps({**_good_entry(), "n_test": True}))
    obj = json.loads(body)
    obj["config"] = config_json
    content = json.dumps(obj)
  (out / evaluation.RESULTS_FILE).write_bytes(content.encode("latin-1"))
  with pytest.raises(ValueError) as e:
    _evaluate(_config(data_dir), out)
  message = str(e.value)
  assert str(out / evaluation.RESULTS_FILE) in message
  assert "move it away" in message.lower() and "output_dir" in message
  assert calls == {"load_backbone": 0, "categories": []}


@pytest.mark.slow
def test_script_foreign_results_json(data_dir, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / evaluation.RESULTS_FILE).write_text("[]")
  proc = _run_script("evaluate.py", f"--data_dir={data_dir}", *SMALL, f"--output_dir={out}")
  _assert_clean_error(proc, "evaluate.py", str(out / evaluation.RESULTS_FILE), "Move it away")


@pytest.mark.slow
def test_stc_script_foreign_results_json(tmp_path):
  from stc_fixtures import make_stc_tree  # pylint: disable=import-outside-toplevel
  root = make_stc_tree(tmp_path / "stc")
  out = tmp_path / "out"
  out.mkdir()
  (out / evaluation.RESULTS_FILE).write_text("3")
  proc = _run_script("evaluate_stc.py", f"--data_dir={root}", "--weights=none",
                     f"--output_dir={out}")
  _assert_clean_error(proc, "evaluate_stc.py", str(out / evaluation.RESULTS_FILE))


# 6. Equivalent data paths resume the same run.


def test_trailing_slash_on_data_dir_resumes(data_dir, calls, tmp_path):
  out = tmp_path / "out"
  _evaluate(_config(data_dir), out, categories=["alpha"])
  assert _on_disk(out)["config"]["data_dir"] == str(data_dir)
  for same in (f"{data_dir}/", f"{data_dir}//", f"{data_dir}/./",
               os.path.relpath(data_dir) + "/"):
    results = _evaluate(_config(same), out, categories=["alpha"])
    assert list(results["categories"]) == ["alpha"]
  assert calls["categories"] == ["alpha"]  # Never recomputed.


def test_older_results_json_with_trailing_slash_still_resumes(data_dir, calls, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  config_json = {**_config(data_dir).to_json(), "data_dir": f"{data_dir}/"}
  (out / evaluation.RESULTS_FILE).write_text(json.dumps(
      {"config": config_json, "categories": {"alpha": _good_entry()},
       "mean": {m: 0.5 for m in evaluation.METRIC_NAMES}}))
  results = _evaluate(_config(data_dir), out)
  assert calls["categories"] == ["beta"]
  assert results["categories"]["alpha"] == _good_entry()
  assert _on_disk(out)["config"]["data_dir"] == str(data_dir)  # Normalised on merge.


def test_eval_config_normalises_data_dir():
  assert _config("some/data/").data_dir == "some/data"
  assert _config("./some//data").data_dir == "some/data"
  assert _config(pathlib.Path("some/data")).data_dir == "some/data"


# 7. A category whose metrics are undefined is refused before any work.


@pytest.mark.parametrize("kind", ["all_good", "all_anomalous"])
def test_category_with_one_test_class_is_refused_up_front(data_dir, calls, tmp_path, kind):
  if kind == "all_good":
    write_category(data_dir, "gamma", defects={})
  else:
    write_category(data_dir, "gamma", n_good=0)
  with pytest.raises(ValueError, match="gamma") as e:
    _evaluate(_config(data_dir), tmp_path / "out")
  assert "--categories" in str(e.value)
  assert calls == {"load_backbone": 0, "categories": []}
  assert not (tmp_path / "out" / evaluation.RESULTS_FILE).exists()


def test_too_few_training_images_refused_up_front(data_dir, calls, tmp_path):
  write_category(data_dir, "gamma", n_train=1)
  with pytest.raises(ValueError, match="gamma.*k_images"):
    _evaluate(_config(data_dir), tmp_path / "out")
  assert calls == {"load_backbone": 0, "categories": []}


def test_empty_masks_refused_before_fit(data_dir, calls, tmp_path, monkeypatch):
  import PIL.Image  # pylint: disable=import-outside-toplevel
  for mask in (data_dir / "beta" / "ground_truth").rglob("*.png"):
    PIL.Image.fromarray(np.zeros((32, 40), np.uint8)).save(mask)
  fitted = []
  monkeypatch.setattr(spade_jax.Spade, "fit", lambda *a, **k: fitted.append(1))
  with pytest.raises(ValueError, match="beta.*mask"):
    _evaluate(_config(data_dir), tmp_path / "out", categories=["beta"])
  assert not fitted
  del calls


def test_evaluate_loaded_refuses_one_class_test_set(data_dir, calls, tmp_path):
  from spade_jax.data import mvtec  # pylint: disable=import-outside-toplevel
  data = mvtec.load_category(data_dir, "alpha")
  good = np.asarray(data.test_labels) == 0
  all_good = mvtec.CategoryData(
      category="alpha", train_images=data.train_images,
      test_images=data.test_images[good], test_labels=data.test_labels[good],
      test_masks=data.test_masks[good],
      test_defects=[d for d, g in zip(data.test_defects, good) if g],
      test_paths=[p for p, g in zip(data.test_paths, good) if g],
      train_paths=data.train_paths)
  with pytest.raises(ValueError, match="no anomalous test image"):
    evaluation.evaluate_loaded(_config(data_dir), {"stc": all_good},
                               output_dir=tmp_path / "out", num_heatmaps=0, log=_quiet)
  assert calls == {"load_backbone": 0, "categories": []}


def test_evaluate_loaded_merges_and_validates(data_dir, calls, tmp_path):
  from spade_jax.data import mvtec  # pylint: disable=import-outside-toplevel
  out = tmp_path / "out"
  extra = {"dataset": "x"}
  config = _config(data_dir)
  first = evaluation.evaluate_loaded(config, {"alpha": mvtec.load_category(data_dir, "alpha")},
                                     output_dir=out, num_heatmaps=0, log=_quiet,
                                     extra_config=extra)
  second = evaluation.evaluate_loaded(config, {"beta": mvtec.load_category(data_dir, "beta")},
                                      output_dir=out, num_heatmaps=0, log=_quiet,
                                      extra_config=extra)
  assert list(first["categories"]) == ["alpha"]
  assert sorted(second["categories"]) == ["alpha", "beta"] == sorted(_on_disk(out)["categories"])
  assert calls["categories"] == ["alpha", "beta"]
  with pytest.raises(ValueError, match="another config"):
    evaluation.evaluate_loaded(config, {}, output_dir=out, log=_quiet, extra_config={"x": 1})


@pytest.mark.slow
def test_script_all_good_category(data_dir, tmp_path):
  write_category(data_dir, "gamma", defects={})
  proc = _run_script("evaluate.py", f"--data_dir={data_dir}", *SMALL,
                     f"--output_dir={tmp_path / 'out'}")
  _assert_clean_error(proc, "evaluate.py", "'gamma'", "no anomalous test image")
  assert not (tmp_path / "out").exists()
