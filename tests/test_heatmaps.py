"""Tests for the heatmap PNG renderer."""

import numpy as np
import PIL.Image
import pytest

from spade_jax.evaluation import heatmaps


def _inputs(h=20, w=30):
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  mask = np.zeros((h, w), np.uint8)
  mask[5:12, 8:20] = 1
  amap = np.linspace(0, 1, h * w, dtype=np.float32).reshape(h, w)
  return image, mask, amap


def test_jet_lut_endpoints():
  assert heatmaps.JET_LUT.shape == (256, 3)
  np.testing.assert_array_equal(heatmaps.JET_LUT[0], [0, 0, 128])  # Dark blue.
  np.testing.assert_array_equal(heatmaps.JET_LUT[255], [128, 0, 0])  # Dark red.
  np.testing.assert_array_equal(heatmaps.colormap(np.array([-1.0, 2.0])),
                                heatmaps.JET_LUT[[0, 255]])


def test_contour_is_the_inner_boundary():
  mask = np.zeros((10, 10), bool)
  mask[2:8, 2:8] = True
  edge = heatmaps.contour(mask, width=1)
  expected = mask.copy()
  expected[3:7, 3:7] = False
  np.testing.assert_array_equal(edge, expected)


def test_render_panels():
  image, mask, amap = _inputs()
  figure = heatmaps.render_heatmap(image, mask, amap, alpha=1.0)
  w = image.shape[1]
  assert figure.shape == (20, 3 * w + 8, 3) and figure.dtype == np.uint8
  np.testing.assert_array_equal(figure[:, :w], image)
  panel2 = figure[:, w + 4:2 * w + 4]
  edge = heatmaps.contour(mask)
  assert (panel2[edge] == heatmaps.CONTOUR_RGB).all()
  np.testing.assert_array_equal(panel2[~edge], image[~edge])
  panel3 = figure[:, 2 * w + 8:]
  np.testing.assert_array_equal(panel3[0, 0], heatmaps.JET_LUT[0])
  np.testing.assert_array_equal(panel3[-1, -1], heatmaps.JET_LUT[255])
  # vmin / vmax fix the scale: everything at vmin or below is the lowest colour.
  fixed = heatmaps.render_heatmap(image, None, amap, vmin=2.0, vmax=3.0, alpha=1.0)
  assert (fixed[:, 2 * w + 8:] == heatmaps.JET_LUT[0]).all()
  # No mask: the middle panel is the plain image; a constant map does not divide by 0.
  flat = heatmaps.render_heatmap(image, None, np.zeros((20, 30)))
  np.testing.assert_array_equal(flat[:, w + 4:2 * w + 4], image)


def test_save_is_atomic_png(tmp_path):
  image, mask, amap = _inputs()
  path = heatmaps.save_heatmap_png(tmp_path / "sub" / "h.png", image, mask, amap)
  with PIL.Image.open(path) as png:
    saved = np.asarray(png)
  np.testing.assert_array_equal(saved, heatmaps.render_heatmap(image, mask, amap))
  assert sorted(p.name for p in path.parent.iterdir()) == ["h.png"]  # No temp file left.


@pytest.mark.parametrize("bad", [
    dict(anomaly_map=np.zeros((5, 5))),
    dict(mask=np.zeros((5, 5))),
    dict(image=np.zeros((20, 30, 3), np.float32)),
    dict(anomaly_map=np.full((20, 30), np.nan)),
])
def test_bad_inputs(tmp_path, bad):
  image, mask, amap = _inputs()
  kwargs = dict(image=image, mask=mask, anomaly_map=amap) | bad
  with pytest.raises(ValueError):
    heatmaps.save_heatmap_png(tmp_path / "h.png", **kwargs)
  assert not list(tmp_path.iterdir())
