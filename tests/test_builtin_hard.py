"""Tests for the built-in benchmark's hard variant (tiny versions only), for the standard
benchmark being unchanged by it, and for evaluate.py's --benchmark flag."""

import hashlib
import itertools
import json
import os
import pathlib

import numpy as np
import pytest
from scipy import ndimage
import script_server

from spade_jax.data import builtin, defects, mvtec
from spade_jax.host import paths

REPO = pathlib.Path(__file__).resolve().parents[1]
CENTRE = slice((256 - 224) // 2, (256 + 224) // 2)
# sha256 of the raw arrays render_example gave for the standard benchmark's tiny version
# (seed 0, every category, train 0-1 and the 6 test images), computed before the hard
# variant existed (git 2f5ee1a; numpy 2.4, scipy 1.17): the hard variant changed none
# of the standard benchmark's images or masks.
STANDARD_GOLDEN = "e948ac9f1839c4c79820121b035a73917e457c17edee146ce7b8d18b4bda91f4"
# Per hard kind, bounds that make "small and faint" measurable on the uint8 images
# (noise and rounding included): the largest mask area (fraction of the 256x256
# image), and the largest mean change inside the mask (grey levels, largest over R,
# G, B; thin_streak: its 50-level maximum contrast + 1 for rounding). Besides, on
# average the faint kinds change their masks by under FAINTER times as much as their
# standard counterpart does on the same images (scratch: about 110 levels on
# average; stain, the faintest standard kind: about 75).
MAX_AREA = {"thin_streak": 0.008, "light_stain": 0.025, "colour_cast": 0.07,
            "self_paste": 0.025}
MAX_MEAN_CHANGE = {"thin_streak": 51.0, "light_stain": 75.0, "colour_cast": 31.0}
COUNTERPART = {"thin_streak": "scratch", "light_stain": "stain", "colour_cast": "stain",
               "self_paste": "foreign"}
FAINTER = 0.6


def _hashes(root):
  return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_hard(tmp_path_factory):
  root = tmp_path_factory.mktemp("bench") / "builtin_hard"
  return builtin.generate_builtin_benchmark(root, num_train=2, num_test=6, variant="hard")


def test_standard_benchmark_unchanged():
  digest = hashlib.sha256()
  for category in builtin.BUILTIN_CATEGORIES:
    kinds = builtin._test_kinds(6)  # pylint: disable=protected-access
    examples = [("train", i, None) for i in range(2)] + [
        ("test", i, kind) for i, kind in enumerate(kinds)]
    for split, index, kind in examples:
      for array in builtin.render_example(0, category, split, index, kind):
        digest.update(array.tobytes())
  assert digest.hexdigest() == STANDARD_GOLDEN


def test_hard_deterministic_byte_identical(tiny_hard, tmp_path):
  again = builtin.generate_builtin_benchmark(
      tmp_path / "again", categories=["gravel", "cat"], num_train=2, num_test=6,
      variant="hard")
  first, second = _hashes(tiny_hard), _hashes(again)
  assert {k: v for k, v in first.items() if k.split("/")[0] in ("gravel", "cat")} == {
      k: v for k, v in second.items() if k != builtin.INFO_FILE}
  info = json.loads((tiny_hard / builtin.INFO_FILE).read_text())
  assert info["variant"] == "hard"
  assert info["defect_kinds"] == list(defects.HARD_DEFECT_KINDS)
  assert info["mask_threshold"] == defects.HARD_MASK_THRESHOLD


def test_hard_layout_masks_and_shared_normal_images(tiny_hard):
  assert mvtec.list_categories(tiny_hard) == sorted(builtin.BUILTIN_CATEGORIES)
  for category in builtin.BUILTIN_CATEGORIES:
    data = mvtec.load_category(tiny_hard, category)
    assert data.train_images.shape == (2, 256, 256, 3)
    assert data.test_images.shape == (6, 256, 256, 3)
    assert sorted(set(data.test_defects)) == sorted(("good",) + defects.HARD_DEFECT_KINDS)
    for label, mask, path in zip(data.test_labels, data.test_masks, data.test_paths):
      assert mask.any() == bool(label), path  # Non-empty exactly for defective images.
      inside = np.zeros_like(mask)
      inside[CENTRE, CENTRE] = mask[CENTRE, CENTRE]
      np.testing.assert_array_equal(mask, inside, err_msg=path)
    kinds = builtin._test_kinds(6, "hard")  # pylint: disable=protected-access
    for kind in defects.HARD_DEFECT_KINDS:  # The written files are the generator's.
      i = data.test_paths.index(f"test/{kind}/000.png")
      _, image, mask = builtin.render_example(0, category, "test", kinds.index(kind), kind)
      np.testing.assert_array_equal(data.test_masks[i], mask)
      np.testing.assert_array_equal(data.test_images[i], image)
    # The normal images are the standard benchmark's.
    for i in range(2):
      np.testing.assert_array_equal(
          data.train_images[i], builtin.render_example(0, category, "train", i, None)[1])
    i = data.test_paths.index("test/good/000.png")
    np.testing.assert_array_equal(
        data.test_images[i], builtin.render_example(0, category, "test", 0, None)[1])


@pytest.mark.parametrize("kind", defects.HARD_DEFECT_KINDS)
def test_hard_defects_are_small_and_faint(kind):
  regions, deltas, standard = 0, [], []
  for category, index in itertools.product(builtin.BUILTIN_CATEGORIES, range(3)):
    normal, image, mask = builtin.render_example(7, category, "test", index, kind)
    normal_s, image_s, mask_s = builtin.render_example(7, category, "test", index,
                                                       COUNTERPART[kind])
    standard.append(np.abs(normal_s.astype(int) - image_s.astype(int)).max(axis=-1)[mask_s]
                    .mean())
    where = (category, index)
    changed = (normal != image).any(axis=-1)
    assert not (changed & ~mask).any(), where  # Nothing outside the mask.
    assert changed[mask].mean() > (0.85 if kind == "self_paste" else 0.98), where
    assert 0.0002 < mask.mean() < MAX_AREA[kind], (where, mask.mean())
    delta = np.abs(normal.astype(int) - image.astype(int)).max(axis=-1)[mask].mean()
    deltas.append(delta)
    if kind in MAX_MEAN_CHANGE:
      assert defects.HARD_MASK_THRESHOLD <= delta <= MAX_MEAN_CHANGE[kind], (where, delta)
    assert not mask[:CENTRE.start].any() and not mask[CENTRE.stop:].any()
    assert not mask[:, :CENTRE.start].any() and not mask[:, CENTRE.stop:].any()
    regions = max(regions, ndimage.label(mask, structure=np.ones((3, 3)))[1])
  assert regions >= 2  # Some defects have two regions.
  if kind in MAX_MEAN_CHANGE:
    assert np.mean(deltas) < FAINTER * np.mean(standard), (np.mean(deltas), np.mean(standard))


@pytest.mark.parametrize("kind", ["light_stain", "colour_cast"])
def test_faint_rims_are_cut_at_the_threshold(kind):
  """Before noise: the mask is exactly where the change reaches the threshold."""
  rng = np.random.default_rng(3)
  image = rng.uniform(40, 215, (96, 96, 3)).astype(np.float32)
  painted = image.copy()

  def zone(rng, radius):
    del rng, radius
    return np.array([48.0, 48.0])

  mask = defects.paint_defect(rng, painted, kind, (8, 88), zone, image)
  change = np.abs(painted - image).max(axis=-1)
  np.testing.assert_array_equal(mask, change >= defects.HARD_MASK_THRESHOLD)
  if kind == "colour_cast":  # Luminance-neutral: the channel changes sum to ~0.
    np.testing.assert_allclose((painted - image).sum(axis=-1), 0, atol=1e-3)


@pytest.mark.parametrize("category", ["gravel", "cat"])
def test_self_paste_is_a_rotated_patch_of_the_same_image(category):
  # pylint: disable=protected-access
  rng = np.random.default_rng(5)
  spec = builtin._SPECS[category]
  clean = builtin._view(rng, spec)
  clean += rng.uniform(0, 1e-2, clean.shape).astype(np.float32)  # All pixels distinct.
  painted = clean.copy()
  box = (builtin._BOX_LO, builtin._BOX_HI)
  mask = defects.paint_defect(rng, painted, "self_paste", box, builtin._zone(spec), clean)
  assert mask.any() and (painted[~mask] == clean[~mask]).all()
  where = {tuple(p): i for i, p in enumerate(clean.reshape(-1, 3).tolist())}
  origins = np.array([where[tuple(p)] for p in painted[mask].tolist()])  # KeyError: not.
  rows, cols = np.divmod(origins, clean.shape[1])
  assert not mask[rows, cols].any()  # Every pasted pixel comes from outside the paste.
  assert (painted[mask] != clean[mask]).any(axis=-1).all()


def test_hard_cache_folder_is_separate_and_generated_once(tmp_path, monkeypatch):
  monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path))
  calls = []
  real = builtin.generate_builtin_benchmark

  def tiny_generate(root, **kwargs):
    calls.append((root, kwargs))
    return real(root, categories=["brick"], num_train=1, num_test=2, **kwargs)

  monkeypatch.setattr(builtin, "generate_builtin_benchmark", tiny_generate)
  hard = builtin.builtin_benchmark_dir("hard")
  assert hard == tmp_path / "builtin_hard_benchmark_v1"
  assert json.loads((hard / builtin.INFO_FILE).read_text())["variant"] == "hard"
  assert builtin.builtin_benchmark_dir("hard") == hard and len(calls) == 1
  standard = builtin.builtin_benchmark_dir()
  assert standard == tmp_path / "builtin_benchmark_v1" != hard
  assert "variant" not in json.loads((standard / builtin.INFO_FILE).read_text())
  assert [kwargs for _, kwargs in calls] == [{"variant": "hard"}, {"variant": "standard"}]
  with pytest.raises(ValueError, match="variant"):
    builtin.builtin_benchmark_dir("easy")


def test_hard_generation_is_atomic(tmp_path, monkeypatch):
  monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path))
  real = builtin._write_category  # pylint: disable=protected-access
  written = []

  def killed_after_one(*args):
    if written:
      raise KeyboardInterrupt
    written.append(args[2])
    return real(*args)

  monkeypatch.setattr(builtin, "_write_category", killed_after_one)
  with pytest.raises(KeyboardInterrupt):
    builtin.generate_builtin_benchmark(tmp_path / "builtin_hard_benchmark_v1", num_train=1,
                                       num_test=2, variant="hard")
  assert written and list(tmp_path.iterdir()) == []  # No half benchmark, no temp folder.
  with pytest.raises(ValueError, match="variant"):
    builtin.generate_builtin_benchmark(tmp_path / "x", variant="easy")


def _evaluate(*args, cwd):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env[paths.CACHE_ENV] = str(cwd / "cache")
  env.pop("XLA_FLAGS", None)
  return script_server.run_script("evaluate.py", *args, env=env, cwd=str(cwd), timeout=300)


def _assert_clean_error(proc, *needles):
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert "evaluate.py: error:" in proc.stderr, proc.stderr[-3000:]
  for needle in needles:
    assert needle in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("args, needles", [
    (["--benchmark=builtin_easy"], ["--benchmark", "builtin_hard", "'builtin_easy'"]),
    (["--benchmark=builtin", "--data_dir=/nonexistent"], ["--benchmark", "--data_dir"]),
    (["--benchmark_seed=1", "--data_dir=/nonexistent"], ["--benchmark_seed", "--data_dir"]),
    (["--benchmark_seed=-1"], ["--benchmark_seed", "-1"]),
])
@pytest.mark.slow
def test_evaluate_benchmark_flag_errors(tmp_path, args, needles):
  proc = _evaluate(*args, cwd=tmp_path)
  _assert_clean_error(proc, *needles)
  assert not (tmp_path / "results").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("args, folder", [
    ([], "'results/builtin'"), (["--benchmark=builtin_hard"], "'results/builtin_hard'"),
    (["--benchmark=builtin_hard", "--benchmark_seed=2"], "'results/builtin_hard_seed2'")])
@pytest.mark.slow
def test_evaluate_output_dir_default_follows_the_benchmark(tmp_path, args, folder):
  (tmp_path / "results").write_text("a file, so that the output folder cannot be made")
  proc = _evaluate(*args, cwd=tmp_path)
  _assert_clean_error(proc, folder)
  assert not (tmp_path / "cache").exists()  # It failed before generating any data.
