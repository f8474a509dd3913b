"""preprocess / preprocess_masks against torchvision goldens, shapes and errors."""

import pathlib

import numpy as np
import pytest
import skimage.data

import spade_jax

GOLDENS = pathlib.Path(__file__).parent / "goldens"


@pytest.fixture(scope="module")
def golden():
  with np.load(GOLDENS / "preprocess.npz", allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


@pytest.mark.parametrize("photo, resize, crop", [("chelsea", 64, 56), ("coffee", 50, 37)])
def test_matches_torchvision(golden, photo, resize, crop):
  out = spade_jax.preprocess(getattr(skimage.data, photo)(), resize=resize, crop=crop)
  assert out.shape == (1, crop, crop, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out[0], golden[f"{photo}_{resize}_{crop}"], atol=1e-6)


def test_masks_match_torchvision(golden):
  mask = np.where(skimage.data.chelsea()[..., 0] > 128, 255, 0).astype(np.uint8)
  out = spade_jax.preprocess_masks(mask, resize=64, crop=56)
  assert out.shape == (1, 56, 56) and out.dtype == np.bool_
  np.testing.assert_array_equal(out[0], golden["mask_64_56"] > 0)
  # bool input and a trailing channel axis give the same result.
  np.testing.assert_array_equal(spade_jax.preprocess_masks(mask[None, ..., None] > 0, 64, 56), out)


def test_defaults_and_batching():
  photo = skimage.data.chelsea()  # 300 x 451
  batch = spade_jax.preprocess(np.stack([photo, photo[:, ::-1]]))
  assert batch.shape == (2, 224, 224, 3)
  listed = spade_jax.preprocess([photo, skimage.data.coffee()])  # Different sizes.
  assert listed.shape == (2, 224, 224, 3)
  np.testing.assert_array_equal(listed[0], batch[0])


def test_no_resize_no_crop_is_just_normalization():
  image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  out = spade_jax.preprocess(image, resize=None, crop=None)
  want = (image / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
  np.testing.assert_allclose(out[0], want, rtol=1e-5, atol=1e-6)


def test_constant_image_stays_constant():
  image = np.full((31, 47, 3), 200, np.uint8)
  out = spade_jax.preprocess(image, resize=20, crop=16)
  assert out.shape == (1, 16, 16, 3)
  np.testing.assert_allclose(out, np.broadcast_to(out[:1, :1, :1], out.shape), atol=1e-6)


@pytest.mark.parametrize("images, match", [
    (np.zeros((8, 8), np.uint8), "rank 3 or 4"),
    (np.zeros((1, 1, 8, 8, 3), np.uint8), "rank 3 or 4"),
    (np.zeros((8, 8, 4), np.uint8), "3 channels"),
    (np.zeros((2, 8, 8, 1), np.uint8), "3 channels"),
    (np.zeros((8, 8, 3), np.float32), "uint8"),
    ([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8)], r"images_uint8\[1\]"),
    ([], "empty"),
])
def test_bad_images(images, match):
  with pytest.raises(ValueError, match=match):
    spade_jax.preprocess(images, resize=8, crop=8)


@pytest.mark.parametrize("kwargs, match", [
    ({"resize": 0}, "resize must be"), ({"crop": 2.5}, "crop must be"),
    ({"resize": 8, "crop": 9}, "larger than the resized image"),
])
def test_bad_sizes(kwargs, match):
  with pytest.raises(ValueError, match=match):
    spade_jax.preprocess(np.zeros((8, 8, 3), np.uint8), **kwargs)


@pytest.mark.parametrize("masks, match", [
    (np.zeros((8,), np.uint8), "rank 2 or 3"),
    (np.zeros((8, 8), np.float32), "bool or uint8"),
    (np.zeros((1, 8, 8, 2), np.uint8), "rank 2 or 3"),
])
def test_bad_masks(masks, match):
  with pytest.raises(ValueError, match=match):
    spade_jax.preprocess_masks(masks, resize=8, crop=8)
