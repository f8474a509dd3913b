"""Tests for the built-in benchmark generator (tiny versions only)."""

import hashlib
import itertools

import numpy as np
import pytest
from scipy import ndimage

from spade_jax.data import builtin, defects, mvtec
from spade_jax.host import paths

CENTRE = slice((256 - 224) // 2, (256 + 224) // 2)


def _hashes(root):
  return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("bench") / "builtin"
  return builtin.generate_builtin_benchmark(root, num_train=2, num_test=6)


def test_deterministic_byte_identical(tiny, tmp_path):
  again = builtin.generate_builtin_benchmark(
      tmp_path / "again", categories=["grass", "cup"], num_train=2, num_test=6)
  first, second = _hashes(tiny), _hashes(again)
  # The same images whatever the other categories are.
  assert {k: v for k, v in first.items() if k.split("/")[0] in ("grass", "cup")} == {
      k: v for k, v in second.items() if k != builtin.INFO_FILE}
  other = builtin.render_example(1, "grass", "train", 0, None)[1]
  assert not np.array_equal(other, builtin.render_example(0, "grass", "train", 0, None)[1])


def test_layout_is_loaded_by_the_mvtec_reader(tiny):
  assert mvtec.list_categories(tiny) == sorted(builtin.BUILTIN_CATEGORIES)
  assert {"brick", "grass", "gravel"} <= set(builtin.BUILTIN_CATEGORIES)
  for category in builtin.BUILTIN_CATEGORIES:
    data = mvtec.load_category(tiny, category)
    assert data.train_images.shape == (2, 256, 256, 3)
    assert data.test_images.shape == (6, 256, 256, 3)
    assert sorted(set(data.test_defects)) == sorted(("good",) + defects.DEFECT_KINDS)
    for label, mask, path in zip(data.test_labels, data.test_masks, data.test_paths):
      assert mask.any() == bool(label), path
      # Defects lie inside the centre 224x224 crop that the evaluation keeps.
      inside = np.zeros_like(mask)
      inside[CENTRE, CENTRE] = mask[CENTRE, CENTRE]
      np.testing.assert_array_equal(mask, inside, err_msg=path)
    # The written mask is the generator's mask.
    i = data.test_paths.index("test/stain/000.png")
    index = builtin._test_kinds(6).index("stain")  # pylint: disable=protected-access
    _, image, mask = builtin.render_example(0, category, "test", index, "stain")
    np.testing.assert_array_equal(data.test_masks[i], mask)
    np.testing.assert_array_equal(data.test_images[i], image)


@pytest.mark.parametrize("kind", defects.DEFECT_KINDS)
def test_mask_is_the_changed_pixels(kind):
  regions = []
  for category, index in itertools.product(builtin.BUILTIN_CATEGORIES, range(3)):
    normal, image, mask = builtin.render_example(7, category, "test", index, kind)
    changed = (normal != image).any(axis=-1)
    assert not (changed & ~mask).any(), (category, index)  # Nothing outside the mask.
    assert changed[mask].mean() > 0.9, (category, index)  # Almost all of it changed.
    area = mask.mean()
    assert 0.0005 < area < 0.06, (category, index, area)  # Visible, not huge.
    delta = np.abs(normal.astype(int) - image.astype(int)).max(axis=-1)[mask].mean()
    assert delta > 20, (category, index, delta)
    assert not mask[:CENTRE.start].any() and not mask[CENTRE.stop:].any()
    assert not mask[:, :CENTRE.start].any() and not mask[:, CENTRE.stop:].any()
    regions.append(ndimage.label(mask, structure=np.ones((3, 3)))[1])
  assert max(regions) >= 2  # Some defects have several regions.


def test_normal_images_vary(tiny):
  for category in builtin.BUILTIN_CATEGORIES:
    a, b = mvtec.load_category(tiny, category).train_images.astype(float)
    assert np.abs(a - b).mean() > 5, category


def test_atomic_no_partial_output(tmp_path, monkeypatch):
  def fail(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(builtin, "_write_category", fail)
  with pytest.raises(KeyboardInterrupt):
    builtin.generate_builtin_benchmark(tmp_path / "bench", num_train=1, num_test=2)
  assert list(tmp_path.iterdir()) == []  # Neither the benchmark nor a temp folder.


def test_refuses_non_empty_root_and_bad_arguments(tmp_path):
  (tmp_path / "x").write_text("mine")
  with pytest.raises(FileExistsError, match="not empty"):
    builtin.generate_builtin_benchmark(tmp_path, num_train=1, num_test=2)
  with pytest.raises(ValueError, match="subset"):
    builtin.generate_builtin_benchmark(tmp_path / "b", categories=["carpet"])
  with pytest.raises(ValueError, match="num_train"):
    builtin.generate_builtin_benchmark(tmp_path / "b", num_train=0)


@pytest.fixture
def tiny_builtin(tmp_path, monkeypatch):
  """builtin_benchmark_dir generating one tiny category under tmp_path; the list of the
  generator's (root, keyword arguments) calls."""
  monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path))
  calls = []
  real = builtin.generate_builtin_benchmark

  def tiny_generate(root, **kwargs):
    calls.append((root, kwargs))
    return real(root, categories=["brick"], num_train=1, num_test=2, **kwargs)

  monkeypatch.setattr(builtin, "generate_builtin_benchmark", tiny_generate)
  return calls


def test_builtin_benchmark_dir_generates_once(tmp_path, tiny_builtin):
  root = builtin.builtin_benchmark_dir()
  assert root == tmp_path / "builtin_benchmark_v1"
  assert mvtec.list_categories(root) == ["brick"]
  assert builtin.builtin_benchmark_dir() == root and len(tiny_builtin) == 1


def test_builtin_benchmark_dir_per_seed(tmp_path, tiny_builtin):
  seed0, seed2 = builtin.builtin_benchmark_dir(), builtin.builtin_benchmark_dir(seed=2)
  assert seed0 == tmp_path / "builtin_benchmark_v1"
  assert seed2 == tmp_path / "builtin_benchmark_v1_seed2"
  assert [kwargs.get("seed", 0) for _, kwargs in tiny_builtin] == [0, 2]
  hard2 = builtin.builtin_benchmark_dir("hard", seed=2)
  assert hard2 == tmp_path / "builtin_hard_benchmark_v1_seed2"
  assert tiny_builtin[-1][1] == {"seed": 2, "variant": "hard"}
  # Another seed draws other images; the same seed the same bytes.
  a = (seed0 / "brick" / "train" / "good").iterdir()
  b = (seed2 / "brick" / "train" / "good").iterdir()
  assert [f.read_bytes() for f in sorted(a)] != [f.read_bytes() for f in sorted(b)]
  for bad in (-1, 1.5, True, "1"):
    with pytest.raises(ValueError, match="seed"):
      builtin.builtin_benchmark_dir(seed=bad)
