r"""Combines the members that ensemble_members.py measured, as Ensemble.score does
(spade_jax.detector.ensemble.combine_outputs), and prints each ensemble's mean image
AUROC, pixel AUROC and AU-PRO per dataset, with the mean and spread over datasets.

  python experiments/ensemble_table.py --input_dir=/tmp/ensemble_members \
      --ensembles="patchcore:l2:efficientnet_lite0;patchcore:l2:efficientnet_lite0,padim::efficientnet_lite1"
"""

from collections.abc import Sequence
import pathlib

from absl import app, flags
import numpy as np

from spade_jax.detector import ensemble as ensemble_lib
from spade_jax.evaluation import metrics

_INPUT = flags.DEFINE_string("input_dir", "/tmp/ensemble_members", "ensemble_members.py's.")
_ENSEMBLES = flags.DEFINE_string("ensembles", None, "Ensembles separated by ';'.")
_COMBINE = flags.DEFINE_enum("combine", "mean", list(ensemble_lib.COMBINES), "mean or max.")
_STATISTICS = flags.DEFINE_enum("statistics", "mean_std", list(ensemble_lib.STATISTICS),
                                "Held-out statistics.")
_DATASETS = flags.DEFINE_list("datasets", None, "Datasets (default: all found).")


def _file(spec: ensemble_lib.MemberSpec) -> str:
  return spec.text().replace(":", "_").replace("+", "-") + ".npz"


def category_metrics(folder: pathlib.Path, specs, combine: str, kind: str):
  """(image AUROC, pixel AUROC, AU-PRO) of one ensemble on one category, or None."""
  files = [folder / _file(s) for s in specs]
  if not all(f.exists() for f in files):
    return None
  truth = np.load(folder / "truth.npz")
  loaded = [np.load(f) for f in files]
  stats = np.asarray([[*z[f"image_{kind}"], *z[f"pixel_{kind}"]] for z in loaded], np.float32)
  index = ensemble_lib.EnsembleIndex(indices=(), image_center=stats[:, 0],
                                     image_scale=stats[:, 1], pixel_center=stats[:, 2],
                                     pixel_scale=stats[:, 3], members=(), statistics=kind)
  size = truth["masks"].shape[-2:]
  scores, maps = ensemble_lib.combine_outputs([z["scores"] for z in loaded],
                                              [z["maps"] for z in loaded], index, combine,
                                              size)
  return (metrics.image_auroc(truth["labels"], scores),
          metrics.pixel_auroc(truth["masks"], maps), metrics.au_pro(truth["masks"], maps))


def main(argv: Sequence[str]) -> None:
  del argv
  root = pathlib.Path(_INPUT.value)
  datasets = _DATASETS.value or sorted(p.name for p in root.iterdir() if p.is_dir())
  print(f"combine={_COMBINE.value} statistics={_STATISTICS.value}; per dataset: image AUROC "
        "/ pixel AUROC / AU-PRO (mean of categories); last: mean (min-max) of image AUROC")
  for text in _ENSEMBLES.value.split(";"):
    specs = ensemble_lib.parse_members(text)
    row, images = [], []
    for dataset in datasets:
      cats = sorted(p for p in (root / dataset).iterdir() if p.is_dir())
      results = [category_metrics(c, specs, _COMBINE.value, _STATISTICS.value) for c in cats]
      if not results or any(r is None for r in results):
        row.append(f"{dataset}: -")
        continue
      mean = np.mean(np.asarray(results), axis=0)
      images.append(mean[0])
      row.append(f"{dataset}: {100 * mean[0]:.1f}/{100 * mean[1]:.1f}/{100 * mean[2]:.1f}")
    spread = (f"{100 * np.mean(images):.1f} ({100 * min(images):.1f}-{100 * max(images):.1f})"
              if images else "-")
    print(f"{text}\n  {' | '.join(row)} | {spread}")


if __name__ == "__main__":
  app.run(main)
