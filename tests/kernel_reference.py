"""Independent float64 NumPy references of the kernels' distances, written from their
formulas (never calling the code under test beyond reading a kernel's parameters)."""

import numpy as np
from sklearn.covariance import LedoitWolf


def _f64(x):
  return np.asarray(x, np.float64)


def _from_sq(sq):
  return np.sqrt(np.maximum(sq, 0.0))


def l2_squared(a, b):
  a, b = _f64(a), _f64(b)
  return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def mahalanobis_ledoit_wolf(a, b, train):
  """sqrt((x - y)^T Sigma^-1 (x - y)), Sigma = scikit-learn's Ledoit-Wolf covariance."""
  precision = np.linalg.inv(LedoitWolf().fit(_f64(train)).covariance_)
  diff = _f64(a)[:, None, :] - _f64(b)[None, :, :]
  return _from_sq(np.einsum("qmd,de,qme->qm", diff, precision, diff))


def mahalanobis_of(kernel, a, b):
  """The Mahalanobis distance of the kernel's shrunk covariance h^2 Sigma, Sigma built
  from its stored spectrum, shrinkage and mean eigenvalue."""
  v, s = _f64(kernel.eigvecs), _f64(kernel.eigvals)
  lam = 1.0 / (1.0 + np.exp(-float(kernel.shrinkage_logit)))
  mu, h = float(kernel.mean_eigenvalue), float(np.exp(kernel.log_bandwidth))
  sigma = (1 - lam) * (v * s) @ v.T + lam * mu * np.eye(v.shape[0])
  diff = _f64(a)[:, None, :] - _f64(b)[None, :, :]
  return _from_sq(np.einsum("qmd,de,qme->qm", diff, np.linalg.inv(sigma), diff)) / h


def linear(kernel, a, b):
  p = _f64(kernel.projection)
  return np.sqrt(l2_squared(_f64(a) @ p, _f64(b) @ p))


def rbf(kernel, a, b):
  h = float(np.exp(kernel.log_bandwidth))
  return _from_sq(2.0 - 2.0 * np.exp(-l2_squared(a, b) / (2 * h * h)))


def laplacian(kernel, a, b):
  h = float(np.exp(kernel.log_bandwidth))
  return _from_sq(2.0 - 2.0 * np.exp(-np.sqrt(l2_squared(a, b)) / h))


def polynomial(kernel, a, b):
  gamma, c = float(np.exp(kernel.log_gamma)), float(np.exp(kernel.log_offset))
  k = lambda x, y: (gamma * _f64(x) @ _f64(y).T + c) ** kernel.degree
  kaa = np.diag(k(a, a))[:, None]
  kbb = np.diag(k(b, b))[None, :]
  return _from_sq(kaa + kbb - 2.0 * k(a, b))


def rff(kernel, a, b):
  w, phase = _f64(kernel.omega), _f64(kernel.phase)
  h, e = float(np.exp(kernel.log_bandwidth)), w.shape[1]
  z = lambda x: np.sqrt(2.0 / e) * np.cos(_f64(x) @ w / h + phase)
  return np.sqrt(l2_squared(z(a), z(b)))


def nystrom_features(kernel, x):
  z, h = _f64(kernel.landmarks), float(np.exp(kernel.log_bandwidth))

  def base(p, q):
    r2 = l2_squared(p, q)
    return np.exp(-r2 / (2 * h * h)) if kernel.kind == "rbf" else np.exp(-np.sqrt(r2) / h)

  e, u = np.linalg.eigh(base(z, z))
  e = np.maximum(e, kernel.jitter * e.max())
  return base(x, z) @ u / np.sqrt(e)


def nystrom(kernel, a, b):
  return np.sqrt(l2_squared(nystrom_features(kernel, a), nystrom_features(kernel, b)))


DISTANCES = {"mahalanobis": mahalanobis_of, "linear": linear, "rbf": rbf,
             "laplacian": laplacian, "polynomial": polynomial, "rff": rff,
             "nystrom": nystrom}


def softmin(d, h):
  """-h log mean exp(-d / h) over the last axis, in float64 (d_1 factored out)."""
  d = _f64(d)
  d1 = d.min(-1, keepdims=True)
  return d1[..., 0] - h * np.log(np.mean(np.exp(-(d - d1) / h), axis=-1))


def truncated_kde(d, h):
  """sqrt(-2 h^2 log mean exp(-d^2 / (2 h^2))) over the last axis, float64."""
  sq = _f64(d) ** 2
  s1 = sq.min(-1, keepdims=True)
  return np.sqrt(s1[..., 0] - 2 * h * h * np.log(np.mean(np.exp(-(sq - s1) / (2 * h * h)),
                                                          axis=-1)))


def aggregate(d, mode, h=None):
  if mode == "mean":
    return _f64(d).mean(-1)
  return softmin(d, h) if mode == "softmin" else truncated_kde(d, h)


def pixel_scores(test, train, nbrs, kappa, combine, dist, reduce):
  """SPADE pixel scores with any distance: dist[part](a [P, C], b [G, C]) -> [P, G] and
  reduce[part]([P, kappa] sorted distances) -> [P], part = level index ("ensemble")
  or 0 ("cat"); bilinear upsampling as numpy_reference."""
  import numpy_reference  # pylint: disable=import-outside-toplevel
  levels = list(test)
  grid = max((test[l].shape[1:3] for l in levels), key=lambda s: s[0] * s[1])
  out = []
  for i in range(nbrs.shape[0]):
    if combine == "cat":
      up = (lambda f: numpy_reference.bilinear(f, *grid) if f.shape[:2] != grid
            else f.astype(np.float64))
      q = np.concatenate([up(test[l][i]) for l in levels], -1).reshape(grid[0] * grid[1], -1)
      g = np.concatenate([np.concatenate([up(train[l][j]) for l in levels], -1)
                          .reshape(q.shape[0], -1) for j in nbrs[i]])
      d = np.sort(dist[0](q, g), axis=1)[:, :kappa]
      out.append(reduce[0](d).reshape(grid))
    else:
      maps = []
      for part, l in enumerate(levels):
        h, w, c = test[l].shape[1:]
        g = np.concatenate([train[l][j].reshape(-1, c) for j in nbrs[i]])
        d = np.sort(dist[part](test[l][i].reshape(-1, c), g), axis=1)[:, :kappa]
        maps.append(numpy_reference.bilinear(reduce[part](d).reshape(h, w), *grid))
      out.append(np.mean(maps, 0))
  return np.stack(out)
