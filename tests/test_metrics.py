"""Metrics vs scikit-learn and vs a slow, literal implementation of MVTec's AU-PRO."""

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from spade_jax.evaluation import metrics


def _au_pro_slow(masks, maps, fpr_limit):
  """The definition, one threshold at a time: every distinct score t, positives are
  score >= t; PRO = mean over all regions (8-connected) of the covered fraction; FPR =
  fraction of anomaly-free pixels above; curve from (0, 0) to (1, 1); area of the
  piecewise-linear curve on [0, fpr_limit] divided by fpr_limit."""
  regions = []
  for i, mask in enumerate(masks):
    labeled, n = ndimage.label(mask, structure=np.ones((3, 3)))
    regions += [(i, labeled == r) for r in range(1, n + 1)]
  ok = ~masks.astype(bool)
  xs, ys = [0.0], [0.0]
  for t in np.unique(maps)[::-1]:
    above = maps >= t
    ys.append(np.mean([above[i][region].mean() for i, region in regions]))
    xs.append(above[ok].mean())
  xs.append(1.0)
  ys.append(1.0)
  area = 0.0
  for x0, x1, y0, y1 in zip(xs[:-1], xs[1:], ys[:-1], ys[1:]):
    if x0 >= fpr_limit:
      break
    if x1 > fpr_limit:
      y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
      x1 = fpr_limit
    area += (x1 - x0) * (y0 + y1) / 2
  return area / fpr_limit


def _random_masks(rng, n, h, w, blobs=3):
  masks = np.zeros((n, h, w), bool)
  for i in range(n):
    for _ in range(rng.integers(0, blobs + 1)):  # Some images have no defect.
      y, x = rng.integers(0, h - 2), rng.integers(0, w - 2)
      masks[i, y:y + rng.integers(1, 4), x:x + rng.integers(1, 5)] = True
    masks[i, rng.integers(0, h), rng.integers(0, w)] = True  # Single-pixel regions.
  return masks


@pytest.mark.parametrize("seed", range(4))
def test_image_auroc_matches_sklearn(seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, 40)
  labels[:2] = [0, 1]
  scores = rng.standard_normal(40)
  if seed % 2:
    scores = np.round(scores, 1)  # Many ties.
  assert metrics.image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores),
                                                              abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_pixel_auroc_matches_sklearn(seed):
  rng = np.random.default_rng(seed)
  masks = _random_masks(rng, 4, 16, 20)
  maps = rng.standard_normal(masks.shape).astype(np.float32) + masks
  if seed == 2:
    maps = np.round(maps, 1)
  ref = roc_auc_score(masks.ravel(), maps.ravel())
  assert metrics.pixel_auroc(masks, maps) == pytest.approx(ref, abs=1e-12)


@pytest.mark.parametrize("seed,fpr_limit,quantize", [
    (0, 0.3, False), (1, 0.3, True), (2, 0.05, False), (3, 1.0, True), (4, 0.3, True)])
def test_au_pro_matches_definition(seed, fpr_limit, quantize):
  rng = np.random.default_rng(seed)
  masks = _random_masks(rng, 3, 14, 17, blobs=4)
  maps = rng.random(masks.shape) + 0.6 * masks
  if quantize:
    maps = np.round(maps * 8) / 8  # Ties between defect and normal pixels.
  got = metrics.au_pro(masks, maps, fpr_limit=fpr_limit)
  assert got == pytest.approx(_au_pro_slow(masks, maps, fpr_limit), abs=1e-10)


def test_au_pro_eight_connectivity():
  # Two diagonal pixels are one region (8-connected), not two.
  masks = np.zeros((1, 4, 4), bool)
  masks[0, 0, 0] = masks[0, 1, 1] = True
  maps = np.zeros((1, 4, 4))
  maps[0, 0, 0] = 1.0  # Covers half of the single region.
  fprs, pros = metrics.pro_curve(masks, maps)
  np.testing.assert_allclose(pros[:2], [0.0, 0.5])
  np.testing.assert_allclose(fprs[:2], [0.0, 0.0])


def test_au_pro_hand_computed():
  # One 1x4 image, mask [1 0 0 0], scores [.5 .5 .2 .1]. Thresholds: 0.5 (a defect
  # and a normal pixel tie: one point) -> (FPR 1/3, PRO 1); 0.2 -> (2/3, 1);
  # 0.1 -> (1, 1). Curve (0,0) (1/3,1) (2/3,1) (1,1) (1,1). At FPR 0.3 the first
  # segment gives PRO 0.9: area 0.5 * 0.9 * 0.3 = 0.135, / 0.3 = 0.45.
  masks = np.array([[[1, 0, 0, 0]]])
  maps = np.array([[[0.5, 0.5, 0.2, 0.1]]])
  assert metrics.au_pro(masks, maps) == pytest.approx(0.45)
  fprs, pros = metrics.pro_curve(masks, maps)
  np.testing.assert_allclose(fprs, [0, 1 / 3, 2 / 3, 1, 1])
  np.testing.assert_allclose(pros, [0, 1, 1, 1, 1])
  # Two regions in one row, [1 0 0 1 1], scores [.2 .9 .1 .8 .3]: the curve is flat at
  # 0 up to FPR 0.5, then PRO 1 -> AU-PRO(0.3) = 0, AU-PRO(0.75) = 0.25 / 0.75.
  masks = np.array([[[1, 0, 0, 1, 1]]])
  maps = np.array([[[0.2, 0.9, 0.1, 0.8, 0.3]]])
  assert metrics.au_pro(masks, maps) == 0.0
  assert metrics.au_pro(masks, maps, fpr_limit=0.75) == pytest.approx(1 / 3)
  assert metrics.au_pro(masks, maps, fpr_limit=1.0) == pytest.approx(0.5)


def test_perfect_and_inverted_maps():
  rng = np.random.default_rng(5)
  masks = _random_masks(rng, 3, 10, 10)
  assert metrics.au_pro(masks, masks.astype(float)) == pytest.approx(1.0)
  assert metrics.pixel_auroc(masks, masks.astype(float)) == 1.0
  assert metrics.pixel_auroc(masks, -masks.astype(float)) == 0.0


@pytest.mark.parametrize("call,match", [
    (lambda m, s: metrics.pixel_auroc(m, s[:, :-1]), "differs from maps shape"),
    (lambda m, s: metrics.au_pro(m, s[..., :-1]), "differs from maps shape"),
    (lambda m, s: metrics.au_pro(np.zeros_like(m), s), "at least one anomalous region"),
    (lambda m, s: metrics.au_pro(np.ones_like(m), s), "anomaly-free"),
    (lambda m, s: metrics.pixel_auroc(np.zeros_like(m), s), "both anomalous and normal"),
    (lambda m, s: metrics.au_pro(m, s * np.nan), "NaN"),
    (lambda m, s: metrics.au_pro(m * 2, s), "binary"),
    (lambda m, s: metrics.au_pro(m, s, fpr_limit=0.0), "fpr_limit"),
    (lambda m, s: metrics.image_auroc([0, 1], [0.5]), r"\[N\]"),
    (lambda m, s: metrics.image_auroc([1, 1], [0.5, 0.2]), "both anomalous and normal"),
])
def test_bad_input(call, match):
  rng = np.random.default_rng(6)
  masks = _random_masks(rng, 2, 6, 6)
  with pytest.raises(ValueError, match=match):
    call(masks, rng.random(masks.shape))


def test_float32_fast_sort_matches_argsort_path_with_ties_and_signed_zeros():
  rng = np.random.default_rng(7)
  masks = np.zeros((3, 20, 20), bool)
  masks[0, 2:6, 3:9] = masks[1, 10:12, 10:18] = masks[2, 15:19, 1:4] = True
  maps = np.round(rng.normal(size=masks.shape) * 4 + masks * 3).astype(np.float32)
  maps[0, 2, 3:9] = -0.0  # Inside a region: -0.0 and +0.0 are one threshold.
  maps[0, 1, :6] = 0.0  # Outside.
  maps[1, 0, :4] = -np.float32(3.5)
  assert maps.dtype == np.float32
  reference = roc_auc_score(masks.ravel(), maps.ravel().astype(np.float64))
  assert metrics.pixel_auroc(masks, maps) == pytest.approx(reference, abs=1e-12)
  assert metrics.au_pro(masks, maps) == pytest.approx(
      metrics.au_pro(masks, maps.astype(np.float64)), abs=1e-12)
