"""The tfds builder `mvtec_ad` gives what the folder reader gives, without TensorFlow."""

import importlib.util

from mvtec_fixtures import write_category
import numpy as np
import pytest

from spade_jax.data import mvtec

tfds = pytest.importorskip("tensorflow_datasets")
from spade_jax.data import tfds_mvtec  # noqa: E402  (only where tfds is installed)


def _assert_same(a: mvtec.CategoryData, b: mvtec.CategoryData):
  assert a.category == b.category
  assert a.train_paths == b.train_paths and a.test_paths == b.test_paths
  assert a.test_defects == b.test_defects
  for field in ("train_images", "test_images", "test_labels", "test_masks"):
    x, y = getattr(a, field), getattr(b, field)
    assert x.dtype == y.dtype and x.shape == y.shape, field
    np.testing.assert_array_equal(x, y, err_msg=field)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  root = tmp_path_factory.mktemp("mvtec")
  write_category(root, "bottle", seed=1)  # An official name: a registered config.
  write_category(root, "grid", gray=True, seed=2)  # Grayscale, like MVTec's grid.
  write_category(root, "my-part", defects={"scratch": 2, "dent": 2}, seed=3)  # Custom.
  return root


def test_runs_without_tensorflow():
  assert importlib.util.find_spec("tensorflow") is None  # The point of this builder.


@pytest.mark.parametrize("category", ["bottle", "grid", "my-part"])
def test_same_as_folder_reader(tree, tmp_path, category):
  via_tfds = tfds_mvtec.load_category_tfds(tree, category, tmp_path / "tfds")
  _assert_same(mvtec.load_category(tree, category), via_tfds)
  assert via_tfds.test_masks.max() == 1
  # Several regions in one mask survive the round trip.
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  assert max(ndimage.label(m)[1] for m in via_tfds.test_masks) == 2
  # Prepared data are reused; resize= applies as in the folder reader.
  _assert_same(mvtec.load_category(tree, category, resize=16),
               tfds_mvtec.load_category_tfds(tree, category, tmp_path / "tfds", resize=16))


def test_data_source_by_name(tree, tmp_path):
  dl = tfds.download.DownloadConfig(manual_dir=str(tree))
  test = tfds.data_source(
      "mvtec_ad/grid", split="test", data_dir=str(tmp_path),
      builder_kwargs={"file_format": "array_record"},
      download_and_prepare_kwargs={"download_config": dl})
  assert len(test) == 5
  ex = test[0]
  assert ex["image"].shape == (32, 40, 3) and ex["image"].dtype == np.uint8
  assert ex["mask"].shape == (32, 40, 1) and ex["mask"].dtype == np.uint8
  assert set(ex) == {"image", "mask", "label", "defect_type", "filename"}
  builder = tfds.builder("mvtec_ad/grid", data_dir=str(tmp_path))
  assert builder.info.features["label"].names == ["good", "anomalous"]
  assert builder.info.splits["train"].num_examples == 3


def test_custom_config_through_builder_kwargs(tree, tmp_path):
  dl = tfds.download.DownloadConfig(manual_dir=str(tree))
  train = tfds.data_source(
      "mvtec_ad", split="train", data_dir=str(tmp_path),
      builder_kwargs={"file_format": "array_record",
                      "config": tfds_mvtec.mvtec_ad_config("my-part")},
      download_and_prepare_kwargs={"download_config": dl})
  assert len(train) == 3


def test_errors_are_the_folder_readers(tree, tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    tfds_mvtec.load_category_tfds(tmp_path / "missing", "bottle", tmp_path / "tfds")
  broken = tmp_path / "broken"
  write_category(broken, "part")
  (broken / "part" / "ground_truth" / "hole" / "000_mask.png").unlink()
  with pytest.raises(FileNotFoundError, match="has no mask"):
    tfds_mvtec.load_category_tfds(broken, "part", tmp_path / "tfds")
  with pytest.raises(ValueError, match="tfds config name"):
    tfds_mvtec.mvtec_ad_config("bad name")


def test_corrupt_png_leaves_no_prepared_data(tmp_path):
  root = tmp_path / "mvtec"
  write_category(root, "part")
  bad = root / "part" / "test" / "good" / "001.png"
  good_bytes = bad.read_bytes()
  bad.write_bytes(good_bytes[:60])
  with pytest.raises(ValueError, match="cannot decode image file") as e:
    tfds_mvtec.load_category_tfds(root, "part", tmp_path / "tfds")
  assert str(bad) in str(e.value)
  builder = tfds_mvtec.MvtecAd(config=tfds_mvtec.mvtec_ad_config("part"),
                               data_dir=str(tmp_path / "tfds"), file_format="array_record")
  assert not builder.is_prepared()
  bad.write_bytes(good_bytes)  # Fixed: a rerun prepares it.
  assert len(tfds_mvtec.load_category_tfds(root, "part", tmp_path / "tfds").test_paths) == 5
