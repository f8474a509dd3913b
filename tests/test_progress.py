"""Progress lines and stage timings (spade_jax.host.progress), in the detector and in
results.json. Time is a fake clock where a line's content depends on it; nothing here
asserts how fast anything runs."""

import json

from mvtec_fixtures import write_category
import numpy as np
import pytest
from spade_fake_backbone import FakeBackbone

import spade_jax
from spade_jax import evaluation
from spade_jax.host import progress


class FakeClock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_progress_lines_rate_and_time_left():
  clock, lines = FakeClock(), []
  report = progress.Progress("images: scored", 100, every_s=10, log=lines.append, clock=clock)
  clock.now += 5
  assert report.update(10) is None  # Under 10 s since the start: quiet.
  clock.now += 5
  line = report.update(20)  # 20 images in 10 s: 2 / s, 80 left: 40 s.
  assert line == "images: scored 20 / 100 images (20%), 2 images/s, about 40 s left"
  clock.now += 3
  assert report.update(30) is None  # 3 s since the last line.
  clock.now += 187  # 200 s in all.
  line = report.update(100)
  assert line == "images: scored 100 / 100 images in 3 min 20 s (0.5 images/s)"
  assert lines == report.lines and len(lines) == 2


def test_short_loop_logs_nothing():
  clock, lines = FakeClock(), []
  report = progress.Progress("x", 4, log=lines.append, clock=clock)
  for done in range(1, 5):
    clock.now += 1
    report.update(done)
  assert lines == []


def test_quiet_silences_inner_progress():
  clock, lines = FakeClock(), []
  report = progress.Progress("x", 4, every_s=0, log=lines.append, clock=clock)
  with progress.quiet():
    assert report.update(1) is None
  clock.now += 1
  assert report.update(2) is not None


@pytest.mark.parametrize("seconds, text", [(0.4, "0 s"), (59, "59 s"), (61, "1 min 1 s"),
                                           (3600 + 420, "1 h 7 min")])
def test_format_duration(seconds, text):
  assert progress.format_duration(seconds) == text


def test_stages_add_up_and_nest():
  with progress.record_stages() as outer:
    with progress.stage("a") as timed:
      assert timed.active and timed.ready(3) == 3
    with progress.record_stages() as inner:
      with progress.stage("b"):
        pass
      with progress.stage("a"):
        pass
  assert set(outer) == {"a", "b"} and set(inner) == {"a", "b"}
  assert outer["a"] >= inner["a"] and outer["b"] == inner["b"]
  with progress.stage("c") as timed:  # No collector: nothing recorded, no waiting.
    assert not timed.active
  assert "c" not in outer
  assert progress.stage_totals(outer, ("a", "z")) == {"a": outer["a"], "z": 0.0}


def _spade(k_images=2):
  return spade_jax.Spade(FakeBackbone(), spade_jax.SpadeConfig(
      k_images=k_images, k_image_score=1, layers=("layer1", "layer2"), resize=32, crop=32,
      batch_size=2))


def test_spade_records_backbone_search_and_maps():
  spade = _spade()
  rng = np.random.default_rng(0)
  train = rng.integers(0, 256, (4, 32, 32, 3), np.uint8)
  test = rng.integers(0, 256, (3, 32, 32, 3), np.uint8)
  with progress.record_stages() as fit_stages:
    index = spade.fit(train)
  assert set(fit_stages) == {"backbone"}
  with progress.record_stages() as stages:
    recorded = spade.score(index, test)
  assert set(stages) == {"backbone", "search", "maps"}
  plain = spade.score(index, test)  # Recording changes no number.
  np.testing.assert_array_equal(recorded[0], plain[0])
  np.testing.assert_array_equal(recorded[1], plain[1])


def test_spade_score_reports_progress(monkeypatch, caplog):
  spade = _spade()
  rng = np.random.default_rng(1)
  index = spade.fit(rng.integers(0, 256, (4, 32, 32, 3), np.uint8))
  test = rng.integers(0, 256, (5, 32, 32, 3), np.uint8)
  real = progress.Progress
  monkeypatch.setattr(progress, "Progress",
                      lambda *a, **k: real(*a, **{**k, "every_s": 0.0}))
  with caplog.at_level("INFO"):
    spade.score(index, test)
    pool, features = spade.extract(test)
    spade.score_features(index, pool, features)
  lines = [r.getMessage() for r in caplog.records]
  scored = [l for l in lines if l.startswith("images: scored")]
  assert any(l.startswith("images: scored 2 / 5 images (40%)") and "images/s" in l
             and "left" in l for l in scored), lines
  assert sum(l.startswith("images: scored 5 / 5 images in") for l in scored) == 2
  assert any(l.startswith("images: features of 2 / 5 images") for l in lines), lines


def test_results_json_has_stage_seconds_and_reads_older_files(tmp_path, monkeypatch):
  root = tmp_path / "data"
  write_category(root, "alpha", n_train=3, seed=1)
  monkeypatch.setattr(spade_jax, "load_backbone", lambda name, weights=None: FakeBackbone())
  config = evaluation.EvalConfig(data_dir=str(root), backbone="fake", weights=None,
                                 k_images=2, k_image_score=1, resize=64, crop=64)
  out = tmp_path / "out"
  results = evaluation.evaluate(config, output_dir=out, num_heatmaps=0, log=lambda _: None)
  entry = results["categories"]["alpha"]
  assert tuple(entry["stage_seconds"]) == evaluation.STAGE_NAMES
  assert 0 <= sum(entry["stage_seconds"].values()) <= entry["seconds"]
  # A results.json written before stage_seconds existed still resumes.
  on_disk = json.loads((out / "results.json").read_text())
  del on_disk["categories"]["alpha"]["stage_seconds"]
  (out / "results.json").write_text(json.dumps(on_disk))
  again = evaluation.evaluate(config, output_dir=out, num_heatmaps=0, log=lambda _: None)
  assert "stage_seconds" not in again["categories"]["alpha"]
  # A malformed one is refused, naming the file.
  on_disk["categories"]["alpha"]["stage_seconds"] = {"backbone": "slow"}
  (out / "results.json").write_text(json.dumps(on_disk))
  with pytest.raises(ValueError, match="stage_seconds") as e:
    evaluation.evaluate(config, output_dir=out, num_heatmaps=0, log=lambda _: None)
  assert str(out / "results.json") in str(e.value)
