"""PatchCore's locally aware patch features against a float64 NumPy / SciPy reference.

The reference is written from the definitions: torch.nn.AvgPool2d(p, 1, p // 2) with
count_include_pad=True is SciPy's uniform_filter with zero ("constant") padding (the
window sum divided by p^2 everywhere); bilinear resizing is tests/numpy_reference's
loop over output pixels (torch align_corners=False); torch's adaptive_avg_pool1d
averages channels [floor(i D / E), ceil((i + 1) D / E)) into output channel i.
"""

import math

import numpy as np
import numpy_reference as reference
import pytest
from scipy import ndimage

import spade_jax
from spade_jax.features import patches


def _levels(rng, n=2):
  """Three levels on 12x10, 6x5 and 3x3 grids (odd sizes, non-square)."""
  return {"layer1": rng.normal(size=(n, 12, 10, 3)).astype(np.float32),
          "layer2": rng.normal(size=(n, 6, 5, 4)).astype(np.float32),
          "layer3": rng.normal(size=(n, 3, 3, 5)).astype(np.float32)}


def reference_avg_pool(x, p):
  """[N, h, w, C] -> AvgPool2d(p, 1, p // 2, count_include_pad=True), float64."""
  return ndimage.uniform_filter(x.astype(np.float64), size=(1, p, p, 1), mode="constant",
                                cval=0.0)


def reference_adaptive_avg(x, out):
  """[..., D] -> torch F.adaptive_avg_pool1d over the last axis, float64."""
  dim = x.shape[-1]
  cols = [x[..., math.floor(i * dim / out):math.ceil((i + 1) * dim / out)].mean(-1)
          for i in range(out)]
  return np.stack(cols, -1)


def reference_patch_features(levels, layers, p, embed_dim=None):
  grid = max((levels[l].shape[1:3] for l in layers), key=lambda s: s[0] * s[1])
  parts = []
  for l in layers:
    pooled = reference_avg_pool(levels[l], p)
    parts.append(np.stack([reference.bilinear(img, *grid) for img in pooled]))
  out = np.concatenate(parts, -1)
  if embed_dim is not None and out.shape[-1] > embed_dim:
    out = reference_adaptive_avg(out, embed_dim)
  return out


def test_avg_pool_reference_is_torchs_count_include_pad():
  # A hand-computed corner: 3x3 window over a 2x2 map of ones holds 4 ones and 5 zeros
  # of padding; count_include_pad=True divides by 9, not by 4.
  x = np.ones((1, 2, 2, 1), np.float32)
  np.testing.assert_allclose(reference_avg_pool(x, 3)[0, :, :, 0], np.full((2, 2), 4 / 9))
  out = spade_jax.patch_features({"a": x}, ["a"], patch_size=3)
  np.testing.assert_allclose(np.asarray(out)[0, :, :, 0], np.full((2, 2), 4 / 9), rtol=1e-6)


@pytest.mark.parametrize("layers", [("layer2", "layer3"), ("layer1", "layer2", "layer3"),
                                    ("layer3", "layer1")])
@pytest.mark.parametrize("p", [1, 3, 5])
def test_matches_reference(layers, p):
  levels = _levels(np.random.default_rng(0))
  out = spade_jax.patch_features(levels, layers, patch_size=p)
  ref = reference_patch_features(levels, layers, p)
  assert out.shape == ref.shape and out.dtype == np.float32
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


def test_patch_size_one_is_resize_and_concatenation_only():
  levels = _levels(np.random.default_rng(1))
  out = np.asarray(spade_jax.patch_features(levels, ["layer1", "layer2"], patch_size=1))
  np.testing.assert_array_equal(out[..., :3], levels["layer1"])  # The grid level as it is.
  up = np.stack([reference.bilinear(img, 12, 10) for img in levels["layer2"]])
  np.testing.assert_allclose(out[..., 3:], up, rtol=1e-6, atol=1e-6)


def test_adaptive_avg_reduction_matches_torch_semantics():
  levels = _levels(np.random.default_rng(2))
  for embed_dim in (5, 7, 11):  # D = 12: bins of unequal width, overlapping bins.
    out = spade_jax.patch_features(levels, ["layer1", "layer2", "layer3"], embed_dim=embed_dim)
    ref = reference_patch_features(levels, ["layer1", "layer2", "layer3"], 3, embed_dim)
    assert out.shape[-1] == embed_dim
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
  # Overlapping bins: D = 5 -> 3 averages channels {0, 1}, {1, 2, 3}, {3, 4}.
  np.testing.assert_allclose(patches.adaptive_avg_matrix(5, 3).T,
                             [[.5, .5, 0, 0, 0], [0, 1 / 3, 1 / 3, 1 / 3, 0], [0, 0, 0, .5, .5]],
                             rtol=1e-6)


def test_embed_dim_at_least_the_channels_keeps_them():
  levels = _levels(np.random.default_rng(3))
  plain = spade_jax.patch_features(levels, ["layer1", "layer3"])
  for embed_dim in (8, 1024):
    same = spade_jax.patch_features(levels, ["layer1", "layer3"], embed_dim=embed_dim,
                                    reduction="random_projection")
    np.testing.assert_array_equal(np.asarray(same), np.asarray(plain))


def test_random_projection_is_fixed_by_its_seed():
  levels = _levels(np.random.default_rng(4))
  layers = ["layer1", "layer2", "layer3"]
  out = np.asarray(spade_jax.patch_features(levels, layers, embed_dim=6,
                                            reduction="random_projection", seed=7))
  mat = patches.random_projection_matrix(12, 6, 7)
  # Entries +-1/sqrt(E), both signs present; a NumPy Philox stream reproduces them.
  np.testing.assert_array_equal(np.abs(mat), np.full((12, 6), 1 / np.sqrt(6), np.float32))
  bits = np.random.Philox(7).random_raw(72) & 1
  np.testing.assert_array_equal(np.sign(mat).ravel(), 2.0 * bits - 1.0)
  ref = reference_patch_features(levels, layers, 3) @ mat.astype(np.float64)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  other = patches.random_projection_matrix(12, 6, 8)
  assert not np.array_equal(mat, other)


def test_extra_levels_are_ignored_and_order_is_kept():
  rng = np.random.default_rng(5)
  levels = {**_levels(rng), "pool": rng.normal(size=(2, 7)).astype(np.float32)}
  a = np.asarray(spade_jax.patch_features(levels, ["layer2", "layer3"]))
  b = np.asarray(spade_jax.patch_features(levels, ["layer3", "layer2"]))
  np.testing.assert_array_equal(a[..., :4], b[..., 5:])
  np.testing.assert_array_equal(a[..., 4:], b[..., :5])


@pytest.mark.parametrize("kwargs,message", [
    ({"patch_size": 2}, "patch_size"), ({"patch_size": 0}, "patch_size"),
    ({"patch_size": 3.0}, "patch_size"), ({"embed_dim": 0}, "embed_dim"),
    ({"reduction": "pca"}, "reduction"), ({"seed": -1}, "seed"),
    ({"layers": []}, "layers"), ({"layers": "layer1"}, "layers"),
    ({"layers": ["layer1", "layer1"]}, "duplicates"), ({"layers": ["layer9"]}, "layer9"),
])
def test_validation(kwargs, message):
  levels = _levels(np.random.default_rng(6))
  args = {"layers": ["layer1", "layer2"], **kwargs}
  with pytest.raises(ValueError, match=message):
    spade_jax.patch_features(levels, **args)


def test_bad_levels():
  rng = np.random.default_rng(7)
  with pytest.raises(ValueError, match=r"levels\['a'\].*\[N, h, w, C\]"):
    spade_jax.patch_features({"a": np.zeros((2, 3, 3), np.float32)}, ["a"])
  with pytest.raises(ValueError, match="holds 3 images"):
    spade_jax.patch_features({"a": rng.normal(size=(2, 4, 4, 1)),
                              "b": rng.normal(size=(3, 2, 2, 1))}, ["a", "b"])
  with pytest.raises(ValueError, match="real numbers"):
    spade_jax.patch_features({"a": np.zeros((1, 2, 2, 1), np.complex64)}, ["a"])


# The "per_level" reduction: patchcore-inspection's Preprocessing and Aggregator.


def reference_unfold(x, p):
  """[N, h, w, C] -> [N, h, w, C, p, p]: torch.nn.Unfold(p, padding=p // 2) per
  position (zeros beyond the border), float64."""
  n, h, w, c = x.shape
  r = p // 2
  padded = np.pad(x.astype(np.float64), ((0, 0), (r, r), (r, r), (0, 0)))
  out = np.zeros((n, h, w, c, p, p))
  for i in range(p):
    for j in range(p):
      out[..., i, j] = padded[:, i:i + h, j:j + w, :]
  return out


def reference_per_level(levels, layers, p, embed_dim):
  """patchcore-inspection's PatchCore._embed, float64: each level unfolded (PatchMaker),
  resized to the grid per unfolded entry (F.interpolate bilinear, align_corners=False),
  flattened [C, p, p] and adaptive-average-pooled to E (MeanMapper), the levels stacked
  and pooled together to E (Aggregator)."""
  grid = max((levels[l].shape[1:3] for l in layers), key=lambda s: s[0] * s[1])
  pooled = []
  for l in layers:
    unfolded = reference_unfold(levels[l], p)
    resized = np.stack([reference.bilinear(img, *grid) for img in unfolded])
    pooled.append(reference_adaptive_avg(resized.reshape(*resized.shape[:3], -1), embed_dim))
  stacked = np.stack(pooled, axis=-2)  # [N, H, W, levels, E], as torch.stack(dim=1).
  return reference_adaptive_avg(stacked.reshape(*stacked.shape[:3], -1), embed_dim)


@pytest.mark.parametrize("layers,p,embed_dim", [
    (("layer1", "layer2", "layer3"), 3, 5), (("layer1", "layer2", "layer3"), 1, 7),
    (("layer1", "layer2", "layer3"), 5, 11), (("layer2", "layer3"), 3, 8),
    (("layer3", "layer1"), 3, 4), (("layer1", "layer2"), 3, 6)])
def test_per_level_matches_patchcore_inspection_reference(layers, p, embed_dim):
  # Bins of unequal width, overlapping bins, and levels pooled up (C p^2 < E).
  levels = _levels(np.random.default_rng(8))
  out = spade_jax.patch_features(levels, layers, patch_size=p, embed_dim=embed_dim,
                                 reduction="per_level")
  ref = reference_per_level(levels, layers, p, embed_dim)
  assert out.shape == ref.shape and out.shape[-1] == embed_dim and out.dtype == np.float32
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


def test_per_level_on_wide_resnet_like_levels_by_hand():
  # WRN50's layer2 (512 ch) and layer3 (1024) to E = 1024, scaled down to 2 and 4
  # channels to E = 4, on one grid: the same 4.5 and 9 unfolded entries per output.
  rng = np.random.default_rng(9)
  b = rng.normal(size=(2, 5, 4, 2)).astype(np.float32)
  c = rng.normal(size=(2, 5, 4, 4)).astype(np.float32)
  out = np.asarray(spade_jax.patch_features({"b": b, "c": c}, ["b", "c"], embed_dim=4,
                                            reduction="per_level"))
  window = reference_unfold(b, 3).reshape(2, 5, 4, 2, 9)
  # Level b: outputs 0, 1 are its channels' 3 x 3 windows, weights 1/10, the centre 2/10.
  centre_weighted = (window.sum(-1) + window[..., 4]) / 10
  np.testing.assert_allclose(out[..., :2], centre_weighted, rtol=1e-5, atol=1e-6)
  # Level c: outputs 2, 3 are means of two channels' zero-padded 3 x 3 means.
  means = reference_avg_pool(c, 3)
  np.testing.assert_allclose(out[..., 2:], (means[..., 0::2] + means[..., 1::2]) / 2,
                             rtol=1e-5, atol=1e-6)
  # "adaptive_avg" pools the 6 concatenated channels: c, with 2/3 of them, takes 2/3
  # of the outputs (4 -> outputs 1-3 depend on c, only 0-1 on b).
  concat = np.asarray(spade_jax.patch_features({"b": b, "c": np.zeros_like(c)}, ["b", "c"],
                                               embed_dim=4, reduction="adaptive_avg"))
  assert np.abs(concat[..., :2]).min() > 0 and np.all(concat[..., 2:] == 0)
  level_b_only = np.asarray(spade_jax.patch_features(
      {"b": b, "c": np.zeros_like(c)}, ["b", "c"], embed_dim=4, reduction="per_level"))
  assert np.abs(level_b_only[..., :2]).min() > 0 and np.all(level_b_only[..., 2:] == 0)


def test_no_reduction_at_or_below_embed_dim_whatever_the_reduction():
  # D = 9 <= E: the p x p means, resized and concatenated, for every reduction.
  levels = _levels(np.random.default_rng(10))
  layers = ["layer2", "layer3"]
  plain = np.asarray(spade_jax.patch_features(levels, layers))
  for reduction in patches.REDUCTIONS:
    for embed_dim in (9, 16, None):
      out = spade_jax.patch_features(levels, layers, embed_dim=embed_dim, reduction=reduction)
      np.testing.assert_array_equal(np.asarray(out), plain)


@pytest.mark.parametrize("dim_in,dim_out", [(12, 5), (12, 4), (7, 7), (5, 3), (3, 8),
                                            (4608, 1024), (2048, 1024)])
def test_adaptive_avg_pool_is_torchs(dim_in, dim_out):
  x = np.random.default_rng(dim_in).normal(size=(3, dim_in)).astype(np.float32)
  out = np.asarray(patches.adaptive_avg_pool(x, dim_out))
  np.testing.assert_allclose(out, reference_adaptive_avg(x, dim_out), rtol=1e-5, atol=1e-6)
  # The same numbers as the dense matrix of "adaptive_avg".
  np.testing.assert_allclose(out, x @ patches.adaptive_avg_matrix(dim_in, dim_out),
                             rtol=1e-5, atol=1e-6)
  index, weight = patches.adaptive_avg_bins(dim_in, dim_out)
  assert index.shape == weight.shape and index.shape[0] <= -(-dim_in // dim_out) + 1
  np.testing.assert_allclose(weight.sum(0), 1.0, rtol=1e-6)
