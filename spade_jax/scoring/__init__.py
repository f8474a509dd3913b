"""Stage 3, scoring: SPADE's image scores and pixel correspondence, PatchCore's memory-bank
scores, and anomaly maps.

* local.py: the single-device kernels: image kNN scores, and the pixel scores of a
  test image against every position of its K nearest training images (both combine
  modes of the pyramid levels);
* sharded.py: the same against training features sharded over a mesh;
* api.py: the public `image_scores` / `pixel_scores` (validation, then local or sharded);
* anomaly_map.py: score maps -> anomaly maps (bilinear upsampling, Gaussian blur);
* aggregate.py: the k nearest distances -> a score (SPADE's mean, soft minimum,
  truncated kernel density with a bandwidth);
* variants.py: kernelized SPADE variants by name (kernels fitted on the training
  features, per level), for experiments/kernels.py;
* memory_bank.py: PatchCore's scores against a memory bank (spade_jax.patchcore_scores:
  nearest bank entries per patch; image score: the largest, reweighted, or top-k mean).
"""

from spade_jax.scoring.api import COMBINE_MODES, image_scores, pixel_scores

__all__ = ["COMBINE_MODES", "image_scores", "pixel_scores"]
