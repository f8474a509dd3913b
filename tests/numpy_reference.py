"""Independent float64 NumPy references of SPADE's equations, shared by the tests.

Written from the definitions, one output at a time where that is clearer; never
calls the code under test.
"""

import numpy as np


def bilinear(x, out_h, out_w):
  """torch align_corners=False bilinear of [h, w, ...] written from the definition."""
  h, w = x.shape[:2]
  out = np.zeros((out_h, out_w) + x.shape[2:], np.float64)
  for oy in range(out_h):
    sy = max((oy + 0.5) * h / out_h - 0.5, 0.0)
    y0 = min(int(np.floor(sy)), h - 1)
    y1 = min(y0 + 1, h - 1)
    ly = sy - y0
    for ox in range(out_w):
      sx = max((ox + 0.5) * w / out_w - 0.5, 0.0)
      x0 = min(int(np.floor(sx)), w - 1)
      x1 = min(x0 + 1, w - 1)
      lx = sx - x0
      out[oy, ox] = ((1 - ly) * ((1 - lx) * x[y0, x0] + lx * x[y0, x1]) +
                     ly * ((1 - lx) * x[y1, x0] + lx * x[y1, x1]))
  return out


def distances(a, b, metric):
  """[P, D], [G, D] -> [P, G] float64 distances."""
  a = a.astype(np.float64)
  b = b.astype(np.float64)
  if metric == "cosine":
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return 1.0 - a @ b.T
  sq = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
  return np.sqrt(sq) if metric == "l2" else sq


def pixel_scores(test, train, nbrs, kappa, combine, metric):
  levels = list(test)
  grid = max((test[l].shape[1:3] for l in levels), key=lambda s: s[0] * s[1])
  out = []
  for i in range(nbrs.shape[0]):
    if combine == "cat":
      up = lambda f: bilinear(f, *grid) if f.shape[:2] != grid else f.astype(np.float64)
      q = np.concatenate([up(test[l][i]) for l in levels], -1).reshape(-1, sum(
          test[l].shape[-1] for l in levels))
      g = np.concatenate([np.concatenate([up(train[l][j]) for l in levels], -1)
                          .reshape(q.shape[0], -1) for j in nbrs[i]])
      d = np.sort(distances(q, g, metric), axis=1)[:, :kappa].mean(1)
      out.append(d.reshape(grid))
    else:
      maps = []
      for l in levels:
        h, w, c = test[l].shape[1:]
        g = np.concatenate([train[l][j].reshape(-1, c) for j in nbrs[i]])
        d = np.sort(distances(test[l][i].reshape(-1, c), g, metric), axis=1)
        maps.append(bilinear(d[:, :kappa].mean(1).reshape(h, w), *grid))
      out.append(np.mean(maps, 0))
  return np.stack(out)
