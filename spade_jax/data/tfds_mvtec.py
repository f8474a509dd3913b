"""tensorflow-datasets builder `mvtec_ad`, usable without TensorFlow.

Importing this module registers `mvtec_ad` with tfds. The data are a manual
download: extract MVTec AD (or any folder in its layout, see `spade_jax.data.mvtec`)
and point `manual_dir` at the extracted folder. Prepare with
file_format='array_record' and read through `tfds.data_source` (random access,
NumPy, no TensorFlow needed):

  from spade_jax.data import tfds_mvtec  # registers mvtec_ad
  dl = tfds.download.DownloadConfig(manual_dir="/data/mvtec_anomaly_detection")
  test = tfds.data_source(
      "mvtec_ad/bottle", split="test", data_dir="/data/tfds",
      builder_kwargs={"file_format": "array_record"},
      download_and_prepare_kwargs={"download_config": dl})
  test[0]["image"]  # [H, W, 3] uint8

One BuilderConfig per official category. Any other category folder of the manual
dir is reached with a custom config: builder_kwargs={"config":
mvtec_ad_config("my_part"), ...}; `load_category_tfds` does all of this.

Images are stored as PNG encoded with PIL (lossless: grayscale images already
converted to RGB, masks already binarized to {0, 1}), so the builder runs without
TensorFlow and gives exactly the pixels of `mvtec.load_category`. Prepared data in
data_dir are reused as they are: delete <data_dir>/mvtec_ad/<category> if the
manual dir changed.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pathlib
import re

from etils import epath
import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from spade_jax.data import mvtec

_DESCRIPTION = """\
MVTec AD: 15 categories (5 textures, 10 objects) of industrial images; train holds
normal images only, test holds normal and anomalous images with pixel masks.
"""
_CITATION = """\
@inproceedings{bergmann2019mvtec,
  title={MVTec AD -- A Comprehensive Real-World Dataset for Unsupervised Anomaly Detection},
  author={Bergmann, Paul and Fauser, Michael and Sattlegger, David and Steger, Carsten},
  booktitle={CVPR}, year={2019}}
"""
_MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download mvtec_anomaly_detection.tar.xz from
https://www.mvtec.com/company/research/datasets/mvtec-ad (registration required),
extract it and pass the extracted folder (the one holding bottle/, cable/, ...) as
manual_dir. Any folder in the same layout works:
<manual_dir>/<category>/train/good/*.png, <manual_dir>/<category>/test/<defect>/*.png,
<manual_dir>/<category>/ground_truth/<defect>/<name>_mask.png.
"""
LABEL_NAMES = ("good", "anomalous")
_CONFIG_NAME = re.compile(r"[\w+\-.]+")


@dataclasses.dataclass
class MvtecAdConfig(tfds.core.BuilderConfig):
  """One category; the config name is the category folder's name."""


def _png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  PIL.Image.fromarray(array).save(buffer, format="png")
  return buffer.getvalue()


class MvtecAd(tfds.core.GeneratorBasedBuilder):
  """MVTec AD, one config per category; examples keyed by their relative path."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release: PNG image, {0,1} mask, label, defect_type."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = [
      MvtecAdConfig(name=name, description=f"MVTec AD category {name}.")
      for name in mvtec.MVTEC_CATEGORIES]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds' default probes the `importlib_resources` backport for builders inside a
    # package, and that backport is only installed on Python < 3.9.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo directly: dataset_info_from_configs wants a per-dataset folder.
    return tfds.core.DatasetInfo(
        builder=self,
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
            "label": tfds.features.ClassLabel(names=LABEL_NAMES),
            "defect_type": tfds.features.Text(),
            "filename": tfds.features.Text(),
        }),
        homepage="https://www.mvtec.com/company/research/datasets/mvtec-ad",
        citation=_CITATION)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    files = mvtec.scan_category(dl_manager.manual_dir, self.builder_config.name)
    return {"train": self._generate_examples(files, "train"),
            "test": self._generate_examples(files, "test")}

  def _generate_examples(self, files: mvtec.CategoryFiles, split: str):
    if split == "train":
      for path in files.train:
        image = mvtec.read_rgb(path)
        yield files.relative(path), self._example(
            image, np.zeros(image.shape[:2], np.uint8), mvtec.GOOD, files.relative(path))
    else:
      for item in files.test:
        image, mask = mvtec.read_test_example(item)
        yield files.relative(item.path), self._example(
            image, mask, item.defect, files.relative(item.path))

  @staticmethod
  def _example(image, mask, defect, filename):
    return {"image": _png(image), "mask": _png(mask), "label": int(defect != mvtec.GOOD),
            "defect_type": defect, "filename": filename}


def mvtec_ad_config(category: str) -> MvtecAdConfig | str:
  """The config for `category`: its name if official, else a custom MvtecAdConfig."""
  if category in mvtec.MVTEC_CATEGORIES:
    return category
  if not _CONFIG_NAME.fullmatch(category):
    raise ValueError(f"category {category!r} cannot be a tfds config name: use letters, "
                     "digits, '_', '-', '+', '.' only")
  return MvtecAdConfig(name=category, description=f"Custom category {category}.")


def prepare(manual_dir: mvtec.PathLike, category: str,
            data_dir: mvtec.PathLike) -> MvtecAd:
  """Builds (once) `category` from `manual_dir` into `data_dir` as array_record."""
  builder = MvtecAd(config=mvtec_ad_config(category), data_dir=os.fspath(data_dir),
                    file_format="array_record")
  if builder.is_prepared():
    return builder
  mvtec.scan_category(manual_dir, category)  # Clear errors before tfds gets involved.
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=os.fspath(pathlib.Path(manual_dir))))
  return builder


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def load_category_tfds(manual_dir: mvtec.PathLike, category: str,
                       data_dir: mvtec.PathLike, *,
                       resize: int | None = None) -> mvtec.CategoryData:
  """`mvtec.load_category`, but through the tfds builder and tfds data sources.

  Args:
    manual_dir: folder in MVTec layout holding `category`.
    category: category folder name (official or not).
    data_dir: where tfds writes / finds the prepared array_record files.
    resize: as in `mvtec.load_category`.

  Returns:
    The same CategoryData as mvtec.load_category(manual_dir, category, resize=resize).
  """
  builder = prepare(manual_dir, category, data_dir)
  splits = {}
  for split in ("train", "test"):
    source = builder.as_data_source(split=split)
    examples = [source[i] for i in range(len(source))]
    # tfds stores examples in hashed-key order; restore the folder reader's order.
    examples.sort(key=lambda ex: _sort_key(_text(ex["filename"])))
    splits[split] = examples
  train, test = splits["train"], splits["test"]
  train_images = [ex["image"] for ex in train]
  test_images = [ex["image"] for ex in test]
  test_masks = [ex["mask"][..., 0] for ex in test]
  if resize is not None:
    train_images = [mvtec.resize_image(x, resize) for x in train_images]
    test_images = [mvtec.resize_image(x, resize) for x in test_images]
    test_masks = [mvtec.resize_mask(x, resize) for x in test_masks]
  train_paths = [_text(ex["filename"]) for ex in train]
  test_paths = [_text(ex["filename"]) for ex in test]
  return mvtec.CategoryData(
      category=category,
      train_images=mvtec.stack_split(train_images, train_paths, f"{category} train"),
      test_images=mvtec.stack_split(test_images, test_paths, f"{category} test"),
      test_labels=np.array([int(ex["label"]) for ex in test], np.int32),
      test_masks=mvtec.stack_split(test_masks, test_paths, f"{category} test masks"),
      test_defects=[_text(ex["defect_type"]) for ex in test],
      test_paths=test_paths,
      train_paths=train_paths)


def _sort_key(relative_path: str) -> tuple[str, ...]:
  """'test/<defect>/<name>' -> (defect, name): the order of mvtec.scan_category."""
  return tuple(relative_path.split("/"))
